"""Backbone registry, heads, freezing, devices and checkpoints."""
import io
import os
import urllib.error
import zipfile
from types import SimpleNamespace

import pytest
import torch
import torchvision
from matplotlib import cbook
from torch import nn

import checkpoints
import data_utils as du
import devices
import loops
import model_utils as mu
import schema
from errors import FlowerclfError

TV_ARCHS = torchvision.models.list_models(module=torchvision.models)


def _spec(arch="mobilenet_v3_small", hidden=(8,), classes=3, weights="none"):
    return mu.ModelSpec(arch, weights, list(hidden), 0.1, classes)


@pytest.mark.parametrize("arch", TV_ARCHS + ["efficientnet_lite0"])
def test_every_arch_gets_a_head_of_the_right_shape(arch):
    spec = _spec(arch, hidden=(16,), classes=7)
    pp = mu.default_preprocess(arch, mu.resolve_weights(arch, "none"))
    try:  # the meta device skips allocation; regnet's builder needs real tensors to size itself
        with torch.device("meta"):
            model, _ = mu.build_model(spec, load_pretrained=False)
            out = model.eval()(torch.empty(2, 3, pp.crop_size, pp.crop_size))
    except NotImplementedError:
        model, _ = mu.build_model(spec, load_pretrained=False)
        with torch.inference_mode():  # convolutional with adaptive pooling: any size works
            out = model.eval()(torch.zeros(2, 3, 32, 32))
    assert tuple(out.shape) == (2, 7)
    assert isinstance(model.head[-1], nn.Linear) and model.head[-1].out_features == 7
    # the ImageNet output layer is gone: nothing in the backbone still produces 1000 classes
    assert not any(getattr(m, "out_features", None) == 1000 or getattr(m, "out_channels", None) == 1000
                   for m in model.backbone.modules())


def test_lite0_imagenet_top5_on_grace_hopper():
    """The offline weights are right: Grace Hopper's uniform is in the top 5 (class 652)."""
    arch = "efficientnet_lite0"
    weights = mu.resolve_weights(arch, "DEFAULT")
    model = mu.build_imagenet_model(arch, weights)
    model.load_state_dict(mu.pretrained_state(arch, weights, model))
    img = du.load_rgb(cbook.get_sample_data("grace_hopper.jpg"))
    x = torch.from_numpy(du.preprocess_image(img, mu.default_preprocess(arch, weights)))[None]
    with torch.inference_mode():
        top5 = model.eval()(x).topk(5).indices[0].tolist()
    assert 652 in top5


def test_lite0_renaming_checks_keys_and_shapes():
    import timm
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(mu._lite0_weights_file(), map_location="cpu", weights_only=True)
    assert set(mu.rename_lite0_state(state, model)) == set(model.state_dict())
    bad = dict(state)
    bad["_blocks.3._project_conv.weight"] = torch.zeros(1)
    with pytest.raises(FlowerclfError, match="shape"):
        mu.rename_lite0_state(bad, model)
    bad = dict(state, **{"_blocks.3._mystery.weight": torch.zeros(1)})
    with pytest.raises(FlowerclfError, match="unexpected key"):
        mu.rename_lite0_state(bad, model)


def test_weights_resolution():
    assert mu.resolve_weights("resnet50", "DEFAULT").spec == "IMAGENET1K_V2"
    assert mu.resolve_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V1").spec == "IMAGENET1K_V1"
    assert not mu.resolve_weights("resnet50", "none").pretrained
    with pytest.raises(FlowerclfError, match="IMAGENET1K_V1"):
        mu.resolve_weights("resnet50", "IMAGENET9K")
    with pytest.raises(FlowerclfError, match="unknown --arch 'resnet5'"):
        mu.resolve_weights("resnet5", "DEFAULT")
    # preprocessing follows the weights: vit_h_14's SWAG weights want 518 pixels, bicubic
    pp = mu.default_preprocess("vit_h_14", mu.resolve_weights("vit_h_14", "DEFAULT"))
    assert (pp.crop_size, pp.interpolation) == (518, "bicubic")


def test_local_weights_file_is_loaded(tmp_path):
    ref = torchvision.models.get_model("resnet18", weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model, _ = mu.build_model(_spec("resnet18", weights=str(path)))
    assert torch.equal(model.backbone.conv1.weight, ref.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(FlowerclfError, match="do not fit the model"):
        mu.build_model(_spec("resnet18", weights=str(path)))


def test_download_failure_names_the_file_and_the_alternatives(monkeypatch, tmp_path):
    def offline(self, *a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FlowerclfError) as err:
        mu.build_model(_spec("densenet121", weights="DEFAULT"))
    msg = str(err.value)
    assert "densenet121-a639ec97.pth" in msg
    assert os.path.join(str(tmp_path), "hub", "checkpoints") in msg
    assert "--weights PATH" in msg and "efficientnet_lite0" in msg


def test_training_step_changes_only_the_head():
    torch.manual_seed(0)
    model, _ = mu.build_model(_spec())
    mu.freeze(model.backbone)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.backbone.eval()
    model.head.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == k.startswith("head."), k


def _tiny_checkpoint():
    torch.manual_seed(0)
    model, pp = mu.build_model(_spec())
    return model, checkpoints.make_checkpoint(model.eval(), _spec(), pp, {"a": 0, "b": 1, "c": 2}, epoch=1)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model, ckpt = _tiny_checkpoint()
    path = str(tmp_path / "checkpoint.pth")
    checkpoints.atomic_save(ckpt, path)
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temp file left behind
    loaded, data = checkpoints.load_model(path)
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
    loaded, _ = checkpoints.load_model(path, "cpu")
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
        checkpoints.read_checkpoint(str(evil))
    assert not marker.exists()
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(FlowerclfError, match="not a flowerclf checkpoint"):
        checkpoints.read_checkpoint(str(other))
    buf = io.BytesIO()
    torch.save(_tiny_checkpoint()[1], buf)
    (tmp_path / "cut.pth").write_bytes(buf.getvalue()[:5000])
    with pytest.raises(FlowerclfError, match="not a loadable checkpoint"):
        checkpoints.read_checkpoint(str(tmp_path / "cut.pth"))


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("cpu").type == "cpu"
    with pytest.raises(FlowerclfError, match="no CUDA device"):
        devices.resolve_device("auto", gpu=True)
    with pytest.raises(FlowerclfError, match="--gpu asks for CUDA"):
        devices.resolve_device("cpu", gpu=True)


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_amp_is_bf16_only_on_gpus_with_native_bf16(monkeypatch, capability, dtype):
    # a CUDA machine whose GPU can make (emulated) bf16 tensors, as an sm_75 T4 or RTX 20xx can
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=capability[0], minor=capability[1]))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)
    assert devices.amp_dtype(torch.device("cuda")) == dtype  # fp16: the GradScaler path of train.py --amp
    assert devices.amp_dtype(torch.device("cuda", 0)) == dtype
    assert devices.amp_dtype(torch.device("cpu")) == torch.bfloat16


def test_head_shapes():
    assert [type(m) for m in mu.build_head(10, [], 0.0, 3)] == [nn.Linear]
    head = mu.build_head(10, [8, 4], 0.5, 3)
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [8, 4, 3]


def test_metrics_from_logits():
    logits = torch.tensor([[3.0, 2, 1, 0, -1, -2], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    m = loops.metrics_from_logits(logits, torch.tensor([0, 0, 5]))
    assert m["acc"] == pytest.approx(1 / 3)
    assert m["top5"] == pytest.approx(1 / 3)  # only the first is in its top 5
