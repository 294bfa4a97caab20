"""Model files: checkpoint.pth (make, save atomically, read, rebuild), ours and the classic project's.

Checkpoints are plain data (tensors, numbers, strings, lists, dicts) loaded with
weights_only=True; every file is written through files.atomic_write.
"""
from __future__ import annotations

import io
import os
from collections import OrderedDict

import torch
import torchvision
from torch import nn

from flowerclf.base.errors import FlowerclfError, brief
from flowerclf.base.files import atomic_write
from flowerclf.base.schema import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    RESUME_FORMAT,
    check_classes,
    check_model_meta,
)
from flowerclf.data.transforms import Preprocess
from flowerclf.models.registry import (
    CLASSIFIER_ATTRS,
    ModelSpec,
    build_head,
    build_imagenet_model,
    build_model,
    resolve_weights,
)


def atomic_save(obj, path: str, durable: bool = True) -> None:
    """torch.save through a temp file and a rename: a crash mid-save never breaks `path` (see atomic_write)."""
    buffer = io.BytesIO()  # serialized first, so a full disk is an OSError naming the file, not torch's own
    torch.save(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()), durable)


def first_non_finite(state: dict) -> str | None:
    """The name of the first weight holding a NaN or an infinity, or None."""
    return next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def check_finite_state(state: dict, what: str) -> None:
    """Refuse a model with NaN or infinite weights: it would only ever predict nonsense."""
    bad = first_non_finite(state)
    if bad is not None:
        raise FlowerclfError(f"{what}: weight {bad} is not finite (NaN or infinite); the model is unusable")


def make_checkpoint(model: nn.Sequential, spec: ModelSpec, preprocess: Preprocess,
                    class_to_idx: dict[str, int], **extra) -> dict:
    """The checkpoint as plain data: tensors on CPU, numbers, strings, lists and dicts; never a non-finite model."""
    check_finite_state(model.state_dict(), "the model to save")
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": spec.to_dict(),
        "preprocess": preprocess.to_dict(),
        "class_to_idx": dict(class_to_idx),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def _is_classic(ckpt) -> bool:
    """A checkpoint of the classic flower-classifier project: arch name, state_dict, class mapping."""
    return (isinstance(ckpt, dict) and "format" not in ckpt and isinstance(ckpt.get("arch"), str)
            and isinstance(ckpt.get("state_dict"), dict)
            and isinstance(ckpt.get("class_to_idx", ckpt.get("label_idx")), dict))


def _classic_linears(state: dict, is_module=lambda attr: True) -> tuple[str | None, list[str]]:
    """A classic state dict's classifier attribute and the weight keys of its Linear layers, in order."""
    attr = next((a for a in CLASSIFIER_ATTRS if any(k.startswith(a + ".") for k in state) and is_module(a)), None)
    return attr, [k for k in state if attr and k.startswith(attr + ".") and k.endswith(".weight")
                  and isinstance(state[k], torch.Tensor) and state[k].dim() == 2]


