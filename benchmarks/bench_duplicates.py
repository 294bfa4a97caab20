"""Near-duplicate threshold and search time: how similar copies and distinct photos are, and 100,000 vectors.

usage: python benchmarks/bench_duplicates.py DATA_DIR [--arch efficientnet_lite0] [--copies 150] [--vectors 100000]

1. Copies of `--copies` training photos (half size, JPEG quality 50, mirrored, and all three at once):
   the cosine of each copy's frozen features with its original's, their thumbnails', and the share the
   audit catches (both at or above their thresholds);
2. every distinct photo's nearest other photo in DATA_DIR (train, valid and test): its cosine, and how
   many pass NEAR_COSINE (the features only propose pairs: thumbnails confirm them);
3. nearest_pairs on `--vectors` random unit vectors of the backbone's width with 1% planted noisy copies:
   the seconds it takes and the share of planted copies it finds, against the same search on 10,000.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowerclf.data.folders import ImageSet, scan_data_dir  # noqa: E402
from flowerclf.evaluation.duplicates import (NEAR_COSINE, SAME_PICTURE, content_digests,  # noqa: E402
                                             nearest_pairs, thumbnail_vectors)
from flowerclf.features.passes import FeaturePass  # noqa: E402
from flowerclf.models.registry import ModelSpec, build_model, freeze, resolve_weights  # noqa: E402
from flowerclf.runtime.devices import resolve_device  # noqa: E402

COPIES = {
    "half size": lambda im: im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.BICUBIC),
    "JPEG q50": lambda im: im,
    "mirrored": ImageOps.mirror,
    "all three": lambda im: ImageOps.mirror(im.resize((max(1, im.width // 2), max(1, im.height // 2)))),
}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def features(passes, files: list[str], desc: str) -> np.ndarray:
    return unit(passes.features(ImageSet("", files, [0] * len(files)), desc)[0].numpy())


def search_time(n: int, d: int, rng) -> tuple[float, float]:
    """(seconds of nearest_pairs on n random vectors with n/100 planted copies, share of the copies found)."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    planted = n // 100
    x[-planted:] = x[:planted] + 0.15 * rng.standard_normal((planted, d)).astype(np.float32)  # cosine ~0.99
    start = time.perf_counter()
    pairs = nearest_pairs(x)
    seconds = time.perf_counter() - start
    found = {(i, j) for i, j, _ in pairs}
    return seconds, sum((i, n - planted + i) in found for i in range(planted)) / planted


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--copies", type=int, default=150)
    p.add_argument("--vectors", type=int, default=100000)
    args = p.parse_args(argv)
    device = resolve_device("cpu", False)
    weights = resolve_weights(args.arch, "DEFAULT").spec  # as train.py names them: the store's vectors are reused
    model, preprocess = build_model(ModelSpec(args.arch, weights, [8], 0.0, 2))
    freeze(model.backbone)
    splits = scan_data_dir(args.data_dir)
    files = [f for s in splits.values() for f in s.files]
    rng = np.random.default_rng(0)
    originals = [files[i] for i in rng.choice(len(splits["train"]), args.copies, replace=False)]
    with tempfile.TemporaryDirectory() as tmp, FeaturePass(model.backbone, args.arch, weights, preprocess,
                                                            "auto", device, False, 64, 0, True, print) as passes:
        every = features(passes, files, "all photos")
        index = {f: i for i, f in enumerate(files)}
        for name, change in COPIES.items():
            made = []
            for k, f in enumerate(originals):
                path = os.path.join(tmp, f"{name.replace(' ', '_')}_{k}.jpg")
                change(Image.open(f).convert("RGB")).save(path, quality=50 if "JPEG" in name or "all" in name else 90)
                made.append(path)
            cos = (features(passes, made, name) * every[[index[f] for f in originals]]).sum(axis=1)
            thumbs = [(thumbnail_vectors(f), thumbnail_vectors(c)) for f, c in zip(originals, made)]
            alike = np.array([max(a[0] @ b[0], a[0] @ b[1]) for a, b in thumbs])
            caught = ((cos >= NEAR_COSINE) & (alike >= SAME_PICTURE)).mean()
            print(f"copies, {name:10s}: cosine with the original min {cos.min():.3f}  1% {np.quantile(cos, .01):.3f}"
                  f"  median {np.median(cos):.3f}; thumbnails min {alike.min():.3f}; caught {100 * caught:.1f}%")
    digests = content_digests(files)
    sims = every @ every.T
    same = np.equal.outer(np.array(digests, dtype=object), np.array(digests, dtype=object))
    sims[same] = -1  # a photo and its exact copies are not "distinct"
    nearest = sims.max(axis=1)
    print(f"distinct photos ({len(files)}), nearest other: median {np.median(nearest):.3f}  "
          f"99% {np.quantile(nearest, .99):.3f}  max {nearest.max():.3f}; "
          f"{(nearest >= NEAR_COSINE).sum()} photos at >= NEAR_COSINE {NEAR_COSINE}")
    d = every.shape[1]
    base, base_found = search_time(10000, d, rng)
    big, big_found = search_time(args.vectors, d, rng)
    print(f"nearest_pairs, {d}-d: 10,000 vectors {base:.1f}s (found {100 * base_found:.0f}% of planted copies); "
          f"{args.vectors:,} vectors {big:.1f}s = {big / base:.1f}x (found {100 * big_found:.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
