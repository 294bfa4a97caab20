"""ImageFolder trees: scanning DATA_DIR's splits (carved where it has none), checking them, listing images, names.

Torch-free: scanning a folder needs no torch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from flowerclf.base.errors import FlowerclfError, brief
from flowerclf.base.runfiles import VALIDATION_FOLDERS
from flowerclf.data.images import check_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


SPLITS = ("train", *VALIDATION_FOLDERS, "test")  # the folders DATA_DIR may hold
DEFAULT_VALID_SPLIT = 0.2             # no validation folder: this fraction of train/ per class (Ultralytics' 80/20)
FLAT_SPLIT = {"valid": 0.15, "test": 0.15}  # class folders and no train/: 70/15/15


@dataclass
class ImageSet:
    """The images of one split: parallel lists of files and label indices."""

    root: str
    files: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    class_to_idx: dict[str, int] = field(default_factory=dict)
    name: str = ""              # the folder's own name (val, validation...); "" for carve()'s parts
    carved: dict | None = None  # carve()'s: {"source": the folder it came from, "fraction", "seed"}

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
        if is_inside(top, target):  # a link to / too (target + os.sep is "//")
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
    images = ImageSet(str(root), class_to_idx=dict(class_to_idx), name=root.name)
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


def validation_folder(data_dir: Path) -> str | None:
    """The one of valid/, val/ and validation/ that DATA_DIR holds, or None; two at once is an error."""
    found = [name for name in VALIDATION_FOLDERS if (data_dir / name).is_dir()]
    if len(found) > 1:
        raise FlowerclfError(f"{data_dir}/ has both {found[0]}/ and {found[1]}/, and either could be the validation "
                             f"split; keep one of them (merge or rename the other)")
    return found[0] if found else None


def scan_data_dir(data_dir: str | os.PathLike, valid_split: float | None = None,
                  seed: int = 0) -> dict[str, ImageSet]:
    """Scan DATA_DIR: train/, its validation folder (valid/, val/ or validation/; else `valid_split` of train/,
    0.2 by default) and test/ when present; with no train/, its class folders split 70/15/15."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise FlowerclfError(f"data directory {data_dir} is a file; give the folder that holds train/ and valid/")
    if not data_dir.is_dir():
        raise FlowerclfError(f"data directory {data_dir} does not exist")
    valid = validation_folder(data_dir)
    if not (data_dir / "train").is_dir():
        return _split_class_folders(data_dir, valid, valid_split, seed)
    if valid and valid_split:
        raise FlowerclfError(f"{data_dir}/{valid}/ exists, so --valid_split is not needed; drop one of them")
    if not valid and valid_split == 0:
        raise FlowerclfError(f"{data_dir}/ has no validation folder (valid/, val/ or validation/) and --valid_split "
                             f"is 0; add {data_dir}/val/CLASS/*.jpg, or drop --valid_split 0 to set aside "
                             f"{DEFAULT_VALID_SPLIT:.0%} of train/")
    for name in (valid, "test"):  # `ln -s train val`: it would validate on the photos it trains on
        if name and (data_dir / name).is_dir() and (is_inside(data_dir / name, data_dir / "train")
                                                    or is_inside(data_dir / "train", data_dir / name)):
            raise FlowerclfError(f"{data_dir}/{name}/ is train/ or holds it (a link?), so it would test on the "
                                 f"photos it trains on; give it photos of its own, or remove it to set aside a part "
                                 f"of train/")
    train = scan_split(data_dir / "train")
    _check_no_empty_class(train)
    if valid:
        sets = {"train": train, "valid": scan_split(data_dir / valid, train.class_to_idx)}
    else:
        sets = carve(train, {"valid": valid_split or DEFAULT_VALID_SPLIT}, seed, "train")
        if not sets["valid"].files:
            raise FlowerclfError(f"--valid_split {valid_split or DEFAULT_VALID_SPLIT} set aside no image: only "
                                 f"classes with 2 or more images in train/ give some; add images, or a val/ folder")
    if (data_dir / "test").is_dir():
        sets["test"] = scan_split(data_dir / "test", train.class_to_idx)
    return sets


