"""Prediction: images in, top-k classes out. The core is numpy; the model backend is pluggable."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

import data_utils as du


@dataclass
class Predictor:
    """A model backend (batch of CHW arrays -> class probabilities) plus what it needs around it."""

    probabilities: Callable[[np.ndarray], np.ndarray]
    classes: list[str]              # class folder names, by output index
    preprocess: du.Preprocess
    batch_size: int = 32

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto", gpu: bool = False) -> "Predictor":
        """A torch predictor from a train.py checkpoint."""
        import torch
        import model_utils as mu

        dev = mu.resolve_device(device, gpu)
        model, ckpt = mu.load_model(path, dev)

        @torch.inference_mode()
        def probabilities(batch: np.ndarray) -> np.ndarray:
            return model(torch.from_numpy(batch).to(dev)).float().softmax(dim=1).cpu().numpy()

        classes = sorted(ckpt["class_to_idx"], key=ckpt["class_to_idx"].get)
        return cls(probabilities, classes, du.Preprocess.from_dict(ckpt["preprocess"]))

    def predict_paths(self, inputs: list[str], top_k: int, names: dict[str, str] | None = None
                      ) -> tuple[list[dict], list[str]]:
        """Top-k predictions for every image under `inputs`; also the errors of unreadable ones."""
        names = names or {}
        files, errors = [], []
        for p in inputs:
            try:
                files.extend(du.list_images([p]))
            except du.FlowerclfError as e:
                errors.append(str(e))
        arrays, good = [], []
        for f in files:
            try:
                arrays.append(du.preprocess_image(du.load_rgb(f), self.preprocess))
                good.append(f)
            except du.FlowerclfError as e:
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
