"""train.py and predict.py end to end, through the same main() users run."""
import contextlib
import io
import json
import os
import subprocess
import sys
import urllib.error

import pytest
import torch
import torchvision

import checkpoints
import predict
import train
from conftest import ROOT, make_image_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """efficientnet_lite0 (offline pretrained weights) trained 2 epochs on a 3-class set."""
    tmp = tmp_path_factory.mktemp("run")
    data = make_image_folder(tmp / "data")
    save = str(tmp / "save")
    names = tmp / "names.json"
    names.write_text(json.dumps({"1": "pink primrose", "2": "globe thistle", "3": "blanket flower"}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train.main([data, "--arch", "efficientnet_lite0", "--epochs", "2", "--save_dir", save,
                           "--batch_size", "8"])
    assert code == 0
    return data, save, str(names), out.getvalue()


def test_train_then_predict_json(trained, capsys):
    data, save, names, out = trained
    assert "epoch 1/2" in out and "epoch 2/2" in out and "valid acc" in out
    assert "test accuracy: top-1" in out
    ckpt = os.path.join(save, "checkpoint.pth")
    assert os.path.isfile(ckpt)

    image = os.path.join(data, "test", "2", "2_0.png")
    assert predict.main([image, ckpt, "--top_k", "3", "--category_names", names, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == [image]
    preds = results[0]["predictions"]
    assert len(preds) == 3
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
    mapping = json.load(open(names))
    assert all(p["name"] == mapping[p["class"]] for p in preds)
    assert preds[0]["class"] == "2"  # solid colours are easy even after two epochs


def test_predict_text_and_folders(trained, capsys):
    data, save, _, _ = trained
    ckpt = os.path.join(save, "checkpoint.pth")
    folder = os.path.join(data, "test", "1")
    assert predict.main([folder, ckpt, "--top_k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 * 3  # 3 images, each a path line and 2 ranked lines
    assert lines[1].startswith("  1. 1  ") and lines[1].endswith("%")


def test_checkpoint_is_plain_data_with_the_best_epoch(trained):
    _, save, _, _ = trained
    ckpt = torch.load(os.path.join(save, "checkpoint.pth"), map_location="cpu", weights_only=True)
    assert ckpt["model"]["arch"] == "efficientnet_lite0" and ckpt["model"]["num_classes"] == 3
    assert ckpt["class_to_idx"] == {"1": 0, "2": 1, "3": 2}
    assert ckpt["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    best = max(ckpt["history"], key=lambda h: h["valid_acc"])
    assert ckpt["epoch"] == best["epoch"] and ckpt["metrics"]["valid_acc"] == best["valid_acc"]
    assert ckpt["args"]["epochs"] == 2


def test_predict_bad_inputs(trained, tmp_path, capsys):
    data, save, _, _ = trained
    ckpt = os.path.join(save, "checkpoint.pth")
    good = os.path.join(data, "test", "1", "1_0.png")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    assert predict.main([good, str(bad), str(tmp_path / "missing.jpg"), ckpt, "--json"]) == 1
    captured = capsys.readouterr()
    assert [r["image"] for r in json.loads(captured.out)] == [good]  # the good one is still predicted
    assert "broken.jpg" in captured.err and "missing.jpg does not exist" in captured.err
    assert predict.main([good, str(tmp_path / "nope.pth")]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint {tmp_path / 'nope.pth'} does not exist"
    assert predict.main([good, good]) == 2
    assert "is an image; give the images first" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a model")
    assert predict.main([good, str(tmp_path / "notes.txt")]) == 2
    assert "is not a loadable checkpoint" in capsys.readouterr().err


def test_train_bad_inputs_fail_in_one_line(tmp_path, capsys):
    assert train.main([str(tmp_path / "nowhere"), "--arch", "efficientnet_lite0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: data directory {tmp_path / 'nowhere'} does not exist"]
    assert train.main([str(tmp_path), "--epochs", "0"]) == 2
    assert capsys.readouterr().err == "error: argument --epochs: 0 is less than 1 (see train.py --help)\n"
    assert train.main([str(tmp_path), "--arch", "notanet"]) == 2


# each script: a bad argument, then a missing file; the real processes, so a traceback would show
EDGE_CASES = {
    "train.py": (["D", "--batch_size", "x"], ["{missing}"]),
    "predict.py": (["a.jpg", "m.pth", "--top_k", "0"], ["{missing}", "{missing}.pth"]),
    "evaluate.py": (["m.pth", "D", "--batch_size", "-1"], ["{missing}.pth", "D"]),
    "export.py": (["m.pth", "--nope"], ["{missing}.pth"]),
    "serve.py": (["m.onnx", "--port", "70000"], ["{missing}.onnx"]),
    "gpumemcheck.py": (["--watch", "0"], ["--arch", "{missing}"]),
    "data_utils.py": (["flowers102", "D", "--seed", "x"], ["flowers102", "D", "--source", "{missing}"]),
    "cache.py": (["nope"], ["clear", "--arch"]),
}


@pytest.mark.parametrize("script", sorted(EDGE_CASES))
def test_every_script_fails_in_one_line(script, tmp_path):
    env = dict(os.environ, FLOWERCLF_CACHE=str(tmp_path / "cache"))
    for argv in EDGE_CASES[script]:
        argv = [a.format(missing=tmp_path / "missing") for a in argv]
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script)] + argv, capture_output=True, text=True,
                              cwd=tmp_path, env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, proc.stderr)


def test_offline_download_failure_is_one_line(image_folder, monkeypatch, tmp_path, capsys):
    def offline(self, *a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    assert train.main([image_folder, "--save_dir", str(tmp_path / "s")]) == 2  # densenet121 by default
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not download densenet121 weights")
    assert not (tmp_path / "s").exists()


def test_gpu_flag_without_cuda_is_a_clear_error(image_folder, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.main([image_folder, "--gpu", "--arch", "efficientnet_lite0"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_hidden_units_zero_gives_a_linear_head(image_folder, tmp_path):
    save = str(tmp_path / "s")
    assert train.main([image_folder, "--arch", "mobilenet_v3_small", "--weights", "none", "--hidden_units", "0",
                       "--epochs", "1", "--save_dir", save, "--engine", "torch"]) == 0
    model, _ = checkpoints.load_model(os.path.join(save, "checkpoint.pth"))
    assert [type(m).__name__ for m in model.head] == ["Dropout", "Linear"]


@pytest.mark.parametrize("script", ["train.py", "predict.py", "evaluate.py", "export.py", "gpumemcheck.py",
                                    "serve.py", "cache.py"])
def test_help_explains_every_flag(script):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "example" in out
    module = __import__(script[:-3])
    for action in module.build_parser()._actions:
        assert action.help, action.dest


def test_unwritable_save_dir_is_one_line(image_folder, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert train.main([image_folder, "--arch", "mobilenet_v3_small", "--weights", "none", "--epochs", "1",
                       "--engine", "torch", "--save_dir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
