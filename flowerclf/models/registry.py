"""The backbone registry: any torchvision classifier or efficientnet_lite0, its weights, a new head, freezing stages."""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import nn

from flowerclf.base.errors import FlowerclfError, brief
from flowerclf.data.transforms import Preprocess
from flowerclf.models.lite import EXTRA_ARCHS, check_state_matches
from flowerclf.models.names import check_arch

# Where a model keeps its ImageNet classifier; the 1000-way layer is the last
# Linear/Conv2d inside it (a bare Linear, or e.g. vgg's Sequential, squeezenet's conv).
CLASSIFIER_ATTRS = ("classifier", "fc", "heads", "head")

# Constructor arguments that torchvision's builders derive from their weights;
# we build with weights=None and load the state ourselves, so we pass them explicitly.
# Keyed by name prefix; each maps the reference weights to kwargs.
ARCH_KWARGS: dict[str, Callable] = {
    "inception_v3": lambda w: {"aux_logits": False, "transform_input": True, "init_weights": False},
    "googlenet": lambda w: {"aux_logits": False, "transform_input": True, "init_weights": False},
    "vit_": lambda w: {"image_size": w.meta["min_size"][0]},
    "maxvit_": lambda w: {"input_size": w.meta["min_size"]},
}
# Pretrained keys of auxiliary classifiers that we drop together with the aux heads.
AUX_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")


def list_archs() -> list[str]:
    """Every architecture --arch accepts."""
    return sorted(torchvision.models.list_models(module=torchvision.models) + list(EXTRA_ARCHS))


def _check_arch(arch: str) -> None:
    if arch not in EXTRA_ARCHS and arch not in torchvision.models.list_models(module=torchvision.models):
        check_arch(arch)  # one line with the closest names
        raise FlowerclfError(f"unknown --arch {arch!r} (python train.py --list_archs lists the names)")


def _is_path_spec(spec: str) -> bool:
    return spec.endswith((".pth", ".pt", ".bin")) or os.sep in spec


@dataclass(frozen=True)
class WeightsChoice:
    """A resolved --weights value. `ref` names the torchvision weights that set preprocessing."""

    spec: str          # "IMAGENET1K_V1", "DEFAULT" (lite0), "none", or a file path
    ref: str | None    # torchvision weights enum name used for preprocessing and builder kwargs

    @property
    def pretrained(self) -> bool:
        return self.spec.lower() != "none"


def resolve_weights(arch: str, spec: str = "DEFAULT") -> WeightsChoice:
    """Turn a --weights value into a concrete choice, without loading anything."""
    _check_arch(arch)
    if arch in EXTRA_ARCHS:
        if spec.upper() == "DEFAULT" or spec.lower() == "none" or _is_path_spec(spec):
            return WeightsChoice("DEFAULT" if spec.upper() == "DEFAULT" else spec, None)
        raise FlowerclfError(f"--weights {spec!r}: {arch} takes DEFAULT, none, or a .pth path")
    enum = torchvision.models.get_model_weights(arch)
    if spec.lower() == "none" or _is_path_spec(spec):
        return WeightsChoice(spec, enum.DEFAULT.name)
    name = spec.split(".")[-1]  # accept "ResNet50_Weights.IMAGENET1K_V2" too
    if name.upper() == "DEFAULT":
        return WeightsChoice(enum.DEFAULT.name, enum.DEFAULT.name)
    if name not in enum.__members__:
        raise FlowerclfError(f"--weights {spec!r} is not a weight of {arch}; choose one of: "
                             f"DEFAULT, {', '.join(enum.__members__)}, none, or a .pth path")
    return WeightsChoice(name, name)


def default_preprocess(arch: str, weights: WeightsChoice) -> Preprocess:
    """Preprocessing the chosen weights were trained with."""
    if arch in EXTRA_ARCHS:
        return EXTRA_ARCHS[arch].preprocess
    t = torchvision.models.get_model_weights(arch)[weights.ref].transforms()
    return Preprocess(t.resize_size[0], t.crop_size[0], tuple(t.mean), tuple(t.std), t.interpolation.value)


