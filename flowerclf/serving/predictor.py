"""Prediction: images in, top-k classes out. The core is numpy; the model backend is pluggable."""
from __future__ import annotations

import importlib.util
import io
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator

import numpy as np

from flowerclf.base.errors import FlowerclfError, brief
from flowerclf.data.folders import class_names, is_image_file, list_images
from flowerclf.data.images import load_rgb
from flowerclf.data.transforms import Preprocess, decode_size, preprocess_image
from flowerclf.evaluation.metrics import softmax
from flowerclf.models.onnx import model_metadata, open_session


def checked_logits(logits: np.ndarray, images: int, classes: int, path: str) -> np.ndarray:
    """A model's scores for a batch, refused when they cannot be an answer: another shape, NaN or infinity."""
    if logits.shape != (images, classes):
        raise FlowerclfError(f"{path} gives scores of shape {tuple(logits.shape)} for {images} image(s), but names "
                             f"{classes} classes; export it again from its checkpoint")
    if not np.isfinite(logits).all():
        raise FlowerclfError(f"{path} gives NaN or infinite scores (its weights hold NaN or overflow); retrain it, "
                             f"or export it again from a checkpoint that predicts")
    return logits


def list_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """The image files under `inputs` (images or folders), in order; and the errors of inputs that list none."""
    files, errors = [], []
    for p in inputs:
        try:
            files.extend(list_images([p]))
        except FlowerclfError as e:
            errors.append(str(e))
    return files, errors


