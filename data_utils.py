"""ImageFolder data: scanning and checking splits, reading images of any mode, preprocessing them.

Nothing here imports torch at module level, so the scanning and the eval-time
preprocessing (PIL + numpy) stay cheap to import.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import FlowerclfError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------- scanning

@dataclass
class ImageSet:
    """The images of one split: parallel lists of files and label indices."""

    root: str
    files: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    class_to_idx: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)


def class_names(class_to_idx: dict[str, int]) -> list[str]:
    """Class folder names in output-index order."""
    return sorted(class_to_idx, key=class_to_idx.get)


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible file whose extension is an image format we read."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(root: Path) -> list[str]:
    """Class folder names; a link back to the split (or above) would repeat every image, so it is refused."""
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    top = os.path.realpath(root)
    for name in names:
        target = os.path.realpath(root / name)
        if top == target or top.startswith(target + os.sep):
            raise FlowerclfError(f"{root / name} links to {target}, which holds {root}/ itself, so every image "
                                 f"would count twice; remove the link")
    return names


def scan_split(root: str | os.PathLike, class_to_idx: dict[str, int] | None = None) -> ImageSet:
    """List the images of one ImageFolder split (one sub-folder per class).

    With `class_to_idx` (the training split's), labels follow that mapping.
    """
    root = Path(root)
    if not root.is_dir():
        raise FlowerclfError(f"{root}/ does not exist (expected one sub-folder per class)")
    classes = _class_dirs(root)
    if not classes:
        raise FlowerclfError(f"{root}/ has no class sub-folders (expected e.g. {root}/roses/*.jpg)")
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    else:
        extra = [c for c in classes if c not in class_to_idx]
        if extra:
            raise FlowerclfError(
                f"{root.name}/ has classes {extra} that train/ lacks; add them to train/ or remove them")
    images = ImageSet(str(root), class_to_idx=dict(class_to_idx))
    for cls in classes:
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if is_image_file(name) and os.path.isfile(os.path.join(dirpath, name)):  # no FIFOs, sockets
                    images.files.append(os.path.join(dirpath, name))
                    images.labels.append(class_to_idx[cls])
    if not images.files:
        raise FlowerclfError(f"{root}/ has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def scan_data_dir(data_dir: str | os.PathLike, valid_split: float = 0.0, seed: int = 0) -> dict[str, ImageSet]:
    """Scan DATA_DIR/train, DATA_DIR/valid (or carve it from train/) and, when present, DATA_DIR/test."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise FlowerclfError(f"data directory {data_dir} is a file; give the folder that holds train/ and valid/")
    if not data_dir.is_dir():
        raise FlowerclfError(f"data directory {data_dir} does not exist")
    if not (data_dir / "train").is_dir():
        raise FlowerclfError(f"{data_dir}/ has no train/ folder; expected {data_dir}/train/CLASS/*.jpg "
                             f"and {data_dir}/valid/CLASS/*.jpg")
    has_valid = (data_dir / "valid").is_dir()
    if has_valid and valid_split:
        raise FlowerclfError(f"{data_dir}/valid/ exists, so --valid_split is not needed; drop one of them")
    if not has_valid and not valid_split:
        raise FlowerclfError(f"{data_dir}/ has no valid/ folder; add {data_dir}/valid/CLASS/*.jpg, or pass "
                             f"--valid_split 0.2 to set aside part of train/")
    sets = {"train": scan_split(data_dir / "train")}
    present = set(sets["train"].labels)
    empty = [c for c, i in sets["train"].class_to_idx.items() if i not in present]
    if empty:
        raise FlowerclfError(f"train/ class folders {empty} have no images; add images or remove the folders")
    if valid_split:
        sets["train"], sets["valid"] = split_off(sets["train"], valid_split, seed)
    for split in ("valid", "test"):
        if (data_dir / split).is_dir():
            sets[split] = scan_split(data_dir / split, sets["train"].class_to_idx)
    return sets


def split_off(images: ImageSet, fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """A stratified, seeded (rest, held-out) split: each class with 2+ images gives about `fraction`."""
    if not 0 < fraction < 1:
        raise FlowerclfError(f"--valid_split {fraction} must be between 0 and 1")
    rng = np.random.default_rng(seed)
    labels = np.asarray(images.labels)
    held = set()
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        if len(idx) >= 2:
            held.update(rng.choice(idx, size=max(1, int(round(len(idx) * fraction))), replace=False).tolist())
    parts = ([i for i in range(len(labels)) if i not in held], sorted(held))
    return tuple(ImageSet(images.root, [images.files[i] for i in p], [images.labels[i] for i in p],
                          dict(images.class_to_idx)) for p in parts)


def check_image(path: str, full: bool) -> str | None:
    """What is wrong with one image file, or None. `full` decodes it (catches truncation)."""
    import warnings
    try:
        if os.path.getsize(path) == 0:
            return "is empty (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if full:
                    img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels)"
    except UnidentifiedImageError:
        return "is not an image PIL can read"
    except (OSError, SyntaxError, ValueError) as e:
        return f"cannot be decoded ({e})"
    return None


def check_splits(splits: dict[str, ImageSet], full: bool = False, skip_bad: bool = False
                 ) -> tuple[dict[str, ImageSet], list[str]]:
    """Check every image; return the splits (bad files left out when `skip_bad`) and warning lines.

    Without `skip_bad`, bad files raise one error with a line per file.
    """
    warnings_, problems = [], []
    train_classes = set(splits["train"].class_to_idx)
    for name, images in splits.items():
        if name != "train":
            present = set(images.labels)
            missing = sorted(train_classes - {c for c, i in images.class_to_idx.items() if i in present})
            if missing:
                warnings_.append(f"warning: {name}/ has no images of classes {missing[:10]}"
                                 f"{' ...' if len(missing) > 10 else ''} that train/ has")
        keep = []
        for i, f in enumerate(images.files):
            problem = check_image(f, full)
            if problem:
                problems.append(f"{f} {problem}")
            else:
                keep.append(i)
        if skip_bad and len(keep) < len(images.files):
            splits[name] = ImageSet(images.root, [images.files[i] for i in keep], [images.labels[i] for i in keep],
                                    images.class_to_idx)
            if not keep:
                raise FlowerclfError(f"{name}/ has no readable images left")
    if problems and not skip_bad:
        raise FlowerclfError(f"{len(problems)} bad image file(s); fix or remove them, or pass --skip_bad_images "
                             f"to leave them out:\n" + "\n".join(problems))
    return splits, warnings_ + [f"warning: skipped {p}" for p in problems]


def list_images(paths: list[str]) -> list[str]:
    """Expand files and directories (searched recursively) into image paths."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs
                           if is_image_file(f) and os.path.isfile(os.path.join(d, f)))
            if not found:
                raise FlowerclfError(f"{p}/ contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        elif os.path.exists(p):
            raise FlowerclfError(f"{p} is not a regular file (a pipe or a device?); give image files or folders")
        else:
            raise FlowerclfError(f"{p} does not exist")
    return out


def load_category_names(path: str | None) -> dict[str, str]:
    """Read a {class: name} JSON mapping; {} when no path is given."""
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            names = json.load(f)
    except OSError as e:
        raise FlowerclfError(f"--category_names {path} cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise FlowerclfError(f"--category_names {path} is not UTF-8 text; save it as UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise FlowerclfError(f"--category_names {path} is not valid JSON ({e})") from None
    if not isinstance(names, dict):
        raise FlowerclfError(f"--category_names {path} must hold a JSON object {{\"1\": \"pink primrose\", ...}}")
    wrong = next((k for k, v in names.items() if not isinstance(v, str)), None)
    if wrong is not None:
        raise FlowerclfError(f"--category_names {path}: the name of {wrong!r} is {names[wrong]!r:.40}, not a string")
    return names


# ---------------------------------------------------------------- images

def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float grayscale: PIL's convert('L') clips instead of scaling.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if (img.mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike | BinaryIO, name: str | None = None) -> Image.Image:
    """Open an image (a path, or a binary stream that errors call `name`), apply its EXIF orientation, return RGB.

    A DecompressionBombWarning counts as a bomb too where warnings are errors (serve.py makes them so).
    """
    name = path if name is None else name
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise FlowerclfError(f"{name} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise FlowerclfError(f"{name} is too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise FlowerclfError(f"{name} is not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise FlowerclfError(f"{name} cannot be read as an image ({e})") from None


# ---------------------------------------------------------------- preprocessing

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


class ImageDataset:
    """Map-style dataset of (CHW float32 array, label); works with torch's DataLoader."""

    def __init__(self, files: list[str], labels: list[int], transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(load_rgb(self.files[i])), self.labels[i]


def train_transform(pp: Preprocess):
    """Random-crop + flip augmentation for training, ending in the same normalization."""
    from torchvision import transforms as T  # torchvision only where augmentation is used

    crop = T.RandomResizedCrop(pp.crop_size, interpolation=T.InterpolationMode(pp.interpolation))
    augment = T.Compose([crop, T.RandomHorizontalFlip()])
    return lambda img: normalize(augment(img), pp)


if __name__ == "__main__":  # the documented `python data_utils.py flowers102 DIR` / `demo DIR`
    import sample_data
    raise SystemExit(sample_data.main())
