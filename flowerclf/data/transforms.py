"""The one transform factory: eval (resize, center crop, normalize), augment (random crop + flip) and stored views.

`Preprocess` is plain data taken from the weights and saved with the model. The eval transform
is PIL + numpy only, so the inference-only install (no torch) applies exactly what training did.
Each transform carries `draft_size`, the size its JPEGs are decoded at (`decode_size`, the one rule).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from flowerclf.base.schema import DECODE_RULES

# RandomResizedCrop's own defaults, passed to it explicitly: decode_size's bound for augmentation rests on them
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@dataclass(frozen=True)
class Preprocess:
    """Eval-time preprocessing as plain data: resize shorter side, center crop, normalize; and the decode rule.

    `decode` names the rule of `decode_size`: a new model gets "draft2"; a file without the field
    (older checkpoints, model.onnx, the classic project's) reads as "full", the decode they were trained with,
    and one that says "draft" keeps that rule.
    """

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    decode: str = "draft2"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["resize_size"]), int(d["crop_size"]), tuple(float(x) for x in d["mean"]),
                   tuple(float(x) for x in d["std"]), str(d["interpolation"]), str(d.get("decode", DECODE_RULES[0])))


def decode_size(pp: Preprocess, augment: bool = False) -> int | None:
    """The side s that JPEGs are decoded at, `Image.draft("RGB", (s, s))`, or None for a full decode.

    draft picks libjpeg's smallest DCT scale (1/8, 1/4, 1/2 or 1) that keeps both sides >= s, so a
    square request holds whichever way the EXIF orientation turns the photo afterwards.
    - eval (and predict, serve): s = 2 * resize_size ("draft2", Pillow's thumbnail default reducing_gap=2.0);
      "draft" (models of before) s = resize_size. The shorter side is resized to resize_size, never enlarged.
      At 1/8 a DCT block becomes its mean, a box filter before the resize's own: on 600 phone-size copies of
      flowers5-dev photos (4032x3024) that decode (378 px for a 256 resize) changed three checkpoints' top-1 on
      3.2-3.5% of them, "draft2" (756 px, the 1/4 scale) on 1.8-2.0%, at half the decode speed (60 against
      127 img/s on a core; benchmarks/bench_photos.py).
    - augment (and stored views): RandomResizedCrop draws a crop of area a * W * H with a >= CROP_SCALE[0]
      and aspect r = w / h within CROP_RATIO, so its shorter side is sqrt(a * W * H * min(r, 1 / r)) >=
      sqrt(0.08 * 3/4 * W * H) (a crop that misses ten draws falls back to a larger one). After the draft
      W, H >= s, so that is >= 0.245 s, which stays >= crop_size for s >= crop_size / sqrt(0.06): 915 for
      224. Every crop is still at least crop_size pixels a side before it is resized to crop_size.
    """
    if pp.decode == "full":
        return None
    if not augment:
        return pp.resize_size * (2 if pp.decode == "draft2" else 1)
    return math.ceil(pp.crop_size / math.sqrt(CROP_SCALE[0] * min(CROP_RATIO[0], 1 / CROP_RATIO[1])))


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

    @property
    def draft_size(self) -> int | None:
        return decode_size(self.preprocess)

    def __call__(self, img: Image.Image) -> np.ndarray:
        return preprocess_image(img, self.preprocess)


class AugmentTransform:
    """Random-crop (CROP_SCALE, CROP_RATIO) + flip for fine-tuning, ending in the same normalization."""

    def __init__(self, pp: Preprocess):
        from torchvision import transforms as T  # torchvision only where augmentation is used

        self.preprocess, self.draft_size = pp, decode_size(pp, augment=True)
        crop = T.RandomResizedCrop(pp.crop_size, scale=CROP_SCALE, ratio=CROP_RATIO,
                                   interpolation=T.InterpolationMode(pp.interpolation))
        self.augment = T.Compose([crop, T.RandomHorizontalFlip()])

    def __call__(self, img: Image.Image) -> np.ndarray:
        return normalize(self.augment(img), self.preprocess)

    def from_jpeg(self, img: Image.Image) -> np.ndarray:
        """The same augmentation, from the same random draws, of an upright JPEG opened but not yet decoded (a
        working copy): the crop is drawn from the header's size, the JPEG decoded at the smallest DCT scale that
        keeps the crop at least crop_size pixels a side (Image.draft), and only the crop resized."""
        crop, flip = self.augment.transforms
        top, left, h, w = crop.get_params(img, crop.scale, crop.ratio)  # reads img.size only
        scale = next((s for s in (8, 4, 2) if min(h, w) >= s * self.preprocess.crop_size), 1)
        width = img.width
        drafted = img.draft("RGB", (width // scale, img.height // scale)) if scale > 1 else None
        # draft maps the whole photo onto (0, 0, W / s, H / s) of the smaller one; None: decoded at full size
        k = drafted[1][2] / width if drafted else 1.0
        box = (left * k, top * k, (left + w) * k, (top + h) * k)
        size = (self.preprocess.crop_size, self.preprocess.crop_size)
        return normalize(flip(img.resize(size, _RESAMPLE[self.preprocess.interpolation], box=box)), self.preprocess)


class StoredView(AugmentTransform):
    """Augmented view `view`: a random crop + flip drawn per image, seeded by (seed, view, the decoded pixels),
    so an image gets the same view in any pass, whatever other images are in it: stored and recomputed views agree.
    """

    def __init__(self, pp: Preprocess, view: int, seed: int):
        super().__init__(pp)
        self.view, self.seed = view, seed

    def __call__(self, img: Image.Image) -> np.ndarray:
        import torch

        pixels = hashlib.sha256(f"{self.seed}|{self.view}|{img.size}|".encode() + img.tobytes()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(pixels[:8], "little"))
            return super().__call__(img)


def create_transform(pp: Preprocess, augment: bool = False, view: int | None = None, seed: int = 0):
    """PIL RGB image -> CHW float32 array: the eval transform, the fine-tuning augmentation (`augment`),
    or the feature store's augmented view `view` (reproducible per image). Each has a `draft_size`."""
    if view is not None:
        return StoredView(pp, view, seed)
    return AugmentTransform(pp) if augment else EvalTransform(pp)