@dataclass
class Predictor:
    """A model backend (batch of CHW arrays -> class probabilities) plus what it needs around it."""

    probabilities: Callable[[np.ndarray], np.ndarray]
    classes: list[str]              # class folder names, by output index
    preprocess: Preprocess
    batch_size: int = 32
    threshold: float | None = None  # top probabilities below it are "not sure"; None: no such mark (no calibration)

    @staticmethod
    def calibration(meta: dict) -> tuple[float, float | None]:
        """(temperature, "not sure" threshold) of a checked checkpoint or model.onnx description; (1, None) without."""
        found = meta.get("calibration")
        return (found["temperature"], found["threshold"]) if found else (1.0, None)

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto", gpu: bool = False) -> "Predictor":
        """A torch predictor from a train.py checkpoint."""
        import torch

        from flowerclf.models.checkpoints import load_model
        from flowerclf.runtime.devices import resolve_device

        dev = resolve_device(device, gpu)
        model, ckpt = load_model(path, dev)
        temperature, threshold = cls.calibration(ckpt)

        classes = class_names(ckpt["class_to_idx"])

        @torch.inference_mode()
        def probabilities(batch: np.ndarray) -> np.ndarray:
            logits = model(torch.from_numpy(batch).to(dev)).float().cpu().numpy()
            return softmax(checked_logits(logits, len(batch), len(classes), path) / temperature)

        return cls(probabilities, classes, Preprocess.from_dict(ckpt["preprocess"]), threshold=threshold)

    @classmethod
    def from_onnx(cls, path: str) -> "Predictor":
        """An ONNX Runtime predictor from model.onnx (train.py --export onnx): no torch involved."""
        session = open_session(path)
        meta = model_metadata(session, path)
        name, classes = session.get_inputs()[0].name, class_names(meta["class_to_idx"])
        temperature, threshold = cls.calibration(meta)

        def probabilities(batch: np.ndarray) -> np.ndarray:
            try:
                logits = np.asarray(session.run(None, {name: batch})[0], dtype=np.float64)
            except Exception as e:  # onnxruntime's own types: a graph that cannot run on these images
                raise FlowerclfError(f"{path} failed to run ({brief(e)}); export it again") from None
            return softmax(checked_logits(logits, len(batch), len(classes), path) / temperature)

        return cls(probabilities, classes, Preprocess.from_dict(meta["preprocess"]), threshold=threshold)

    @classmethod
    def load(cls, path: str, device: str = "auto", gpu: bool = False) -> "Predictor":
        """A predictor for a checkpoint.pth (torch) or a model.onnx (ONNX Runtime, CPU)."""
        if os.path.isdir(path) or is_image_file(path):
            raise FlowerclfError(f"the last argument, {path}, is {'a folder' if os.path.isdir(path) else 'an image'};"
                                 f" give the images first and the checkpoint (.pth or .onnx) last")
        if not os.path.isfile(path):
            raise FlowerclfError(f"checkpoint {path} does not exist")
        if path.lower().endswith(".onnx"):
            if gpu or device not in ("auto", "cpu"):
                raise FlowerclfError(f"{path} runs on ONNX Runtime's CPU provider; drop --gpu/--device "
                                     f"or use checkpoint.pth")
            return cls.from_onnx(path)
        if importlib.util.find_spec("torch") is None:
            raise FlowerclfError(f"{path} is a torch checkpoint, but this install has no torch: it predicts from a "
                                 f"model.onnx (python export.py {path}, where torch is installed) or "
                                 f"pip install -r requirements.txt")
        return cls.from_checkpoint(path, device, gpu)

    def predict_paths(self, inputs: list[str], top_k: int, names: dict[str, str] | None = None
                      ) -> tuple[list[dict], list[str]]:
        """Top-k predictions for every image under `inputs`; also the errors of unreadable ones."""
        files, errors = list_inputs(inputs)
        results, unreadable = self._collect(self.iter_files(files, top_k, names))
        return results, errors + unreadable

    def iter_files(self, files: Iterable[str], top_k: int, names: dict[str, str] | None = None) -> Iterator[dict]:
        """iter_predict over image files, each decoded as the model was trained; `files` is read lazily."""
        draft = decode_size(self.preprocess)  # the decode the model was trained with (full for older files)
        return self.iter_predict(((f, partial(load_rgb, f, draft=draft)) for f in files), top_k, names)

    def predict_bytes(self, uploads: list[tuple[str, bytes]], top_k: int, names: dict[str, str] | None = None
                      ) -> tuple[list[dict], list[str]]:
        """Top-k predictions for in-memory image files given as (name, content); also the errors."""
        draft = decode_size(self.preprocess)
        return self._collect(self.iter_predict(((name, partial(load_rgb, io.BytesIO(data), name, draft))
                                                for name, data in uploads), top_k, names))

    @staticmethod
    def _collect(items: Iterable[dict]) -> tuple[list[dict], list[str]]:
        """iter_predict's items collected: the results, plus the decoding errors."""
        results, errors = [], []
        for item in items:
            if "error" in item:
                errors.append(item["error"])
            else:
                results.append(item)
        return results, errors

    def iter_predict(self, sources: Iterable[tuple[str, Callable[[], object]]], top_k: int,
                     names: dict[str, str] | None = None) -> Iterator[dict]:
        """Decode (name, load) sources a batch at a time, run each batch, yield one item per source in input order.

        An item is {"image": name, "predictions": [top-k]} (with "confident": top probability >= threshold,
        when there is a threshold) or, for a source that cannot be decoded,
        {"image": name, "error": message}. At most one batch of decoded images is held at a time,
        and `sources` is read no further than the batch being run.
        """
        names = names or {}
        k = min(top_k, len(self.classes))
        pending, arrays = [], []  # the items of this batch in input order; the arrays of its good ones
        for name, load in sources:
            try:
                arrays.append(preprocess_image(load(), self.preprocess))
                pending.append({"image": name})
            except FlowerclfError as e:
                pending.append({"image": name, "error": str(e)})
            if len(arrays) == self.batch_size:
                yield from self._run_batch(pending, arrays, k, names)
                pending, arrays = [], []
        yield from self._run_batch(pending, arrays, k, names)

    def _run_batch(self, pending: list[dict], arrays: list[np.ndarray], k: int, names: dict[str, str]
                   ) -> Iterator[dict]:
        """The items of one batch, the good ones given their top-k predictions."""
        probs = iter(self.probabilities(np.stack(arrays)) if arrays else ())
        arrays.clear()  # the batch is run: its decoded images can go before the items are consumed
        for item in pending:
            if "error" not in item:
                p = next(probs)
                top = np.argsort(-p, kind="stable")[:k]
                item["predictions"] = [{"class": self.classes[i], "name": names.get(self.classes[i], self.classes[i]),
                                        "probability": float(p[i])} for i in top]
                if self.threshold is not None:
                    item["confident"] = float(p[top[0]]) >= self.threshold  # as the JSON prints it
            yield item