def build_imagenet_model(arch: str, weights: WeightsChoice) -> nn.Module:
    """The architecture with its original classifier, randomly initialised (no download)."""
    if arch in EXTRA_ARCHS:
        import timm  # only the archs that need it pay for the import
        return timm.create_model(EXTRA_ARCHS[arch].timm_name, pretrained=False)
    ref = torchvision.models.get_model_weights(arch)[weights.ref]
    kwargs = next((f(ref) for prefix, f in ARCH_KWARGS.items() if arch.startswith(prefix)), {})
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def _download_error(arch: str, weights: WeightsChoice, err: Exception) -> FlowerclfError:
    ref = torchvision.models.get_model_weights(arch)[weights.ref]
    fname = os.path.basename(ref.url)
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
    return FlowerclfError(
        f"could not download {arch} weights {fname} ({err}); place the file at {hub} "
        f"(or set TORCH_HOME), or pass --weights PATH to a local state dict, or use "
        f"--arch efficientnet_lite0 (weights ship with pip), or --weights none")


def load_state_file(path: str) -> dict:
    """Read a state dict saved with torch.save, as plain data only."""
    if not os.path.isfile(path):
        raise FlowerclfError(f"--weights {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncation, zip errors: all mean "not a usable file"
        raise FlowerclfError(f"{path} is not a readable state dict ({brief(e)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FlowerclfError(f"{path} does not hold a state dict of tensors")
    return state


def pretrained_state(arch: str, weights: WeightsChoice, model: nn.Module) -> dict | None:
    """The ImageNet state dict for `model`, from torch hub, a local file or a package."""
    if not weights.pretrained:
        return None
    if _is_path_spec(weights.spec):
        state = load_state_file(weights.spec)
        if arch in EXTRA_ARCHS and any(k.startswith("_blocks.") for k in state):
            state = EXTRA_ARCHS[arch].rename(state, model)
    elif arch in EXTRA_ARCHS:
        extra = EXTRA_ARCHS[arch]
        state = extra.rename(torch.load(extra.weights_file(), map_location="cpu", weights_only=True), model)
    else:
        ref = torchvision.models.get_model_weights(arch)[weights.ref]
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # a silent proxy must not hang the run
        try:
            if not os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(ref.url))):
                # reach the server first: torch prints "Downloading: URL" before it fails, above our error line
                urllib.request.urlopen(urllib.request.Request(ref.url, method="HEAD")).close()
            state = ref.get_state_dict(progress=True, check_hash=True)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise _download_error(arch, weights, e) from None
        finally:
            socket.setdefaulttimeout(old_timeout)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(AUX_PREFIXES)}
    check_state_matches(state, model, f"weights {weights.spec} for {arch}")
    return state


def _final_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """Qualified name and module of the ImageNet output layer."""
    for attr in CLASSIFIER_ATTRS:
        clf = getattr(model, attr, None)
        if isinstance(clf, nn.Module):
            layers = [(n, m) for n, m in clf.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            if layers:
                name, layer = layers[-1]
                return (f"{attr}.{name}" if name else attr), layer
    raise FlowerclfError(f"{type(model).__name__} has no classifier in {CLASSIFIER_ATTRS}")


def strip_classifier(model: nn.Module) -> int:
    """Replace the ImageNet output layer with Identity in place; return the feature width."""
    name, layer = _final_layer(model)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, nn.Identity())
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def build_head(in_features: int, hidden_units: list[int], dropout: float, num_classes: int) -> nn.Sequential:
    """MLP head: one Linear-ReLU-Dropout per hidden size, then the output Linear."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden_units:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = h
    if not hidden_units and dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model; stored in checkpoints as plain values."""

    arch: str
    weights: str
    hidden_units: list[int]
    dropout: float
    num_classes: int

    def to_dict(self) -> dict:
        return dict(arch=self.arch, weights=self.weights, hidden_units=list(self.hidden_units),
                    dropout=float(self.dropout), num_classes=int(self.num_classes))


def build_model(spec: ModelSpec, load_pretrained: bool = True) -> tuple[nn.Sequential, Preprocess]:
    """Backbone (pretrained unless told not to) + new head, as Sequential(backbone=, head=)."""
    weights = resolve_weights(spec.arch, spec.weights)
    backbone = build_imagenet_model(spec.arch, weights)
    if load_pretrained:
        state = pretrained_state(spec.arch, weights, backbone)
        if state is not None:
            backbone.load_state_dict(state)
    dim = strip_classifier(backbone)
    head = build_head(dim, spec.hidden_units, spec.dropout, spec.num_classes)
    return nn.Sequential(OrderedDict(backbone=backbone, head=head)), default_preprocess(spec.arch, weights)


def freeze(module: nn.Module) -> None:
    """Stop gradients for every parameter of `module`."""
    for p in module.parameters():
        p.requires_grad_(False)
