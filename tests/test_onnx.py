"""ONNX export, torch-free prediction and the ONNX Runtime feature engine."""
import contextlib
import copy
import gc
import io
import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from conftest import ROOT, an_image, make_image_folder, mutate, one_error_line
from conftest import run_script as _main
from PIL import Image

import export
import predict
import train
from flowerclf.data.folders import scan_split
from flowerclf.data.loaders import make_loader
from flowerclf.data.transforms import Preprocess, create_transform
from flowerclf.features import store
from flowerclf.features import engines
from flowerclf.features.engines import feature_forward, state_fingerprint, torch_forward
from flowerclf.features.passes import FeaturePass, extract_features
from flowerclf.models import onnx as onnx_module
from flowerclf.models.onnx import export_module
from flowerclf.models.registry import ModelSpec, build_model
from flowerclf.serving.predictor import Predictor
from flowerclf.training import plans, trainer
from conftest import tiny_config


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
    via_torch, _ = Predictor.from_checkpoint(str(save / "checkpoint.pth"), "cpu").predict_paths(files, 3)
    via_onnx, _ = Predictor.from_onnx(str(save / "model.onnx")).predict_paths(files, 3)
    assert len(via_torch) == len(via_onnx) == 6
    for t, o in zip(via_torch, via_onnx):
        assert [p["class"] for p in t["predictions"]] == [p["class"] for p in o["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in t["predictions"]],
                                   [p["probability"] for p in o["predictions"]], atol=1e-4)
    calibration = torch.load(save / "checkpoint.pth", weights_only=True)["calibration"]
    session = onnx_module.open_session(str(save / "model.onnx"))
    assert onnx_module.model_metadata(session, "model.onnx")["calibration"] == calibration  # the same T and threshold
    threshold = calibration["threshold"]
    for t, o in zip(via_torch, via_onnx):  # the same rule on both; a tiny model's answers can sit on the threshold
        top_t, top_o = t["predictions"][0]["probability"], o["predictions"][0]["probability"]
        assert t["confident"] == (top_t >= threshold) and o["confident"] == (top_o >= threshold)
        if abs(top_t - threshold) > 1e-4:
            assert t["confident"] == o["confident"]


def test_onnx_features_match_torch(image_folder):
    torch.manual_seed(0)
    model, pp = build_model(ModelSpec("mobilenet_v3_small", "none", [], 0.0, 3), load_pretrained=False)
    images = scan_split(os.path.join(image_folder, "valid"))
    loader = make_loader(images, create_transform(pp), 4, 0, torch.device("cpu"))
    fingerprint = state_fingerprint(model.backbone)
    ort_forward, used = feature_forward(model.backbone, "mobilenet_v3_small", pp.crop_size, "onnxruntime",
                                               torch.device("cpu"), False, fingerprint, print)
    assert used == "onnxruntime"
    via_ort, _ = extract_features(ort_forward, loader)
    via_torch, _ = extract_features(torch_forward(model.backbone, torch.device("cpu")), loader)
    assert via_ort.shape == via_torch.shape == (9, 1024)
    assert (via_ort - via_torch).abs().max().item() < 1e-4


def test_failed_export_falls_back_to_torch_in_one_line(image_folder, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("unsupported operator aten::frobnicate\nmore detail")
    monkeypatch.setattr(onnx_module, "export_module", broken)
    torch.manual_seed(1)  # a backbone the export cache has not seen
    model, pp = build_model(ModelSpec("squeezenet1_1", "none", [], 0.0, 3), load_pretrained=False)
    lines = []
    _, used = feature_forward(model.backbone, "squeezenet1_1", pp.crop_size, "auto", torch.device("cpu"),
                                     False, state_fingerprint(model.backbone), lines.append)
    assert used == "torch"
    assert len(lines) == 1 and "aten::frobnicate" in lines[0] and lines[0].endswith("using torch")


def test_engine_is_recorded_and_evaluate_uses_it(exported):
    save, _ = exported
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["engine"] == "onnxruntime"  # auto on a CPU


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A 2-class model.onnx of a tiny network, and its valid metadata."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    meta = {"format": "flowerclf-checkpoint", "version": 1,
            "model": {"arch": "tiny", "weights": "none", "hidden_units": [], "dropout": 0.0, "num_classes": 2},
            "preprocess": Preprocess(16, 8).to_dict(), "class_to_idx": {"a": 0, "b": 1}}
    return net, meta, tmp_path_factory.mktemp("onnx")


def test_model_onnx_carries_the_decode_rule_and_one_without_reads_as_full(exported, tiny_onnx, tmp_path):
    save, _ = exported
    assert Predictor.from_onnx(str(save / "model.onnx")).preprocess.decode == "draft2"  # the checkpoint's
    net, meta, _ = tiny_onnx
    meta = json.loads(json.dumps(meta))
    del meta["preprocess"]["decode"]  # a model.onnx exported before the rule
    export_module(net, str(tmp_path / "old.onnx"), 8, {"flowerclf": json.dumps(meta)})
    assert Predictor.from_onnx(str(tmp_path / "old.onnx")).preprocess.decode == "full"


def test_export_leaves_one_self_contained_file(tiny_onnx, tmp_path):
    net, meta, _ = tiny_onnx
    out = tmp_path / "export" / "model.onnx"
    export_module(net, str(out), 8, {"flowerclf": json.dumps(meta)})
    assert os.listdir(out.parent) == ["model.onnx"]  # no weights kept aside in a .data file
    Predictor.from_onnx(str(out))  # loads alone


@pytest.mark.parametrize("field, value, named", [
    ("preprocess", KeyError, "preprocess"), ("class_to_idx", KeyError, "class_to_idx"),
    ("preprocess.mean", KeyError, "preprocess.mean"), (None, [], "flowerclf description"),
    ("preprocess.crop_size", 12, "preprocess.crop_size"), ("preprocess.decode", "magic", "preprocess.decode"),
    ("calibration", {"temperature": -1, "threshold": 0.5, "kept": 0.95}, "calibration.temperature")])
def test_malformed_onnx_metadata_names_the_field(tiny_onnx, tiny_run, field, value, named):
    net, meta, folder = tiny_onnx
    meta = json.loads(json.dumps(meta))
    if field is None:
        meta = value
    else:
        mutate(meta, field, value)
    path = str(folder / f"{named}.onnx")
    export_module(net, path, 8, {"flowerclf": json.dumps(meta)})
    line = one_error_line(*_main(predict, [an_image(tiny_run[0]), path])[::2])
    assert named in line


def test_a_damaged_cached_backbone_is_exported_again(image_folder, tmp_path):
    model, pp = build_model(ModelSpec("mobilenet_v3_small", "none", [], 0.0, 3))
    fingerprint, lines = state_fingerprint(model.backbone), []
    args = (model.backbone, "mobilenet_v3_small", pp.crop_size, "onnxruntime", torch.device("cpu"), False,
            fingerprint, lines.append)
    assert feature_forward(*args)[1] == "onnxruntime"
    cached = [os.path.join(d, f) for d, _, fs in os.walk(store.store_dir()) for f in fs
              if f.startswith("mobilenet_v3_small-")]
    for path in cached:
        with open(path, "wb") as f:
            f.write(b"garbage")
    forward, engine = feature_forward(*args)
    images = torch.zeros(1, 3, pp.crop_size, pp.crop_size)
    assert engine == "onnxruntime" and not lines and forward(images).shape == (1, 1024)


def _unknown_width_onnx(meta, path) -> str:
    """A model.onnx scoring 3 classes whose output width ONNX Runtime cannot know before running it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    ints = lambda name, v: numpy_helper.from_array(np.array(v, dtype=np.int64), name)  # noqa: E731
    nodes = [helper.make_node("ReduceMean", ["images", "hw"], ["scores"], keepdims=0),  # (N, 3)
             helper.make_node("ReduceMax", ["images"], ["peak"], keepdims=0),  # data-dependent: the width is unknown
             helper.make_node("Mul", ["peak", "zero"], ["nothing"]),
             helper.make_node("Add", ["nothing", "three"], ["end_f"]),
             helper.make_node("Cast", ["end_f"], ["end0"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["end0", "one"], ["end"]),
             helper.make_node("Slice", ["scores", "start", "end", "axis"], ["outputs"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("outputs", TensorProto.FLOAT, ["batch", "classes"])],
        [ints("hw", [2, 3]), ints("start", [0]), ints("axis", [1]), ints("one", [1]),
         numpy_helper.from_array(np.array(0, np.float32), "zero"),
         numpy_helper.from_array(np.array(3, np.float32), "three")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    entry = model.metadata_props.add()
    entry.key, entry.value = "flowerclf", json.dumps(meta)
    onnx.save(model, path)
    return path


def test_a_symbolic_output_width_that_is_not_the_classes_is_one_line(tiny_onnx, tiny_run, tmp_path):
    _, meta, _ = tiny_onnx  # two classes
    path = _unknown_width_onnx(meta, str(tmp_path / "model.onnx"))
    line = one_error_line(*_main(predict, [an_image(tiny_run[0]), path])[::2])
    assert "gives scores of shape (1, 3) for 1 image(s), but names 2 classes" in line


def test_non_finite_scores_are_refused(tiny_onnx, tiny_run, tmp_path):
    net, meta, _ = tiny_onnx
    net = copy.deepcopy(net)
    with torch.no_grad():
        net[0].bias.fill_(float("nan"))
    path = export_module(net, str(tmp_path / "model.onnx"), 8, {"flowerclf": json.dumps(meta)})
    line = one_error_line(*_main(predict, [an_image(tiny_run[0]), path])[::2])
    assert "NaN or infinite scores" in line


@pytest.mark.parametrize("text", ["[" * 200_000 + "]" * 200_000, "1" * 5000])
def test_onnx_metadata_json_that_json_cannot_take_is_one_line(tiny_onnx, tiny_run, tmp_path, text):
    net, _, _ = tiny_onnx
    path = str(tmp_path / "model.onnx")
    export_module(net, path, 8, {"flowerclf": text})
    assert "metadata is not valid JSON" in one_error_line(*_main(predict, [an_image(tiny_run[0]), path])[::2])


def _seeded_backbone():
    """The same untrained mobilenet_v3_small every call, so its export is made once a session."""
    torch.manual_seed(0)
    return build_model(ModelSpec("mobilenet_v3_small", "none", [], 0.0, 3), load_pretrained=False)


def test_the_onnx_session_ends_with_the_feature_pass(image_folder):
    model, pp = _seeded_backbone()
    images = scan_split(os.path.join(image_folder, "valid"))
    with FeaturePass(model.backbone, "mobilenet_v3_small", "none", pp, "onnxruntime", torch.device("cpu"), False,
                     4, 0, True, print) as passes:
        assert passes.engine == "onnxruntime"
        session = weakref.ref(passes.forward.session)
        assert passes.features(images, "valid")[0].shape == (9, 1024)
    gc.collect()
    assert session() is None  # passes itself is still in scope: it let go of the session


def test_no_onnx_session_is_alive_while_the_head_trains(image_folder, tmp_path, monkeypatch):
    sessions, alive_in_epochs = [], []
    open_session = engines.backbone_session

    def recorded(*args):
        session = open_session(*args)
        sessions.append(weakref.ref(session))
        return session

    def epoch(*args, **kw):  # no gc.collect(): what a real run's epochs run beside
        alive_in_epochs.append(sum(ref() is not None for ref in sessions))
        return train_head_epoch(*args, **kw)

    train_head_epoch = plans.train_head_epoch
    monkeypatch.setattr(engines, "backbone_session", recorded)
    monkeypatch.setattr(plans, "train_head_epoch", epoch)
    trainer.train(tiny_config(image_folder, tmp_path / "s", engine="onnxruntime"), log=lambda line: None)
    assert len(sessions) == 1 and alive_in_epochs == [0, 0]


def test_backbone_sessions_do_not_spin(image_folder):
    model, pp = _seeded_backbone()
    session = onnx_module.backbone_session(model.backbone, "mobilenet_v3_small", pp.crop_size,
                                           state_fingerprint(model.backbone), os.path.join(store.store_dir(), "onnx"))
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