def _split_class_folders(data_dir: Path, valid: str | None, valid_split: float | None,
                         seed: int) -> dict[str, ImageSet]:
    """DATA_DIR/CLASS/*.jpg and no train/: seeded, stratified train/valid/test parts, 70/15/15 by default."""
    split = [name for name in (valid, "test") if name and (data_dir / name).is_dir()]
    if split or not _class_dirs(data_dir):
        named = f" (a class named {split[0]}? its name is a split's: rename it)" if split else ""
        raise FlowerclfError(f"{data_dir}/ has no train/ folder; expected {data_dir}/train/CLASS/*.jpg (and "
                             f"val/CLASS/*.jpg, or a part of train/ is set aside), or only class folders "
                             f"{data_dir}/CLASS/*.jpg to split 70/15/15{named}")
    if valid_split == 0:
        raise FlowerclfError(f"{data_dir}/ holds class folders and no train/, so it is split into train, valid and "
                             f"test; --valid_split 0 would leave no validation split: drop it")
    images = scan_split(data_dir)
    _check_no_empty_class(images)
    sets = carve(images, {**FLAT_SPLIT, **({"valid": valid_split} if valid_split else {})}, seed, ".")
    if not sets["valid"].files:
        raise FlowerclfError(f"{data_dir}/ cannot be split: no class folder has 2 or more photos; add photos")
    if not sets["test"].files:  # every class too small for three parts: an empty test split would stop the run
        raise FlowerclfError(f"{data_dir}/ cannot be split into train, valid and test: no class folder has enough "
                             f"photos for all three (3 or more{', or a smaller --valid_split' if valid_split else ''})"
                             f"; add photos")
    return sets


def _check_no_empty_class(images: ImageSet) -> None:
    present = set(images.labels)
    empty = [c for c, i in images.class_to_idx.items() if i not in present]
    if empty:
        raise FlowerclfError(f"{images.root}/ class folders {empty} have no images; add images or remove the folders")


def _order(images: ImageSet, idx: list[int], seed: int) -> list[int]:
    """`idx` ordered by a seeded hash of each path under the split: the same order on every machine and run, and
    a photo added to a class changes no other class's part."""
    def key(i: int) -> bytes:
        rel = os.path.relpath(images.files[i], images.root)
        return hashlib.blake2b(f"{seed}/{rel}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return sorted(idx, key=key)


def carve(images: ImageSet, fractions: dict[str, float], seed: int, source: str) -> dict[str, ImageSet]:
    """Stratified, seeded parts: each class gives every part of `fractions` about its share (at least one photo
    while one stays in "train"), the rest is "train". Nothing is copied; `source` ("train", or "." for DATA_DIR
    itself) is recorded on each part."""
    if not all(0 < f < 1 for f in fractions.values()) or sum(fractions.values()) >= 1:
        raise FlowerclfError(f"--valid_split {fractions['valid']} must be above 0 and below "
                             f"{1 - sum(fractions.values()) + fractions['valid']:g}")
    labels = np.asarray(images.labels)
    parts: dict[str, list[int]] = {"train": [], **{name: [] for name in fractions}}
    for label in np.unique(labels):
        idx = _order(images, np.flatnonzero(labels == label).tolist(), seed)
        taken = 0
        for name, fraction in fractions.items():
            k = min(max(1, round(len(idx) * fraction)), len(idx) - 1 - taken)
            parts[name] += idx[taken:taken + k]
            taken += k
        parts["train"] += idx[taken:]
    share, unnamed = {"train": 1 - sum(fractions.values()), **fractions}, replace(images, name="")  # no folder's
    return {name: _part(unnamed, sorted(p), {"source": source, "fraction": round(share[name], 6), "seed": seed})
            for name, p in parts.items()}


def _part(images: ImageSet, idx: list[int], carved: dict | None) -> ImageSet:
    return replace(images, files=[images.files[i] for i in idx], labels=[images.labels[i] for i in idx],
                   class_to_idx=dict(images.class_to_idx), carved=carved)


def check_splits(splits: dict[str, ImageSet], full: bool = False, skip_bad: bool = False
                 ) -> tuple[dict[str, ImageSet], list[str]]:
    """Check every image; return the splits (bad files left out when `skip_bad`) and warning lines.

    Without `skip_bad`, bad files raise one error with a line per file.
    """
    warnings_, problems = [], []
    train_classes = set(splits["train"].class_to_idx)
    for name, images in splits.items():
        if name != "train" and not images.carved:  # a carved part's missing classes: describe() says why
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
            splits[name] = _part(images, keep, images.carved)
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
