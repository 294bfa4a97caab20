"""The save directory: one run at a time, never inside the data, no silent overwrite, no stale temp files."""
import fcntl
import os
import subprocess
import sys

import pytest
from conftest import TINY, one_error_line, truncated_jpeg
from conftest import run_script as _main

import train
from flowerclf.base.files import TEMP_PREFIX
from flowerclf.base.runfiles import RunFiles
from flowerclf.features import passes as passes_module
from flowerclf.models.checkpoints import load_model
from flowerclf.training import rundir, trainer


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


def test_only_a_dead_writers_temp_files_are_cleared(image_folder, tmp_path):
    save = tmp_path / "s"
    save.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = save / f"{TEMP_PREFIX}{int(gone.stdout)}-abc123.pth"  # a save cut short by kill -9
    live = save / f"{TEMP_PREFIX}{os.getppid()}-def456.pth"     # a save a running process is writing
    foreign = [save / ".tmp-draft.txt", save / f"{TEMP_PREFIX}notapid-x.pth"]
    for path in [stale, live] + foreign:
        path.write_bytes(b"half a file")
    assert _main(train, [image_folder, "--save_dir", str(save), "--epochs", "1"] + TINY)[0] == 0
    assert not stale.exists()
    assert live.exists() and all(path.exists() for path in foreign)


def _fail_in_the_feature_pass(monkeypatch, data):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(passes_module, "extract_features", interrupt)
    return ["--no_store"]  # the first run stored every vector


def _fail_at_epoch_1(monkeypatch, data):
    def nan_loss(epoch, *a):
        raise trainer.NonFiniteModel("the validation loss became nan")
    monkeypatch.setattr(trainer, "check_finite_epoch", nan_loss)
    return []


def _bad_image(monkeypatch, data):
    truncated_jpeg(os.path.join(data, "train", "1", "new.jpg"))  # its header reads: found in the feature pass
    return []


def _snapshot(save):
    """Every output file of a save directory (tensorboard/'s included) and its bytes."""
    return {os.path.relpath(os.path.join(d, f), save): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(save) if ".flowerclf-previous" not in d for f in fs if not f.startswith(".")}


@pytest.mark.parametrize("fail", [_fail_in_the_feature_pass, _fail_at_epoch_1, _bad_image],
                         ids=["ctrl-c-in-feature-pass", "nan-at-epoch-1", "bad-data"])
def test_a_failing_overwrite_run_puts_the_old_model_back(image_folder, tmp_path, monkeypatch, fail):
    save = tmp_path / "s"
    assert _main(train, [image_folder, "--save_dir", str(save), "--epochs", "1"] + TINY)[0] == 0
    before = _snapshot(save)
    assert "checkpoint.pth" in before and "history.json" in before
    extra = fail(monkeypatch, image_folder)
    code, out, err = _main(train, [image_folder, "--save_dir", str(save), "--epochs", "1", "--overwrite"] + TINY
                           + extra)
    assert code != 0 and "put back the previous run's" in out and "Traceback" not in err
    assert _snapshot(save) == before
    assert not (save / ".flowerclf-previous").exists()
    load_model(str(save / "checkpoint.pth"))


def test_outputs_set_aside_by_a_killed_overwrite_run_come_back(tmp_path):
    files = RunFiles(str(tmp_path / "s"))
    os.makedirs(files.previous)
    with open(os.path.join(files.previous, "checkpoint.pth"), "wb") as f:
        f.write(b"the old model")  # kill -9 before the new run saved anything
    lines = []
    with rundir.claim(files, str(tmp_path / "data"), overwrite=False, resume=True, log=lines.append):
        pass
    assert open(files.checkpoint, "rb").read() == b"the old model" and not os.path.exists(files.previous)
    assert "put back the previous run's checkpoint.pth" in lines[0]
    os.makedirs(files.previous)
    with open(os.path.join(files.previous, "checkpoint.pth"), "wb") as f:
        f.write(b"an older model")  # kill -9 after the new run saved its checkpoint
    with rundir.claim(files, str(tmp_path / "data"), overwrite=False, resume=True, log=lines.append):
        pass
    assert open(files.checkpoint, "rb").read() == b"the old model" and not os.path.exists(files.previous)


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


@pytest.mark.parametrize("variable", ["FLOWERCLF_STORE", "FLOWERCLF_CACHE"])
def test_a_feature_store_inside_the_data_is_refused(image_folder, tmp_path, monkeypatch, variable):
    monkeypatch.delenv("FLOWERCLF_STORE", raising=False)
    monkeypatch.setenv(variable, os.path.join(image_folder, "train"))  # its onnx/ would become a class
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "s"), "--epochs", "1"] + TINY)
    assert "the feature store folder (FLOWERCLF_STORE)" in one_error_line(code, err)
    assert sorted(os.listdir(os.path.join(image_folder, "train"))) == ["1", "2", "3"]
