"""ONNX export, torch-free prediction and the ONNX Runtime feature engine."""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data_utils as du
import export
import features
import inference
import model_utils as mu
import predict
import train
from conftest import ROOT, make_image_folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A mobilenet_v3_small run with --export onnx, plus odd-mode images to predict."""
    tmp = tmp_path_factory.mktemp("onnx")
    data = make_image_folder(tmp / "data")
    save = tmp / "save"
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.main([data, "--arch", "mobilenet_v3_small", "--weights", "none", "--epochs", "1",
                           "--save_dir", str(save), "--export", "onnx", "--hidden_units", "16"]) == 0
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    rgb.save(images / "rgb.jpg")
    rgb.convert("L").save(images / "gray.png")
    rgb.convert("RGBA").save(images / "rgba.png")
    rgb.convert("P").save(images / "palette.png")
    rgb.convert("CMYK").save(images / "cmyk.jpg")
    Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)).save(images / "deep.png")
    return save, images


def test_onnx_predictions_match_torch(exported):
    save, images = exported
    files = sorted(str(p) for p in images.iterdir())
    via_torch, _ = inference.Predictor.from_checkpoint(str(save / "checkpoint.pth"), "cpu").predict_paths(files, 3)
    via_onnx, _ = inference.Predictor.from_onnx(str(save / "model.onnx")).predict_paths(files, 3)
    assert len(via_torch) == len(via_onnx) == 6
    for t, o in zip(via_torch, via_onnx):
        assert [p["class"] for p in t["predictions"]] == [p["class"] for p in o["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in t["predictions"]],
                                   [p["probability"] for p in o["predictions"]], atol=1e-4)


def test_onnx_features_match_torch(image_folder):
    torch.manual_seed(0)
    model, pp = mu.build_model(mu.ModelSpec("mobilenet_v3_small", "none", [], 0.0, 3), load_pretrained=False)
    images = du.scan_split(os.path.join(image_folder, "valid"))
    loader = features.make_loader(images, features.eval_transform(pp), 4, 0, torch.device("cpu"))
    fingerprint = features.state_fingerprint(model.backbone)
    ort_forward, used = features.feature_forward(model.backbone, "mobilenet_v3_small", pp.crop_size, "onnxruntime",
                                               torch.device("cpu"), False, fingerprint, print)
    assert used == "onnxruntime"
    via_ort, _ = features.extract_features(ort_forward, loader)
    via_torch, _ = features.extract_features(features.torch_forward(model.backbone, torch.device("cpu")), loader)
    assert via_ort.shape == via_torch.shape == (9, 1024)
    assert (via_ort - via_torch).abs().max().item() < 1e-4


def test_failed_export_falls_back_to_torch_in_one_line(image_folder, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("unsupported operator aten::frobnicate\nmore detail")
    monkeypatch.setattr(features, "export_onnx", broken)
    torch.manual_seed(1)  # a backbone the export cache has not seen
    model, pp = mu.build_model(mu.ModelSpec("squeezenet1_1", "none", [], 0.0, 3), load_pretrained=False)
    lines = []
    _, used = features.feature_forward(model.backbone, "squeezenet1_1", pp.crop_size, "auto", torch.device("cpu"),
                                     False, features.state_fingerprint(model.backbone), lines.append)
    assert used == "torch"
    assert len(lines) == 1 and "aten::frobnicate" in lines[0] and lines[0].endswith("using torch")


def test_engine_is_recorded_and_evaluate_uses_it(exported):
    save, _ = exported
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["engine"] == "onnxruntime"  # auto on a CPU


def test_predict_with_onnx_never_imports_torch(exported):
    save, images = exported
    script = ("import runpy, sys\n"
              f"sys.argv = ['predict.py', {str(images / 'rgb.jpg')!r}, {str(save / 'model.onnx')!r}, '--json']\n"
              "try:\n    runpy.run_path('predict.py', run_name='__main__')\n"
              "except SystemExit as e:\n    code = e.code\n"
              "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code, file=sys.stderr)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.stderr.strip().splitlines()[-1] == "NO-TORCH 0"
    assert json.loads(run.stdout)[0]["predictions"][0]["probability"] > 0


def test_export_cli_and_bad_onnx_files(exported, tmp_path, capsys):
    save, images = exported
    with contextlib.redirect_stdout(io.StringIO()):
        assert export.main([str(save / "checkpoint.pth"), "--out", str(tmp_path / "again.onnx")]) == 0
    assert (tmp_path / "again.onnx").stat().st_size > 100_000
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"definitely not protobuf")
    assert predict.main([str(images / "rgb.jpg"), str(bogus)]) == 2
    assert "is not a loadable ONNX model" in capsys.readouterr().err
    assert predict.main([str(images / "rgb.jpg"), str(save / "model.onnx"), "--gpu"]) == 2
    assert "ONNX Runtime's CPU provider" in capsys.readouterr().err
