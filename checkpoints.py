"""Model files: checkpoint.pth and checkpoint_last.pth (save, read, rebuild) and model.onnx export.

Checkpoints are plain data (tensors, numbers, strings, lists, dicts) loaded with
weights_only=True; every file is written through files.atomic_write.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections import OrderedDict

import torch
import torchvision
from torch import nn

import model_utils as mu
from data_utils import Preprocess
from errors import FlowerclfError, brief
from files import atomic_write
from schema import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, ONNX_METADATA_KEY, RESUME_FORMAT, check_classes,
                    check_model_meta)


def atomic_save(obj, path: str) -> None:
    """torch.save through a temp file and a rename: a crash mid-save never breaks `path`."""
    buffer = io.BytesIO()  # serialized first, so a full disk is an OSError naming the file, not torch's own
    torch.save(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def first_non_finite(state: dict) -> str | None:
    """The name of the first weight holding a NaN or an infinity, or None."""
    return next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def check_finite_state(state: dict, what: str) -> None:
    """Refuse a model with NaN or infinite weights: it would only ever predict nonsense."""
    bad = first_non_finite(state)
    if bad is not None:
        raise FlowerclfError(f"{what}: weight {bad} is not finite (NaN or infinite); the model is unusable")


def make_checkpoint(model: nn.Sequential, spec: mu.ModelSpec, preprocess: Preprocess,
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


def load_classic(ckpt: dict, path: str) -> tuple[nn.Sequential, dict]:
    """Rebuild a classic checkpoint: torchvision arch whose classifier is a stack of Linear layers."""
    arch, state = ckpt["arch"], ckpt["state_dict"]
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise FlowerclfError(f"{path} is a classic checkpoint for arch {arch!r}, which torchvision does not know")
    model = mu.build_imagenet_model(arch, mu.resolve_weights(arch, "none"))
    attr = next((a for a in mu.CLASSIFIER_ATTRS if any(k.startswith(a + ".") for k in state)
                 and isinstance(getattr(model, a, None), nn.Module)), None)
    linear = [k for k in state if attr and k.startswith(attr + ".") and k.endswith(".weight") and state[k].dim() == 2]
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
    meta = {"class_to_idx": classes, "preprocess": Preprocess().to_dict(), "model": {"arch": arch}}
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
    spec = mu.ModelSpec(m["arch"], m["weights"], list(m["hidden_units"]), m["dropout"], m["num_classes"])
    model, _ = mu.build_model(spec, load_pretrained=False)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as e:  # wrong shapes or keys, or values that are no tensors
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])
        raise FlowerclfError(f"{path} does not match its own architecture {spec.arch}: {detail[:300]}") from None
    check_finite_state(model.state_dict(), path)
    return model.to(device).eval(), ckpt


def export_onnx(module: nn.Module, path: str, crop_size: int, metadata: dict | None = None) -> str:
    """Export `module` (images -> outputs) to one self-contained ONNX file with a dynamic batch axis, atomically."""
    module = module.eval().to(device="cpu", memory_format=torch.contiguous_format)
    example = (torch.randn(2, 3, crop_size, crop_size),)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, example, None, dynamo=True, input_names=["images"],
                                    output_names=["outputs"], verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    proto = program.model_proto  # weights inside, so no side file can go missing
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    return path


def export_checkpoint_onnx(checkpoint: str, out: str | None = None) -> str:
    """model.onnx (backbone + head) next to a checkpoint, with what prediction needs in its metadata."""
    model, ckpt = load_model(checkpoint, "cpu")
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "model.onnx")
    meta = {key: ckpt[key] for key in ("format", "version", "model", "preprocess", "class_to_idx")}
    try:
        return export_onnx(model, out, ckpt["preprocess"]["crop_size"], {ONNX_METADATA_KEY: json.dumps(meta)})
    except FlowerclfError:
        raise
    except Exception as e:  # exporter failures are many and varied; all mean "this arch does not export"
        raise FlowerclfError(f"ONNX export of {ckpt['model']['arch']} failed ({brief(e)})") from None


# ---------------------------------------------------------------- resume state

def resume_state(trainable: dict, stateful: dict, generator: torch.Tensor, spec: mu.ModelSpec,
                 class_to_idx: dict, epoch: int, history: list, best: dict, args: dict) -> dict:
    """checkpoint_last.pth: everything needed to continue exactly where this epoch ended (plain data)."""
    return {
        "format": RESUME_FORMAT, "version": CHECKPOINT_VERSION, "model": spec.to_dict(),
        "class_to_idx": dict(class_to_idx), "unfreeze": args["unfreeze"], "epoch": epoch, "history": history,
        "best": {k: best[k] for k in ("epoch", "acc", "loss")}, "best_state": best["state"],
        "trained_state": trainable, "stateful": stateful, "generator": generator, "rng": torch.get_rng_state(),
        "args": args,
    }


RESUME_FIELDS = {"epoch": int, "history": list, "best": dict, "trained_state": dict, "stateful": dict,
                 "generator": torch.Tensor, "rng": torch.Tensor, "class_to_idx": dict, "model": dict}


def read_resume(path: str, spec: mu.ModelSpec, class_to_idx: dict, unfreeze) -> dict:
    """Load checkpoint_last.pth and check it continues this run (same classes and model flags)."""
    if not os.path.isfile(path):
        raise FlowerclfError(f"--resume: {path} does not exist; train without --resume first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusals, truncation: all mean "cannot resume from this"
        raise FlowerclfError(f"--resume: {path} is not loadable ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise FlowerclfError(f"--resume: {path} is not a train.py resume state")
    for key, kind in RESUME_FIELDS.items():
        if not isinstance(state.get(key), kind):
            raise FlowerclfError(f"--resume: {path}: field '{key}' is missing or not {kind.__name__}; the file is "
                                 f"damaged; train again with --overwrite")
    if state["class_to_idx"] != class_to_idx:
        raise FlowerclfError(f"--resume: {path} was made for classes {sorted(state['class_to_idx'])[:8]}, "
                             f"but the data has {sorted(class_to_idx)[:8]}; use another --save_dir")
    if state["model"] != spec.to_dict() or state["unfreeze"] != unfreeze:
        raise FlowerclfError(f"--resume: {path} was made with other model settings ({state['model']}, "
                             f"unfreeze {state['unfreeze']}); pass the same --arch, --weights, "
                             f"--hidden_units, --dropout and --unfreeze")
    return state
