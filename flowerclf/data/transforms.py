"""The one transform factory: eval (resize, center crop, normalize), augment (random crop + flip) and stored views.

`Preprocess` is plain data taken from the weights and saved with the model. The eval transform
is PIL + numpy only, so the inference-only install (no torch) applies exactly what training did.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@dataclass(frozen=True)
class Preprocess:
    """Eval-time preprocessing as plain data: resize shorter side, center crop, normalize."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["resize_size"]), int(d["crop_size"]), tuple(float(x) for x in d["mean"]),
                   tuple(float(x) for x in d["std"]), str(d["interpolation"]))


def resize_center_crop(img: Image.Image, pp: Preprocess) -> Image.Image:
    """Resize the shorter side to pp.resize_size, then center-crop pp.crop_size (as torchvision does)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = pp.resize_size, int(pp.resize_size * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if size != img.size:
        img = img.resize(size, _RESAMPLE[pp.interpolation])
    w, h = img.size
    c = pp.crop_size
    if c > w or c > h:  # only for weights whose crop exceeds their resize; pad like torchvision
        padded = Image.new("RGB", (max(w, c), max(h, c)))
        padded.paste(img, ((max(w, c) - w) // 2, (max(h, c) - h) // 2))
        img, (w, h) = padded, padded.size
    top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
    return img.crop((left, top, left + c, top + c))


def normalize(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """RGB PIL image -> float32 CHW array scaled to [0, 1] and normalized."""
    # (x / 255 - mean) / std as one multiply-add in place: half the time of the plain expression
    std = np.asarray(pp.std, np.float32)[:, None, None]
    arr = np.asarray(img).transpose(2, 0, 1).astype(np.float32)
    arr *= 1 / (np.float32(255.0) * std)
    arr += -np.asarray(pp.mean, np.float32)[:, None, None] / std
    return arr


def preprocess_image(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """The eval transform used by training, evaluation and prediction alike."""
    return normalize(resize_center_crop(img, pp), pp)


@dataclass(frozen=True)
class EvalTransform:
    """The deterministic resize + center-crop + normalize of `preprocess`, which the tensor path can do too."""

    preprocess: Preprocess

    def __call__(self, img: Image.Image) -> np.ndarray:
        return preprocess_image(img, self.preprocess)


def _augment(pp: Preprocess):
    """Random-crop + flip for fine-tuning, ending in the same normalization."""
    from torchvision import (
        transforms as T,  # torchvision only where augmentation is used
    )

    crop = T.RandomResizedCrop(pp.crop_size, interpolation=T.InterpolationMode(pp.interpolation))
    augment = T.Compose([crop, T.RandomHorizontalFlip()])
    return lambda img: normalize(augment(img), pp)


def _stored_view(pp: Preprocess, view: int, seed: int):
    """Augmented view `view`: a random crop + flip drawn per image, seeded by (seed, view, the decoded pixels),
    so an image gets the same view in any pass, whatever other images are in it: stored and recomputed views agree.
    """
    import torch

    augment = _augment(pp)

    def transform(img: Image.Image) -> np.ndarray:
        pixels = hashlib.sha256(f"{seed}|{view}|{img.size}|".encode() + img.tobytes()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(pixels[:8], "little"))
            return augment(img)
    return transform


def create_transform(pp: Preprocess, augment: bool = False, view: int | None = None, seed: int = 0):
    """PIL RGB image -> CHW float32 array: the eval transform, the fine-tuning augmentation (`augment`),
    or the feature store's augmented view `view` (reproducible per image)."""
    if view is not None:
        return _stored_view(pp, view, seed)
    return _augment(pp) if augment else EvalTransform(pp)
