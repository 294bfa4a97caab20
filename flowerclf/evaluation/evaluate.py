"""Evaluating a checkpoint on an ImageFolder split, with its features computed (and stored) as training did."""
from __future__ import annotations

import os
from typing import Callable

from flowerclf.base.errors import FlowerclfError
from flowerclf.base.runfiles import RunFiles
from flowerclf.data.folders import (
    class_names,
    is_inside,
    load_category_names,
    scan_split,
)
from flowerclf.data.images import typical_pixels
from flowerclf.data.transforms import Preprocess
from flowerclf.evaluation.calibration import report_calibration
from flowerclf.evaluation.html import run_facts, write_html_report
from flowerclf.evaluation.metrics import classification_report
from flowerclf.evaluation.reports import write_report
from flowerclf.features.passes import FeaturePass, head_logits
from flowerclf.models.checkpoints import load_model
from flowerclf.runtime.devices import (
    enable_cudnn_autotune,
    resolve_device,
    resolve_feature_batch_size,
    resolve_num_workers,
)


def evaluate_split(checkpoint: str, split: str, out: str | None = None, category_names: str | None = None,
                   batch_size: int | None = None, device: str = "auto", gpu: bool = False,
                   num_workers: int | str = "auto", log: Callable[[str], None] = print) -> tuple[dict, list[str], str]:
    """(the report of `checkpoint` on `split`, the report files written, report.html's path)."""
    names = load_category_names(category_names)
    if is_inside(out or os.path.dirname(os.path.abspath(checkpoint)), split):  # before any work
        raise FlowerclfError(f"--out {out or '(the checkpoint folder)'} is inside {split}, the split evaluated, so "
                             f"its report PNGs would be read back as photos next time; pick a folder outside it")
    dev = resolve_device(device, gpu)
    enable_cudnn_autotune(dev)
    model, ckpt = load_model(checkpoint, dev)
    images = scan_split(split, ckpt["class_to_idx"])
    train_args = ckpt.get("args", {})
    # this device's batch size, not the training machine's (a CPU's 8 would starve a GPU)
    batch_size = resolve_feature_batch_size(batch_size or 0, dev)
    # the engine training used is a fact about that machine: kept where it runs here, so the numbers (and the
    # store's key) match what train.py printed; else (onnxruntime, trained on a CPU, evaluated on a GPU)
    # training's auto rule picks this machine's
    engine = "torch" if train_args.get("unfreeze") else train_args.get("engine", "torch")
    if engine == "onnxruntime" and dev.type != "cpu":
        engine = "auto"
    stem = os.path.basename(os.path.normpath(split))
    with FeaturePass(model.backbone, ckpt["model"]["arch"], ckpt["model"].get("weights", ""),
                     Preprocess.from_dict(ckpt["preprocess"]), engine, dev, bool(train_args.get("amp")), batch_size,
                     resolve_num_workers(num_workers, dev, typical_pixels(images.files)), True, log) as passes:
        feats, labels = passes.features(images, stem)
    logits = head_logits(model.head, feats, dev).numpy()
    temperature = ckpt.get("calibration", {}).get("temperature", 1.0)  # 1: a checkpoint made before calibration
    result = classification_report(logits / temperature, labels.numpy(), class_names(ckpt["class_to_idx"]), names,
                                   files=images.files)
    files, named = RunFiles(out or os.path.dirname(os.path.abspath(checkpoint))), RunFiles.evaluated(stem)
    written = write_report(result, files, named)
    facts = run_facts("evaluate.py", train_args, str(dev), split, f"{len(images)} {stem}", ckpt.get("epoch", "?"))
    if "calibration" in ckpt:
        facts[f"calibration ({stem})"] = report_calibration(logits, labels.numpy(), temperature,
                                                            files.reliability(named))
        written.append(files.reliability(named))
    curves = RunFiles(os.path.dirname(os.path.abspath(checkpoint))).curves
    page = write_html_report(files.folder, named, result, facts, train_args, {
        "Training curves": curves, "Confusion matrix": files.confusion(named),
        "Reliability diagram": files.reliability(named)})
    return result, written, page