def load_classic(ckpt: dict, path: str) -> tuple[nn.Sequential, dict]:
    """Rebuild a classic checkpoint: torchvision arch whose classifier is a stack of Linear layers."""
    arch, state = ckpt["arch"], ckpt["state_dict"]
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise FlowerclfError(f"{path} is a classic checkpoint for arch {arch!r}, which torchvision does not know")
    model = build_imagenet_model(arch, resolve_weights(arch, "none"))
    attr, linear = _classic_linears(state, lambda a: isinstance(getattr(model, a, None), nn.Module))
    if not linear:
        raise FlowerclfError(f"{path}: cannot find the classifier's Linear layers in its state_dict")
    layers, renamed = [], {}
    for i, key in enumerate(linear):
        out_f, in_f = state[key].shape
        layers.append(nn.Linear(in_f, out_f))
        renamed[f"{attr}.{len(layers) - 1}.weight"] = state[key]
        renamed[f"{attr}.{len(layers) - 1}.bias"] = state[key[:-len("weight")] + "bias"]
        if i < len(linear) - 1:
            layers.append(nn.ReLU())
    setattr(model, attr, nn.Sequential(*layers))
    renamed.update({k: v for k, v in state.items() if not k.startswith(attr + ".")})
    try:
        model.load_state_dict(renamed)
    except RuntimeError as e:
        raise FlowerclfError(f"{path}: its state_dict does not fit {arch} ({brief(e)})") from None
    classes = {str(k): v for k, v in ckpt.get("class_to_idx", ckpt.get("label_idx")).items()}
    check_classes(classes, layers[-1].out_features, path)
    meta = {"class_to_idx": classes, "preprocess": Preprocess(decode="full").to_dict(), "model": {"arch": arch}}
    return nn.Sequential(OrderedDict(backbone=model, head=nn.Identity())), meta


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint as data only (weights_only=True) and check it is ours (or a classic one)."""
    if os.path.isdir(path):
        raise FlowerclfError(f"checkpoint {path} is a folder; give its checkpoint.pth")
    if not os.path.isfile(path):
        raise FlowerclfError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling refused, truncated zip, not a torch file at all
        raise FlowerclfError(f"{path} is not a loadable checkpoint ({brief(e)})") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == RESUME_FORMAT:
        raise FlowerclfError(f"{path} is train.py's state for --resume; use checkpoint.pth from the same folder")
    if _is_classic(ckpt):
        return ckpt
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FlowerclfError(f"{path} is not a flowerclf checkpoint (train one with train.py)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise FlowerclfError(f"{path} has checkpoint version {ckpt.get('version')}; this flowerclf reads "
                             f"version {CHECKPOINT_VERSION}")
    if not isinstance(ckpt.get("state_dict"), dict):
        raise FlowerclfError(f"{path}: field 'state_dict' is missing; the file is damaged or not made by flowerclf")
    return check_model_meta(ckpt, path)


def load_model(path: str, device: torch.device | str = "cpu") -> tuple[nn.Sequential, dict]:
    """Rebuild the model of a checkpoint (no download) in eval mode on `device`."""
    ckpt = read_checkpoint(path, map_location="cpu")
    if _is_classic(ckpt):
        model, meta = load_classic(ckpt, path)
        return model.to(device).eval(), meta
    m = ckpt["model"]
    spec = ModelSpec(m["arch"], m["weights"], list(m["hidden_units"]), m["dropout"], m["num_classes"])
    model, _ = build_model(spec, load_pretrained=False)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as e:  # wrong shapes or keys, or values that are no tensors
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])
        raise FlowerclfError(f"{path} does not match its own architecture {spec.arch}: {detail[:300]}") from None
    check_finite_state(model.state_dict(), path)
    return model.to(device).eval(), ckpt


def read_head(path: str, spec: ModelSpec, class_to_idx: dict) -> dict:
    """--init_from: the head's state dict (keys as in model.head) of checkpoint `path`, ours or a classic one.

    The checkpoint must have been trained for the same arch, weights, hidden units and classes as
    `spec` and `class_to_idx`; only its head is taken (a fine-tuned backbone of that run is not).
    """
    where = f"--init_from {path}"
    try:
        ckpt = read_checkpoint(path)
    except FlowerclfError as e:
        raise FlowerclfError(f"--init_from: {e}") from None
    if _is_classic(ckpt):
        state = ckpt["state_dict"]
        _, linear = _classic_linears(state)
        if not linear:
            raise FlowerclfError(f"{where}: cannot find the classifier's Linear layers in its state_dict")
        theirs = {"arch": ckpt["arch"], "weights": spec.weights,  # a classic checkpoint names no weights
                  "hidden_units": [state[k].shape[0] for k in linear[:-1]]}
        classes = {str(k): v for k, v in ckpt.get("class_to_idx", ckpt.get("label_idx")).items()}
    else:
        theirs, state, classes = ckpt["model"], ckpt["state_dict"], ckpt["class_to_idx"]
        linear = [k for k in state if k.startswith("head.") and k.endswith(".weight")]
    for key, flag in (("arch", "--arch"), ("weights", "--weights"), ("hidden_units", "--hidden_units")):
        mine = getattr(spec, key)
        if theirs.get(key) != mine:
            said = " ".join(map(str, theirs.get(key) or [0])) if key == "hidden_units" else theirs.get(key)
            raise FlowerclfError(f"{where}: that run's {key.replace('_', ' ')} is {theirs.get(key)}, this run's "
                                 f"{mine}; pass {flag} {said}, or init from a run made with {flag} {mine}")
    if classes != class_to_idx:
        raise FlowerclfError(f"{where}: that run's classes {sorted(classes)[:8]} are not DATA_DIR's "
                             f"{sorted(class_to_idx)[:8]}; init from a run on the same class folders")
    if not linear or not isinstance(state[linear[0]], torch.Tensor) or state[linear[0]].dim() != 2:
        raise FlowerclfError(f"{where}: its head has no Linear layer; the file is damaged")
    # a head as `spec` builds it, for the first layer's width in the file: the layers' places, and a shape check
    head = build_head(state[linear[0]].shape[1], spec.hidden_units, spec.dropout, spec.num_classes)
    places = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)]
    weights = {f"{i}.{kind}": state.get(key[:-len("weight")] + kind)
               for i, key in zip(places, linear) for kind in ("weight", "bias")}
    load_head(head, weights, path)
    return head.state_dict()


def load_head(head: nn.Module, state: dict, path: str) -> None:
    """Load read_head's state into `head`; a head of another shape is one line naming the file."""
    try:
        head.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as e:
        raise FlowerclfError(f"--init_from {path}: its head does not fit this model ({brief(e)}); "
                             f"train without --init_from") from None
    check_finite_state(head.state_dict(), f"--init_from {path}")
