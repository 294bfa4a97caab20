"""Data sets to start from: Oxford Flowers-102 laid out for train.py, or a synthetic demo (`python data_utils.py`)."""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flowerclf.base.cli import ArgumentParser, run_main, whole_number
from flowerclf.base.errors import FlowerclfError

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
    if source and not any(_has_flowers_files(f) for f in (Path(source), Path(source) / "flowers-102")):
        raise FlowerclfError(f"--source {source} has no {', '.join(FLOWERS_FILES)}; point it at the folder "
                             f"that holds them, or leave --source out to download")
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


def build_parser() -> ArgumentParser:
    """The command-line interface of `python data_utils.py`."""
    p = ArgumentParser("data_utils.py", "Prepare data sets for train.py.",
                       "examples:\n  python data_utils.py flowers102 flowers\n"
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
    f.add_argument("--seed", type=whole_number, default=0, help="seed of the percentage split (default: %(default)s)")
    d = sub.add_parser("demo", help="write a tiny synthetic set of drawn shapes (not flowers) to DIR")
    d.add_argument("dir", metavar="DIR", help="output folder")
    d.add_argument("--seed", type=whole_number, default=0, help="random seed (default: %(default)s)")
    return p


def prepare(args: argparse.Namespace) -> None:
    """Run the chosen data preparation command and say what was written."""
    if args.command == "flowers102":
        counts = prepare_flowers102(args.dir, args.split, args.source, args.seed)
    else:
        counts = make_demo(args.dir, seed=args.seed)
    what = "synthetic shapes (not flowers)" if args.command == "demo" else "Oxford Flowers-102"
    print(f"{what} in {args.dir}: " + ", ".join(f"{n} {split}" for split, n in counts.items()))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, prepare the data set; return the exit code."""
    return run_main(build_parser(), argv, prepare)
