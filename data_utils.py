"""Data side of flowerclf: scanning ImageFolder trees, loading images, preprocessing.

Nothing here imports torch at module level, so the scanning and the eval-time
preprocessing (PIL + numpy) stay cheap to import.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "valid", "test")


class FlowerclfError(Exception):
    """A problem the user can act on; scripts print it as one `error:` line."""


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


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(binary file) on a temp file beside `path`, fsync, then rename it over `path`.

    A crash or kill at any moment leaves either the old file or the new one, never half of one.
    """
    import tempfile
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(str(path))[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible file whose extension is an image format we read."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


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
                if is_image_file(name):
                    images.files.append(os.path.join(dirpath, name))
                    images.labels.append(class_to_idx[cls])
    if not images.files:
        raise FlowerclfError(f"{root}/ has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def scan_data_dir(data_dir: str | os.PathLike, valid_split: float = 0.0, seed: int = 0) -> dict[str, ImageSet]:
    """Scan DATA_DIR/train, DATA_DIR/valid (or carve it from train/) and, when present, DATA_DIR/test."""
    data_dir = Path(data_dir)
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
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if is_image_file(f))
            if not found:
                raise FlowerclfError(f"{p}/ contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
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
    except json.JSONDecodeError as e:
        raise FlowerclfError(f"--category_names {path} is not valid JSON ({e})") from None
    if not isinstance(names, dict):
        raise FlowerclfError(f"--category_names {path} must hold a JSON object {{\"1\": \"pink primrose\", ...}}")
    return {str(k): str(v) for k, v in names.items()}


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


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image, apply its EXIF orientation and return it as RGB."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise FlowerclfError(f"{path} does not exist") from None
    except Image.DecompressionBombError as e:
        raise FlowerclfError(f"{path} is too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise FlowerclfError(f"{path} is not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise FlowerclfError(f"{path} cannot be read as an image ({e})") from None


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


# ---------------------------------------------------------------- data sets: Flowers-102 and a demo

FLOWERS_FILES = ("jpg", "imagelabels.mat", "setid.mat")
OFFICIAL_SPLITS = {"train": "trnid", "valid": "valid", "test": "tstid"}


def _has_flowers_files(folder: Path) -> bool:
    return all((folder / name).exists() for name in FLOWERS_FILES)


def fetch_flowers102(root: Path) -> Path:
    """The folder holding jpg/, imagelabels.mat and setid.mat: found under root, else downloaded there."""
    for folder in (root, root / "flowers-102"):
        if _has_flowers_files(folder):
            return folder
    from torchvision.datasets import Flowers102
    try:
        Flowers102(str(root), split="train", download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad checksum is a RuntimeError
        raise FlowerclfError(
            f"could not download Oxford Flowers-102 ({e}); without a network, extract 102flowers.tgz "
            f"to {root}/flowers-102/jpg/ and put imagelabels.mat and setid.mat in {root}/flowers-102/ "
            f"(all from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/), then rerun") from None
    return root / "flowers-102"


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link, else symlink, else copy: no duplicated bytes where the file system allows."""
    import shutil
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        try:
            os.symlink(os.path.abspath(src), dst)
        except OSError:
            shutil.copy2(src, dst)


def flowers102_splits(labels: np.ndarray, setid: dict, split: str, seed: int = 0) -> dict[str, list[int]]:
    """Image ids (1-based) per split: the official ones, or a seeded stratified 'A-B-C' percentage split."""
    if split == "official":
        return {name: sorted(int(i) for i in np.ravel(setid[key])) for name, key in OFFICIAL_SPLITS.items()}
    try:
        parts = [int(p) for p in split.split("-")]
    except ValueError:
        parts = []
    if len(parts) != 3 or sum(parts) != 100 or min(parts) <= 0:
        raise FlowerclfError(f"--split {split!r}: use 'official' or three percentages like 80-10-10")
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {name: [] for name in OFFICIAL_SPLITS}
    for label in np.unique(labels):
        ids = rng.permutation(np.flatnonzero(labels == label) + 1)
        n_train = int(round(len(ids) * parts[0] / 100))
        n_valid = max(1, int(round(len(ids) * parts[1] / 100)))
        out["train"] += ids[:n_train].tolist()
        out["valid"] += ids[n_train:n_train + n_valid].tolist()
        out["test"] += ids[n_train + n_valid:].tolist()
    return {name: sorted(ids) for name, ids in out.items()}


def prepare_flowers102(dest: str | os.PathLike, split: str = "official", source: str | None = None,
                       seed: int = 0) -> dict[str, int]:
    """Lay Oxford Flowers-102 out as DEST/{train,valid,test}/{1..102}/; return images per split."""
    from scipy.io import loadmat
    dest = Path(dest)
    folder = fetch_flowers102(Path(source) if source else dest / "download")
    labels = np.ravel(loadmat(folder / "imagelabels.mat", squeeze_me=True)["labels"]).astype(int)
    setid = loadmat(folder / "setid.mat", squeeze_me=True)
    counts = {}
    for name, ids in flowers102_splits(labels, setid, split, seed).items():
        for i in ids:
            src = folder / "jpg" / f"image_{i:05d}.jpg"
            if not src.is_file():
                raise FlowerclfError(f"{src} is missing; the Flowers-102 copy in {folder} is incomplete")
            _link_or_copy(src, dest / name / str(labels[i - 1]) / src.name)
        counts[name] = len(ids)
    return counts


DEMO_SHAPES = ("circle", "square", "triangle", "cross")


def _draw_shape(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    from PIL import ImageDraw
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.fromarray(np.clip(np.asarray(bg) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    colour = tuple(int(255 - v) for v in bg)  # contrasting, so the shape is what matters
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r, 2)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    return img


def make_demo(dest: str | os.PathLike, per_split: dict[str, int] | None = None, size: int = 64,
              seed: int = 0) -> dict[str, int]:
    """Write a small synthetic ImageFolder of drawn shapes (not flowers!); return images per split."""
    per_split = per_split or {"train": 20, "valid": 8, "test": 8}
    rng = np.random.default_rng(seed)
    dest = Path(dest)
    for split, n in per_split.items():
        for shape in DEMO_SHAPES:
            (dest / split / shape).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _draw_shape(shape, size, rng).save(dest / split / shape / f"{shape}_{i:03d}.png")
    return {split: n * len(DEMO_SHAPES) for split, n in per_split.items()}


def build_parser():
    """The command-line interface of `python data_utils.py`."""
    import argparse
    p = argparse.ArgumentParser(
        prog="data_utils.py", description="Prepare data sets for train.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python data_utils.py flowers102 flowers\n"
               "  python data_utils.py flowers102 flowers --split 80-10-10\n"
               "  python data_utils.py demo demo   # synthetic shapes, offline, in seconds\n")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("flowers102", help="download Oxford Flowers-102 and lay it out as DIR/train|valid|test/1..102")
    f.add_argument("dir", metavar="DIR", help="output folder")
    f.add_argument("--split", default="official",
                   help="official (1,020/1,020/6,149 images) or percentages such as 80-10-10, stratified "
                        "by class (default: %(default)s)")
    f.add_argument("--source", metavar="PATH",
                   help="an already-downloaded copy: the folder with jpg/, imagelabels.mat and setid.mat "
                        "(default: download into DIR/download)")
    f.add_argument("--seed", type=int, default=0, help="seed of the percentage split (default: %(default)s)")
    d = sub.add_parser("demo", help="write a tiny synthetic set of drawn shapes (not flowers) to DIR")
    d.add_argument("dir", metavar="DIR", help="output folder")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a data preparation command; return the exit code."""
    import sys
    args = build_parser().parse_args(argv)
    try:
        if args.command == "flowers102":
            counts = prepare_flowers102(args.dir, args.split, args.source, args.seed)
        else:
            counts = make_demo(args.dir, seed=args.seed)
    except FlowerclfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = "synthetic shapes (not flowers)" if args.command == "demo" else "Oxford Flowers-102"
    print(f"{what} in {args.dir}: " + ", ".join(f"{n} {split}" for split, n in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
