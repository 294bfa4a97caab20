"""Checkpoints: plain data round trips, CUDA-saved files, and every damaged or foreign file refused in one line."""
import io
import json
import os
import zipfile
from collections import OrderedDict

import pytest
import torch
import torchvision
from conftest import an_image, mutate, one_error_line, tiny_spec
from conftest import run_script as _main
from torch import nn

import predict
from flowerclf.base import schema
from flowerclf.base.errors import FlowerclfError
from flowerclf.data.images import load_rgb
from flowerclf.data.transforms import Preprocess, preprocess_image
from flowerclf.models.checkpoints import (
    atomic_save,
    load_model,
    make_checkpoint,
    read_checkpoint,
)
from flowerclf.models.registry import (
    build_model,
)


def _tiny_checkpoint():
    torch.manual_seed(0)
    model, pp = build_model(tiny_spec())
    return model, make_checkpoint(model.eval(), tiny_spec(), pp, {"a": 0, "b": 1, "c": 2}, epoch=1)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model, ckpt = _tiny_checkpoint()
    path = str(tmp_path / "checkpoint.pth")
    atomic_save(ckpt, path)
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temp file left behind
    loaded, data = load_model(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    assert data["class_to_idx"] == {"a": 0, "b": 1, "c": 2}


def _as_if_saved_on_cuda(path):
    """Rewrite a torch.save zip so its storages say they live on cuda:0."""
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    assert b"X\x03\x00\x00\x00cpu" in entries[pkl]
    entries[pkl] = entries[pkl].replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a GPU checkpoint on a CPU-only machine")
def test_gpu_saved_checkpoint_loads_on_cpu(tmp_path):
    model, ckpt = _tiny_checkpoint()
    path = str(tmp_path / "gpu.pth")
    torch.save(ckpt, path)
    _as_if_saved_on_cuda(path)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # proof the file really claims CUDA storages
    loaded, _ = load_model(path, "cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_foreign_and_hostile_files_are_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pth"
    torch.save({"format": schema.CHECKPOINT_FORMAT, "x": Evil()}, evil)
    with pytest.raises(FlowerclfError, match="not a loadable checkpoint"):
        read_checkpoint(str(evil))
    assert not marker.exists()
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(FlowerclfError, match="not a flowerclf checkpoint"):
        read_checkpoint(str(other))
    buf = io.BytesIO()
    torch.save(_tiny_checkpoint()[1], buf)
    (tmp_path / "cut.pth").write_bytes(buf.getvalue()[:5000])
    with pytest.raises(FlowerclfError, match="not a loadable checkpoint"):
        read_checkpoint(str(tmp_path / "cut.pth"))


def test_a_non_finite_checkpoint_is_refused(tiny_run, tmp_path):
    data, save = tiny_run
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    ckpt["state_dict"]["head.0.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pth")
    line = one_error_line(*_main(predict, [an_image(data), str(tmp_path / "nan.pth")])[::2])
    assert "head.0.weight is not finite" in line


@pytest.mark.parametrize("field, value", [
    ("preprocess", KeyError), ("model.hidden_units", KeyError), ("class_to_idx", ["1", "2", "3"]),
    ("class_to_idx", {"1": 0, "2": 1}), ("preprocess.interpolation", "lanczos"), ("preprocess.crop_size", 0),
    ("preprocess.decode", "magic"), ("preprocess.decode", None),
    ("calibration.temperature", 0.0), ("calibration.temperature", float("nan")), ("calibration.threshold", 1.5),
    ("calibration.kept", KeyError), ("calibration", "warm")])
def test_malformed_checkpoints_name_the_field(tiny_run, tmp_path, field, value):
    data, save = tiny_run
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    mutate(ckpt, field, value)
    torch.save(ckpt, tmp_path / "bad.pth")
    line = one_error_line(*_main(predict, [an_image(data), str(tmp_path / "bad.pth")])[::2])
    assert f"field '{field.split('.')[0] if field == 'class_to_idx' else field}" in line


def test_a_wrong_shape_state_dict_says_which_weight(tiny_run, tmp_path):
    data, save = tiny_run
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    ckpt["state_dict"]["head.0.weight"] = torch.zeros(8, 7)
    torch.save(ckpt, tmp_path / "shape.pth")
    assert "size mismatch for head.0.weight" in one_error_line(*_main(predict, [an_image(data),
                                                                                 str(tmp_path / "shape.pth")])[::2])


def test_other_version_is_refused(tmp_path):
    path = tmp_path / "future.pth"
    torch.save({"format": schema.CHECKPOINT_FORMAT, "version": 99}, path)
    with pytest.raises(FlowerclfError, match="version 99"):
        read_checkpoint(str(path))


def test_a_checkpoint_records_its_decode_rule_and_one_without_reads_as_full(tmp_path):
    _, ckpt = _tiny_checkpoint()
    assert ckpt["preprocess"]["decode"] == "draft2"
    del ckpt["preprocess"]["decode"]  # as every checkpoint made before the rule was
    atomic_save(ckpt, str(tmp_path / "old.pth"))
    _, old = load_model(str(tmp_path / "old.pth"))
    assert Preprocess.from_dict(old["preprocess"]).decode == "full"


def test_classic_checkpoint_predicts(image_folder, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None)
    model.fc = nn.Sequential(OrderedDict([("fc1", nn.Linear(512, 32)), ("relu", nn.ReLU()),
                                          ("drop", nn.Dropout(0.2)), ("fc2", nn.Linear(32, 3)),
                                          ("output", nn.LogSoftmax(dim=1))]))
    path = tmp_path / "classic.pth"
    torch.save({"arch": "resnet18", "hidden_units": 32, "state_dict": model.state_dict(),
                "class_to_idx": {"1": 0, "2": 1, "3": 2}}, path)
    image = os.path.join(image_folder, "test", "2", "2_0.png")
    code, out, err = _main(predict, [image, str(path), "--json"])
    assert code == 0, err
    probs = {p["class"]: p["probability"] for p in json.loads(out)[0]["predictions"]}
    assert Preprocess.from_dict(load_model(str(path))[1]["preprocess"]).decode == "full"  # as it was trained
    x = torch.from_numpy(preprocess_image(load_rgb(image), Preprocess()))[None]
    with torch.inference_mode():
        expected = model.eval()(x).exp()[0]
    for cls, i in {"1": 0, "2": 1, "3": 2}.items():
        assert probs[cls] == pytest.approx(expected[i].item(), abs=1e-5)
