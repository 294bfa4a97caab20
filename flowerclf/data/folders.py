"""ImageFolder trees: scanning splits, checking them, listing images, and the category-name mapping.

Torch-free: scanning a folder needs no torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowerclf.base.errors import FlowerclfError, brief
from flowerclf.data.images import check_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


SPLITS = ("train", "valid", "test")


@dataclass
class ImageSet:
    """The images of one split: parallel lists of files and label indices."""

    root: str
    files: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    class_to_idx: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when `path` is `folder` or lies under it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


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
        _check_split_off(sets["train"], sets["valid"], valid_split)
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


def _check_split_off(train: ImageSet, valid: ImageSet, fraction: float) -> None:
    """--valid_split must leave a validation image, and every class a training image."""
    if not valid.files:
        raise FlowerclfError(f"--valid_split {fraction} set aside no image: only classes with 2 or more images in "
                             f"train/ give some; add images, or a valid/ folder")
    kept = set(train.labels)
    emptied = [c for c, i in train.class_to_idx.items() if i not in kept]
    if emptied:
        raise FlowerclfError(f"--valid_split {fraction} takes every train/ image of classes {emptied[:10]}"
                             f"{' ...' if len(emptied) > 10 else ''}, leaving none to train on; pass a smaller "
                             f"--valid_split or add images")


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
    except (ValueError, RecursionError) as e:  # a 5,000-digit number; arrays nested 200,000 deep
        raise FlowerclfError(f"--category_names {path} is not a JSON mapping we can read ({brief(e, 80)}); "
                             f"give a flat one, {{\"1\": \"pink primrose\", ...}}") from None
    if not isinstance(names, dict):
        raise FlowerclfError(f"--category_names {path} must hold a JSON object {{\"1\": \"pink primrose\", ...}}")
    wrong = next((k for k, v in names.items() if not isinstance(v, str)), None)
    if wrong is not None:
        raise FlowerclfError(f"--category_names {path}: the name of {wrong!r} is {names[wrong]!r:.40}, not a string")
    return names
