"""Duplicates and leaks among a data set's photos: exact ones by content hash, near ones by feature cosine.

A group of copies is a note within one class of one split, a conflict across classes, and a leak
across splits (a valid or test photo that training also saw inflates the accuracy reported on it).
Near-duplicates are the nearest neighbours at feature cosine >= NEAR_COSINE, found with faiss (an
exact inner-product search up to EXACT_UP_TO vectors, an inverted-file index above, so it stays fast at
100,000 photos), confirmed by their 16x16 grayscale thumbnails (cosine >= SAME_PICTURE, either way round).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from PIL import Image

from flowerclf.base.errors import FlowerclfError
from flowerclf.data.images import load_rgb
from flowerclf.features.store import file_digest

# Measured on flowers5-dev (128-pixel photos) with efficientnet_lite0 (benchmarks/bench_duplicates.py):
# half-size, JPEG q50 and mirrored copies score >= 0.836 feature cosine with their original (half size,
# JPEG q50 and mirrored at once: >= 0.766), but so do many distinct photos' nearest neighbours (median
# 0.79, up to 0.95), so the features only propose pairs; the copies' thumbnails score >= 0.997 and
# distinct photos' <= 0.961. NEAR_COSINE is the least the single changes scored, less a margin.
NEAR_COSINE = 0.83
SAME_PICTURE = 0.98
THUMBNAIL = 16       # pixels a side
NEIGHBOURS = 8       # the nearest photos each photo is compared with
EXACT_UP_TO = 20000  # vectors: an exact search up to here (n^2 d flops), inverted lists above
PROBES = 8


def content_digests(paths: Sequence[str], store=None) -> list[bytes]:
    """The sha256 of each file: the store's (it keeps one per path and computes those it lacks), or computed."""
    return store.digests(paths) if store is not None else [file_digest(p) for p in paths]


def thumbnail_vectors(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The photo's THUMBNAIL^2 grayscale pixels, centred and of unit length, and its mirror; None if unreadable."""
    try:  # the allow-listed open; a JPEG decoded at a fraction of its size
        small = load_rgb(path, draft=4 * THUMBNAIL).convert("L").resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR)
    except FlowerclfError:
        return None
    a = np.asarray(small, np.float64)
    a = a - a.mean()
    a /= max(np.linalg.norm(a), 1e-9)
    return a.ravel(), a[:, ::-1].ravel()


def _kind(members: list[dict]) -> dict:
    """What a group of copies is: its splits and classes, a conflict and/or a leak, or a note."""
    splits, classes = sorted({m["split"] for m in members}), sorted({m["class"] for m in members})
    leak = "train" in splits and len(splits) > 1
    kind = "leak" if leak else "conflict" if len(classes) > 1 else "note" if len(splits) == 1 else "across splits"
    return {"kind": kind, "across_classes": len(classes) > 1, "splits": splits, "classes": classes,
            "photos": [{"path": m["path"], "split": m["split"], "class": m["class"]} for m in members]}


def exact_groups(entries: list[dict], digests: Sequence[bytes]) -> list[dict]:
    """Groups of files with the same content hash; `entries` are {"path", "split", "class"} in digest order."""
    by_digest = defaultdict(list)
    for entry, digest in zip(entries, digests):
        by_digest[digest].append(entry)
    return [_kind(members) for members in by_digest.values() if len(members) > 1]


def nearest_pairs(vectors: np.ndarray, threshold: float = NEAR_COSINE, k: int = NEIGHBOURS
                  ) -> list[tuple[int, int, float]]:
    """(i, j, cosine) with i < j for every photo and its up to k nearest others at cosine >= threshold."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if n < 2:
        return []
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if n <= EXACT_UP_TO:
        index = faiss.IndexFlatIP(d)
    else:  # inverted lists: each photo is compared with the photos of its PROBES nearest of 4 sqrt(n) cells
        cells = int(4 * n ** 0.5)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cells, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10  # coarse cells are enough: a copy and its original fall in the same one or a neighbour
        index.train(x[np.random.default_rng(0).permutation(n)[:39 * cells]])  # k-means wants >= 39 per cell
        index.nprobe = PROBES
    index.add(x)
    sims, ids = index.search(x, min(k + 1, n))  # +1: each photo finds itself first
    pairs = {}
    for i, (row_s, row_i) in enumerate(zip(sims, ids)):
        for s, j in zip(row_s, row_i):
            if j >= 0 and j != i and s >= threshold:
                pairs[(min(i, j), max(i, j))] = float(s)
    return sorted((i, j, s) for (i, j), s in pairs.items())


def near_groups(entries: list[dict], vectors: np.ndarray, digests: Sequence[bytes],
                threshold: float = NEAR_COSINE) -> list[dict]:
    """Pairs of different files that show the same picture, most alike first: near features, alike thumbnails."""
    thumbs, found = {}, []
    for i, j, s in nearest_pairs(vectors, threshold):
        if digests[i] == digests[j]:  # exact copies are listed once, as exact groups
            continue
        for k in (i, j):
            if k not in thumbs:
                thumbs[k] = thumbnail_vectors(entries[k]["path"])
        if thumbs[i] is None or thumbs[j] is None:
            continue
        alike = max(float(thumbs[i][0] @ thumbs[j][0]), float(thumbs[i][0] @ thumbs[j][1]))
        if alike >= SAME_PICTURE:
            found.append({**_kind([entries[i], entries[j]]), "cosine": round(s, 4), "thumbnail": round(alike, 4)})
    return sorted(found, key=lambda g: (-g["thumbnail"], -g["cosine"]))


def leaked(groups: list[dict], split: str) -> set[str]:
    """The photos of `split` that have a copy in train."""
    return {p["path"] for g in groups if g["kind"] == "leak" for p in g["photos"] if p["split"] == split}


def duplicates_report(entries: list[dict], digests: Sequence[bytes], vectors: np.ndarray | None,
                      threshold: float = NEAR_COSINE) -> dict:
    """Exact and near copies, with the counts the summary line and the report quote."""
    exact = exact_groups(entries, digests)
    near = near_groups(entries, vectors, digests, threshold) if vectors is not None else []
    groups = exact + near
    return {
        "near_cosine": threshold, "same_picture": SAME_PICTURE, "exact": exact, "near": near,
        "counts": {"exact_groups": len(exact), "near_pairs": len(near),
                   "within_class": sum(g["kind"] == "note" for g in groups),
                   "across_classes": sum(g["across_classes"] for g in groups),
                   "valid_in_train": len(leaked(groups, "valid")), "test_in_train": len(leaked(groups, "test"))},
    }
