"""The plain-data formats flowerclf writes (checkpoint, resume state, model.onnx metadata) and their checks.

Torch-free, so the inference-only install checks model.onnx metadata the same way. A file is
data from anywhere: every field is checked before use and the first wrong one is named.
"""
from __future__ import annotations

import math
from typing import Callable

from flowerclf.base.errors import FlowerclfError

CHECKPOINT_FORMAT = "flowerclf-checkpoint"
CHECKPOINT_VERSION = 1
RESUME_FORMAT = "flowerclf-resume"  # checkpoint_last.pth: train.py --resume state, not for predict
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# How a JPEG is decoded before the transform (data.transforms.decode_size): "full" pixels, as every file without
# the field was; "draft", libjpeg's DCT scaling down to the smallest scale that still covers what the transform uses;
# "draft2", the same with twice the eval transform's resize (new models: Pillow's own reducing_gap=2.0)
DECODE_RULES = ("full", "draft", "draft2")
DEVICES = ("auto", "cpu", "cuda", "mps")  # --device, and TrainConfig.device in a checkpoint's args
MAX_SIDE = 4096           # pixels: larger resize or crop sizes are damage, not a model
MAX_HIDDEN_UNITS = 65536


def _whole(low: int, high: int) -> tuple[Callable, str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high,
            f"a whole number from {low} to {high}")


def _triple(v) -> bool:
    return (isinstance(v, list) and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))


PREPROCESS_FIELDS = {
    "resize_size": _whole(1, MAX_SIDE),
    "crop_size": _whole(1, MAX_SIDE),
    "mean": (_triple, "a list of 3 finite numbers"),
    "std": (lambda v: _triple(v) and min(v) > 0, "a list of 3 positive numbers"),
    "interpolation": (lambda v: v in INTERPOLATIONS, f"one of {', '.join(INTERPOLATIONS)}"),
}
OPTIONAL_PREPROCESS_FIELDS = {  # absent in older files, which mean the first value of each
    "decode": (lambda v: v in DECODE_RULES, f"one of {', '.join(DECODE_RULES)} (a newer flowerclf may know more)"),
}
MODEL_FIELDS = {
    "arch": (lambda v: isinstance(v, str) and v != "", "an architecture name"),
    "weights": (lambda v: isinstance(v, str), "a weights name or path"),
    "hidden_units": (lambda v: isinstance(v, list) and all(_whole(1, MAX_HIDDEN_UNITS)[0](h) for h in v),
                     f"a list of whole numbers from 1 to {MAX_HIDDEN_UNITS}"),
    "dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                "a number in [0, 1)"),
    "num_classes": _whole(1, 10 ** 6),
}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


CALIBRATION_FIELDS = {  # optional: a checkpoint without it (older ones, the classic project's) predicts at T = 1
    "temperature": (lambda v: _number(v) and 0 < v <= 1000, "a number in (0, 1000]"),
    "threshold": (lambda v: _number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "kept": (lambda v: _number(v) and 0 < v <= 1, "a share in (0, 1]"),
}


def _check(section, fields: dict, name: str, where: str, optional: dict | None = None) -> None:
    if not isinstance(section, dict):
        raise FlowerclfError(f"{where}: field '{name}' is {type(section).__name__}, expected an object; "
                             f"the file is damaged or not made by flowerclf")
    for key, (ok, expected) in fields.items():
        if key not in section:
            raise FlowerclfError(f"{where}: field '{name}.{key}' is missing; the file is damaged or not made "
                                 f"by flowerclf")
        if not ok(section[key]):
            raise FlowerclfError(f"{where}: field '{name}.{key}' is {section[key]!r:.60}, expected {expected}")
    for key, (ok, expected) in (optional or {}).items():
        if key in section and not ok(section[key]):
            raise FlowerclfError(f"{where}: field '{name}.{key}' is {section[key]!r:.60}, expected {expected}")


def check_classes(class_to_idx, num_classes: int | None, where: str) -> None:
    """class_to_idx maps class names to the output indices 0..N-1, each used once."""
    if not isinstance(class_to_idx, dict) or not class_to_idx:
        raise FlowerclfError(f"{where}: field 'class_to_idx' is {type(class_to_idx).__name__}, expected an "
                             f"object mapping class names to indices")
    values = list(class_to_idx.values())
    n = num_classes if num_classes is not None else len(values)
    if (not all(isinstance(k, str) for k in class_to_idx)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            or sorted(values) != list(range(n))):
        raise FlowerclfError(f"{where}: field 'class_to_idx' does not map {n} class names onto the indices "
                             f"0..{n - 1} (it has {len(values)} entries)")


def check_model_meta(meta, where: str, full: bool = True) -> dict:
    """Check a checkpoint's or model.onnx's description (model, class_to_idx, preprocess, calibration); return it.

    `full` is False for the classic project's checkpoints, which carry only an arch name.
    """
    if not isinstance(meta, dict):
        raise FlowerclfError(f"{where}: its flowerclf description is {type(meta).__name__}, expected an object")
    model_fields = MODEL_FIELDS if full else {"arch": MODEL_FIELDS["arch"]}
    _check(meta.get("model"), model_fields, "model", where)
    check_classes(meta.get("class_to_idx"), meta["model"].get("num_classes") if full else None, where)
    _check(meta.get("preprocess"), PREPROCESS_FIELDS, "preprocess", where, OPTIONAL_PREPROCESS_FIELDS)
    if "calibration" in meta:
        _check(meta["calibration"], CALIBRATION_FIELDS, "calibration", where)
    return meta
