"""Prediction: images in, top-k classes out. The core is numpy; the model backend is pluggable."""
from __future__ import annotations

import importlib.util
import io
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from flowerclf.base.errors import FlowerclfError
from flowerclf.data.folders import class_names, is_image_file, list_images
from flowerclf.data.images import load_rgb
from flowerclf.data.transforms import Preprocess, decode_size, preprocess_image
from flowerclf.models.onnx import model_metadata, open_session


@dataclass
class Predictor:
    """A model backend (batch of CHW arrays -> class probabilities) plus what it needs around it."""

    probabilities: Callable[[np.ndarray], np.ndarray]
    classes: list[str]              # class folder names, by output index
    preprocess: Preprocess
    batch_size: int = 32

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto", gpu: bool = False) -> "Predictor":
        """A torch predictor from a train.py checkpoint."""
        import torch

        from flowerclf.models.checkpoints import load_model
        from flowerclf.runtime.devices import resolve_device

        dev = resolve_device(device, gpu)
        model, ckpt = load_model(path, dev)

        @torch.inference_mode()
        def probabilities(batch: np.ndarray) -> np.ndarray:
            return model(torch.from_numpy(batch).to(dev)).float().softmax(dim=1).cpu().numpy()

        return cls(probabilities, class_names(ckpt["class_to_idx"]), Preprocess.from_dict(ckpt["preprocess"]))

    @classmethod
    def from_onnx(cls, path: str) -> "Predictor":
        """An ONNX Runtime predictor from model.onnx (train.py --export onnx): no torch involved."""
        session = open_session(path)
        meta = model_metadata(session, path)
        name = session.get_inputs()[0].name

        def probabilities(batch: np.ndarray) -> np.ndarray:
            logits = session.run(None, {name: batch})[0].astype(np.float64)
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)

        return cls(probabilities, class_names(meta["class_to_idx"]), Preprocess.from_dict(meta["preprocess"]))

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
        files, errors = [], []
        for p in inputs:
            try:
                files.extend(list_images([p]))
            except FlowerclfError as e:
                errors.append(str(e))
        draft = decode_size(self.preprocess)  # the decode the model was trained with (full for older files)
        results, unreadable = self._predict([(f, partial(load_rgb, f, draft=draft)) for f in files], top_k, names)
        return results, errors + unreadable

    def predict_bytes(self, uploads: list[tuple[str, bytes]], top_k: int, names: dict[str, str] | None = None
                      ) -> tuple[list[dict], list[str]]:
        """Top-k predictions for in-memory image files given as (name, content); also the errors."""
        draft = decode_size(self.preprocess)
        return self._predict([(name, partial(load_rgb, io.BytesIO(data), name, draft)) for name, data in uploads],
                             top_k, names)

    def _predict(self, sources: list[tuple[str, Callable[[], object]]], top_k: int, names: dict[str, str] | None
                 ) -> tuple[list[dict], list[str]]:
        """Decode each (name, load) source, run the model in batches; results by name, plus decoding errors."""
        names = names or {}
        arrays, good, errors = [], [], []
        for name, load in sources:
            try:
                arrays.append(preprocess_image(load(), self.preprocess))
                good.append(name)
            except FlowerclfError as e:
                errors.append(str(e))
        results = []
        k = min(top_k, len(self.classes))
        for start in range(0, len(good), self.batch_size):
            probs = self.probabilities(np.stack(arrays[start:start + self.batch_size]))
            for f, p in zip(good[start:start + self.batch_size], probs):
                top = np.argsort(-p, kind="stable")[:k]
                results.append({"image": f, "predictions": [
                    {"class": self.classes[i], "name": names.get(self.classes[i], self.classes[i]),
                     "probability": float(p[i])} for i in top]})
        return results, errors
