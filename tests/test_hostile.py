"""The second hostile pass: no non-finite model kept, no traceback, no silent overwrite, same seed same model."""
import errno
import fcntl
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import cli
import data_utils as du
import evaluate
import features
import files
import inference
import model_utils as mu
import predict
import progress
import rundir
import store
import train
from errors import FlowerclfError
from conftest import ROOT, TINY, make_image_folder, run_script as _main


def _one_error_line(code, err, expected_code=2):
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained once: (data folder, save folder)."""
    tmp = tmp_path_factory.mktemp("hostile")
    data = make_image_folder(tmp / "data")
    code, _, err = _main(train, [data, "--save_dir", str(tmp / "s"), "--epochs", "2"] + TINY)
    assert code == 0, err
    return data, tmp / "s"


def _image(data):
    return os.path.join(data, "test", "1", "1_0.png")


# ------------------------------------------------------------------ 1. non-finite models

@pytest.mark.parametrize("flags", [["--backbone_lr_ratio", "nan", "--unfreeze", "1"], ["--learning_rate", "inf"],
                                   ["--learning_rate", "nan"], ["--label_smoothing", "5"],
                                   ["--hidden_units", "1000000000"], ["--warmup_epochs", "nan"],
                                   ["--seed", "-1", "--valid_split", "0.2"], ["--seed", "1" * 23]])
def test_bad_flags_are_one_line_before_any_work(image_folder, tmp_path, flags):
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "s")] + TINY + flags)
    _one_error_line(code, err)
    assert not (tmp_path / "s").exists()


def test_a_blown_up_model_is_never_saved(image_folder, tmp_path):
    save = tmp_path / "s"
    code, _, err = _main(train, [image_folder, "--save_dir", str(save), "--epochs", "2", "--learning_rate", "1e308",
                                 "--batch_size", "64"] + TINY[:-4] + ["--engine", "torch"])
    line = _one_error_line(code, err)
    assert "(epoch 1)" in line and "no checkpoint was saved" in line
    assert not (save / "checkpoint.pth").exists() and not (save / "checkpoint_last.pth").exists()


def test_a_non_finite_checkpoint_is_refused(run, tmp_path):
    data, save = run
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    ckpt["state_dict"]["head.0.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pth")
    line = _one_error_line(*_main(predict, [_image(data), str(tmp_path / "nan.pth")])[::2])
    assert "head.0.weight is not finite" in line


# ------------------------------------------------------------------ 2. same seed, same model

def test_same_command_cold_then_warm_gives_identical_checkpoints(image_folder, tmp_path):
    states = []
    for _ in range(2):  # the first run fills the feature cache, the second reads it
        code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "s"), "--epochs", "3",
                                     "--overwrite"] + TINY)
        assert code == 0, err
        states.append(torch.load(tmp_path / "s" / "checkpoint.pth", weights_only=True)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ------------------------------------------------------------------ 3-4. the save dir

def test_another_runs_checkpoint_is_not_overwritten_silently(run, tmp_path):
    data, save = run
    before = (save / "checkpoint.pth").read_bytes()
    code, _, err = _main(train, [data, "--save_dir", str(save), "--epochs", "1", "--learning_rate", "0.01"] + TINY)
    assert "--overwrite" in _one_error_line(code, err)
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
    with open(save / rundir.LOCK_NAME, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running train.py holds it
        held.write("4242")
        held.flush()
        code, _, err = _main(train, [image_folder, "--save_dir", str(save), "--epochs", "1"] + TINY)
    assert "another train.py (pid 4242) is writing to" in _one_error_line(code, err)
    assert not (save / "checkpoint.pth").exists()


@pytest.mark.parametrize("inside", ["train/runs", "train/1/run"])
def test_save_dir_inside_the_data_is_refused(image_folder, inside):
    save = os.path.join(image_folder, inside)
    code, _, err = _main(train, [image_folder, "--save_dir", save, "--epochs", "1"] + TINY)
    assert "would become training images" in _one_error_line(code, err)
    assert not os.path.exists(save)


def test_an_unusable_save_dir_fails_before_the_feature_pass(image_folder, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    passes = []
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: passes.append(1))
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "file" / "s"), "--epochs", "1"] + TINY)
    _one_error_line(code, err)
    assert not passes


# ------------------------------------------------------------------ 5. ONNX files

def test_export_leaves_one_self_contained_file(tiny_onnx, tmp_path):
    net, meta, _ = tiny_onnx
    out = tmp_path / "export" / "model.onnx"
    checkpoints.export_onnx(net, str(out), 8, {"flowerclf": json.dumps(meta)})
    assert os.listdir(out.parent) == ["model.onnx"]  # no weights kept aside in a .data file
    inference.Predictor.from_onnx(str(out))  # loads alone


def test_a_damaged_cached_backbone_is_exported_again(image_folder, tmp_path):
    model, pp = mu.build_model(mu.ModelSpec("mobilenet_v3_small", "none", [], 0.0, 3))
    fingerprint, lines = features.state_fingerprint(model.backbone), []
    args = (model.backbone, "mobilenet_v3_small", pp.crop_size, "onnxruntime", torch.device("cpu"), False,
            fingerprint, lines.append)
    assert features.feature_forward(*args)[1] == "onnxruntime"
    cached = [os.path.join(d, f) for d, _, fs in os.walk(store.cache_dir()) for f in fs
              if f.startswith("mobilenet_v3_small-")]
    for path in cached:
        with open(path, "wb") as f:
            f.write(b"garbage")
    forward, engine = features.feature_forward(*args)
    images = torch.zeros(1, 3, pp.crop_size, pp.crop_size)
    assert engine == "onnxruntime" and not lines and forward(images).shape == (1, 1024)


# ------------------------------------------------------------------ 6. malformed model files

def _mutate(ckpt, dotted, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        ckpt = ckpt[p]
    if value is KeyError:
        del ckpt[leaf]
    else:
        ckpt[leaf] = value


@pytest.mark.parametrize("field, value", [
    ("preprocess", KeyError), ("model.hidden_units", KeyError), ("class_to_idx", ["1", "2", "3"]),
    ("class_to_idx", {"1": 0, "2": 1}), ("preprocess.interpolation", "lanczos"), ("preprocess.crop_size", 0)])
def test_malformed_checkpoints_name_the_field(run, tmp_path, field, value):
    data, save = run
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    _mutate(ckpt, field, value)
    torch.save(ckpt, tmp_path / "bad.pth")
    line = _one_error_line(*_main(predict, [_image(data), str(tmp_path / "bad.pth")])[::2])
    assert f"field '{field.split('.')[0] if field == 'class_to_idx' else field}" in line


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A 2-class model.onnx of a tiny network, and its valid metadata."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    meta = {"format": "flowerclf-checkpoint", "version": 1,
            "model": {"arch": "tiny", "weights": "none", "hidden_units": [], "dropout": 0.0, "num_classes": 2},
            "preprocess": du.Preprocess(16, 8).to_dict(), "class_to_idx": {"a": 0, "b": 1}}
    return net, meta, tmp_path_factory.mktemp("onnx")


@pytest.mark.parametrize("field, value, named", [
    ("preprocess", KeyError, "preprocess"), ("class_to_idx", KeyError, "class_to_idx"),
    ("preprocess.mean", KeyError, "preprocess.mean"), (None, [], "flowerclf description"),
    ("preprocess.crop_size", 12, "preprocess.crop_size")])
def test_malformed_onnx_metadata_names_the_field(tiny_onnx, run, field, value, named):
    net, meta, folder = tiny_onnx
    meta = json.loads(json.dumps(meta))
    if field is None:
        meta = value
    else:
        _mutate(meta, field, value)
    path = str(folder / f"{named}.onnx")
    checkpoints.export_onnx(net, path, 8, {"flowerclf": json.dumps(meta)})
    line = _one_error_line(*_main(predict, [_image(run[0]), path])[::2])
    assert named in line


def test_a_resume_state_without_stateful_is_one_line(run, tmp_path):
    data, save = run
    state = torch.load(save / "checkpoint_last.pth", weights_only=True)
    del state["stateful"]
    (tmp_path / "s").mkdir()
    torch.save(torch.load(save / "checkpoint.pth", weights_only=True), tmp_path / "s" / "checkpoint.pth")
    torch.save(state, tmp_path / "s" / "checkpoint_last.pth")
    code, _, err = _main(train, [data, "--save_dir", str(tmp_path / "s"), "--epochs", "3", "--resume"] + TINY)
    assert "field 'stateful'" in _one_error_line(code, err)


def test_a_full_disk_is_one_line_and_loses_nothing(run, tmp_path, monkeypatch):
    data, save = run
    work = tmp_path / "s"
    work.mkdir()
    for name in ("checkpoint.pth", "checkpoint_last.pth"):
        (work / name).write_bytes((save / name).read_bytes())
    before = (work / "checkpoint.pth").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full)
    code, _, err = _main(train, [data, "--save_dir", str(work), "--epochs", "4", "--resume"] + TINY)
    line = _one_error_line(code, err)
    assert "No space left on device" in line and "MiB free in" in line and str(work) in line
    assert (work / "checkpoint.pth").read_bytes() == before
    assert not [f for f in os.listdir(work) if f.startswith(".tmp-")]


def test_ctrl_c_during_a_save_finishes_the_file_then_stops(tmp_path):
    path = tmp_path / "out.bin"

    def write(f):
        f.write(b"first half ")
        os.kill(os.getpid(), signal.SIGINT)
        f.write(b"second half")
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, write)
    assert path.read_bytes() == b"first half second half"


def test_ctrl_c_before_any_epoch_says_no_checkpoint_was_saved(tmp_path):
    args = train.build_parser().parse_args(["D", "--save_dir", str(tmp_path)])
    assert train.interrupted(args) == "no epoch had finished, so no checkpoint was saved"


def test_non_utf8_category_names(run, tmp_path):
    data, save = run
    names = tmp_path / "names.json"
    names.write_bytes('{"1": "café"}'.encode("latin-1"))
    for module, argv in [(predict, [_image(data), str(save / "checkpoint.pth")]),
                         (evaluate, [str(save / "checkpoint.pth"), os.path.join(data, "test")]),
                         (train, [data, "--save_dir", str(tmp_path / "t")] + TINY)]:
        line = _one_error_line(*_main(module, argv + ["--category_names", str(names)])[::2])
        assert "is not UTF-8" in line


def test_category_names_must_be_strings(tmp_path):
    (tmp_path / "n.json").write_text('{"1": 3}')
    with pytest.raises(FlowerclfError, match="not a string"):
        du.load_category_names(str(tmp_path / "n.json"))


def test_plot_edges(run, tmp_path):
    data, save = run
    ckpt = str(save / "checkpoint.pth")
    assert "is a folder" in _one_error_line(*_main(predict, [_image(data), ckpt, "--plot", str(tmp_path)])[::2])
    (tmp_path / "names.json").write_text(json.dumps({"1": "$\\frac{a", "2": "b$", "3": "c"}))
    code, _, err = _main(predict, [_image(data), ckpt, "--plot", str(tmp_path / "p.png"), "--category_names",
                                   str(tmp_path / "names.json")])
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 0 and f"wrote {tmp_path / 'p.png'}" in err


def test_a_closed_stdout_is_quiet_and_the_plot_is_still_written(run, tmp_path):
    data, save = run
    plot = tmp_path / "p.png"
    cmd = (f"{sys.executable} {os.path.join(ROOT, 'predict.py')} {os.path.join(data, 'test')} "
           f"{save / 'checkpoint.pth'} --plot {plot} --json | head -1")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    assert proc.stdout == "[\n" and "Traceback" not in proc.stderr and plot.stat().st_size > 0


def test_a_pth_on_the_inference_only_install_says_what_to_do(run, monkeypatch):
    data, save = run
    real = inference.importlib.util.find_spec
    monkeypatch.setattr(inference.importlib.util, "find_spec", lambda name: None if name == "torch" else real(name))
    line = _one_error_line(*_main(predict, [_image(data), str(save / "checkpoint.pth")])[::2])
    assert "this install has no torch" in line and "export.py" in line


def test_a_truncated_jpeg_in_a_worker_is_one_line(image_folder, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with open(os.path.join(image_folder, "valid", "2", "cut.jpg"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "s"), "--epochs", "1",
                                 "--num_workers", "1"] + TINY)
    assert "cut.jpg cannot be read" in _one_error_line(code, err)


# ------------------------------------------------------------------ 7. terminal escapes

def test_class_names_cannot_drive_the_terminal(run, tmp_path):
    data, save = run
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    ckpt["class_to_idx"] = {"\x1b[2J": 0, "\x1b]0;owned\x07": 1, "ok": 2}
    torch.save(ckpt, tmp_path / "esc.pth")
    code, out, _ = _main(predict, [_image(data), str(tmp_path / "esc.pth")])
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\\x1b[2J" in out
    assert cli.printable("a\x1b[31mb\nc") == "a\\x1b[31mb\nc"


# ------------------------------------------------------------------ 8. smaller

def test_outputs_respect_the_umask(run):
    _, save = run
    old = os.umask(0o022)
    os.umask(old)
    for name in ("checkpoint.pth", "history.json", "training_curves.png"):
        assert (save / name).stat().st_mode & 0o777 == 0o666 & ~old


def test_a_fifo_in_a_predicted_folder_does_not_hang(run, tmp_path):
    data, save = run
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(open(_image(data), "rb").read())
    os.mkfifo(folder / "x.jpg")
    code, out, _ = _main(predict, [str(folder), str(save / "checkpoint.pth"), "--json"])
    assert code == 0 and [os.path.basename(r["image"]) for r in json.loads(out)] == ["a.png"]
    assert "not a regular file" in _one_error_line(*_main(predict, [str(folder / "x.jpg"),
                                                                    str(save / "checkpoint.pth")])[::2])


def test_a_file_as_data_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "is a file" in _one_error_line(*_main(train, [str(tmp_path / "f")] + TINY)[::2])


def test_a_weights_pickle_is_one_short_line(image_folder, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "s"), "--arch", "mobilenet_v3_small",
                                 "--weights", str(tmp_path / "evil.pth")])
    assert len(_one_error_line(code, err)) < 400


def test_a_wrong_shape_state_dict_says_which_weight(run, tmp_path):
    data, save = run
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    ckpt["state_dict"]["head.0.weight"] = torch.zeros(8, 7)
    torch.save(ckpt, tmp_path / "shape.pth")
    assert "size mismatch for head.0.weight" in _one_error_line(*_main(predict, [_image(data),
                                                                                 str(tmp_path / "shape.pth")])[::2])


def test_swapped_predict_arguments(run):
    data, save = run
    line = _one_error_line(*_main(predict, [str(save / "checkpoint.pth"), os.path.join(data, "test")])[::2])
    assert "is a folder" in line and "checkpoint (.pth or .onnx) last" in line


def test_a_class_folder_linked_to_its_parent(image_folder):
    os.symlink(os.path.join(image_folder, "train"), os.path.join(image_folder, "train", "loop"))
    with pytest.raises(FlowerclfError, match="links to .* every image would count twice"):
        du.scan_split(os.path.join(image_folder, "train"))


# ------------------------------------------------------------------ 9. first-time-user friction

def test_progress_in_a_log_is_a_line_now_and_then(monkeypatch, capsys):  # (conftest turns them off elsewhere)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    assert list(progress.progress(range(3), "features train")) == [0, 1, 2]  # pytest's stderr is no terminal
    assert capsys.readouterr().err.splitlines()[-1].startswith("features train: batch 3/3, ")
