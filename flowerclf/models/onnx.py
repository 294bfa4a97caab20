"""ONNX files: exporting a module or a checkpoint, opening a session, and the flowerclf metadata model.onnx carries.

Torch-free to import: an export imports torch and onnx when it runs; a session needs only onnxruntime,
so the inference-only install predicts from model.onnx.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import warnings

from flowerclf.base.errors import FlowerclfError, brief
from flowerclf.base.files import atomic_write
from flowerclf.base.schema import check_model_meta

METADATA_KEY = "flowerclf"  # the metadata_props entry holding the checkpoint's plain-data description


def export_module(module, path: str, crop_size: int, metadata: dict | None = None) -> str:
    """Export `module` (images -> outputs) to one self-contained ONNX file with a dynamic batch axis, atomically."""
    import torch

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


def export_checkpoint(checkpoint: str, out: str | None = None) -> str:
    """model.onnx (backbone + head) next to a checkpoint, with what prediction needs in its metadata."""
    from flowerclf.models.checkpoints import load_model

    model, ckpt = load_model(checkpoint, "cpu")
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "model.onnx")
    meta = {key: ckpt[key] for key in ("format", "version", "model", "preprocess", "class_to_idx")}
    if "calibration" in ckpt:  # optional: without it prediction uses the raw softmax
        meta["calibration"] = ckpt["calibration"]
    try:
        return export_module(model, out, ckpt["preprocess"]["crop_size"], {METADATA_KEY: json.dumps(meta)})
    except FlowerclfError:
        raise
    except Exception as e:  # exporter failures are many and varied; all mean "this arch does not export"
        raise FlowerclfError(f"ONNX export of {ckpt['model']['arch']} failed ({brief(e)})") from None


def open_session(path: str):
    """An ONNX Runtime session on the CPU provider; one error line for a file it cannot load."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise FlowerclfError("predicting with an .onnx model needs onnxruntime: "
                             "pip install -r requirements-predict.txt") from None
    try:
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable files
        raise FlowerclfError(f"{path} is not a loadable ONNX model ({brief(e)})") from None


def model_metadata(session, path: str) -> dict:
    """model.onnx's flowerclf description (model, class_to_idx, preprocess), checked against the graph's shapes."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise FlowerclfError(f"{path} is an ONNX model without flowerclf metadata; export it with "
                             f"python export.py CHECKPOINT")
    try:
        meta = check_model_meta(json.loads(text), path)
    except (ValueError, RecursionError):  # bad JSON, a 5,000-digit number, arrays nested 200,000 deep
        raise FlowerclfError(f"{path}: its flowerclf metadata is not valid JSON; export it again") from None
    images, outputs = session.get_inputs()[0], session.get_outputs()[0]
    crop = meta["preprocess"]["crop_size"]
    if images.shape is not None and len(images.shape) != 4 or outputs.shape is not None and len(outputs.shape) != 2:
        raise FlowerclfError(f"{path}: the model takes {images.shape} and gives {outputs.shape}, not (images, 3, "
                             f"side, side) -> (images, classes); export it again")
    if any(isinstance(side, int) and side != crop for side in (images.shape or [])[2:]):
        raise FlowerclfError(f"{path}: field 'preprocess.crop_size' is {crop}, but the model takes "
                             f"{images.shape[2]}x{images.shape[3]} images; export it again")
    if outputs.shape is not None and isinstance(outputs.shape[-1], int) \
            and outputs.shape[-1] != len(meta["class_to_idx"]):
        raise FlowerclfError(f"{path}: field 'class_to_idx' names {len(meta['class_to_idx'])} classes, but "
                             f"the model has {outputs.shape[-1]} outputs; export it again")
    return meta


def backbone_session(backbone, arch: str, crop_size: int, fingerprint: str, folder: str):
    """A session on `backbone`, exported once into `folder` per weights and library versions."""
    import onnx
    import onnxruntime as ort
    import torch

    versions = f"{torch.__version__}|{onnx.__version__}|{ort.__version__}|{crop_size}"
    key = hashlib.sha256(f"{fingerprint}|{versions}".encode()).hexdigest()[:24]
    path = os.path.join(folder, f"{arch}-{key}.onnx")
    if not os.path.isfile(path):  # a copy: the export moves the module to contiguous format
        export_module(copy.deepcopy(backbone), path, crop_size)
    options = ort.SessionOptions()
    # Idle intra-op threads spin by default, waiting for work. Beside other work that takes cores from it
    # and from everything else: efficientnet_lite0, batches of 8 at 224 px on 2 cores shared with other jobs
    # (load 8-10), ran a median 175 img/s without spinning and 101 img/s with it (1.7x, 5 alternating repeats).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception:  # a damaged cached file (or one of an older flowerclf that kept its weights aside)
        export_module(copy.deepcopy(backbone), path, crop_size)
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
