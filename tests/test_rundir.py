"""The save directory: one run at a time, never inside the data, no silent overwrite, no stale temp files."""
import fcntl
import os

import pytest
from conftest import TINY, one_error_line
from conftest import run_script as _main

import train
from flowerclf.base.runfiles import RunFiles
from flowerclf.features import passes as passes_module


def test_another_runs_checkpoint_is_not_overwritten_silently(tiny_run, tmp_path):
    data, save = tiny_run
    before = (save / "checkpoint.pth").read_bytes()
    code, _, err = _main(train, [data, "--save_dir", str(save), "--epochs", "1", "--learning_rate", "0.01"] + TINY)
    assert "--overwrite" in one_error_line(code, err)
    assert (save / "checkpoint.pth").read_bytes() == before


def test_overwrite_clears_the_old_runs_outputs(image_folder, tmp_path):
    save = tmp_path / "s"
    assert _main(train, [image_folder, "--save_dir", str(save), "--epochs", "1"] + TINY)[0] == 0
    (save / "model.onnx").write_bytes(b"an old export")
    code, out, _ = _main(train, [image_folder, "--save_dir", str(save), "--epochs", "1", "--overwrite"] + TINY)
    assert code == 0 and "--overwrite: removed the previous run's" in out
    assert not (save / "model.onnx").exists() and (save / "checkpoint.pth").exists()


def test_a_killed_saves_temp_file_is_cleared_by_the_next_run(image_folder, tmp_path):
    save = tmp_path / "s"
    save.mkdir()
    (save / ".tmp-abc123.pth").write_bytes(b"half a checkpoint")
    assert _main(train, [image_folder, "--save_dir", str(save), "--epochs", "1"] + TINY)[0] == 0
    assert not [f for f in os.listdir(save) if f.startswith(".tmp-")]


def test_two_runs_cannot_share_a_save_dir(image_folder, tmp_path):
    save = tmp_path / "s"
    save.mkdir()
    with open(RunFiles(str(save)).lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running train.py holds it
        held.write("4242")
        held.flush()
        code, _, err = _main(train, [image_folder, "--save_dir", str(save), "--epochs", "1"] + TINY)
    assert "another train.py (pid 4242) is writing to" in one_error_line(code, err)
    assert not (save / "checkpoint.pth").exists()


@pytest.mark.parametrize("inside", ["train/runs", "train/1/run"])
def test_save_dir_inside_the_data_is_refused(image_folder, inside):
    save = os.path.join(image_folder, inside)
    code, _, err = _main(train, [image_folder, "--save_dir", save, "--epochs", "1"] + TINY)
    assert "would become training images" in one_error_line(code, err)
    assert not os.path.exists(save)


def test_an_unusable_save_dir_fails_before_the_feature_pass(image_folder, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    passes = []
    monkeypatch.setattr(passes_module, "extract_features", lambda *a, **k: passes.append(1))
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "file" / "s"), "--epochs", "1"] + TINY)
    one_error_line(code, err)
    assert not passes


def test_unwritable_save_dir_is_one_line(image_folder, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert train.main([image_folder, "--arch", "mobilenet_v3_small", "--weights", "none", "--epochs", "1",
                       "--engine", "torch", "--save_dir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
