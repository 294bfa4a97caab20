"""A run's splits as told and kept: the lines it says first, and a carved split's record for the checkpoint.

Torch-free, like folders.py: train.py says these lines before importing torch.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from flowerclf.base.errors import FlowerclfError
from flowerclf.data.folders import ImageSet, class_names

SKEW = 3.0  # the largest class over the smallest beyond which the run says so (and --balance auto weights the loss)


def split_record(splits: dict[str, ImageSet]) -> dict | None:
    """A carved split as plain data for the checkpoint: source, seed, shares and each held-out part's paths."""
    held = {name: s for name, s in splits.items() if s.carved and name != "train"}
    if not held:
        return None
    first = next(iter(held.values())).carved
    return {"source": first["source"], "seed": first["seed"],
            "fractions": {name: s.carved["fraction"] for name, s in held.items()},
            "files": {name: sorted(os.path.relpath(f, s.root) for f in s.files) for name, s in held.items()}}


def apply_record(splits: dict[str, ImageSet], record, path: str) -> dict[str, ImageSet]:
    """The splits as `record` (split_record's, read from `path`) made them: a resumed run validates on the same
    photos, and photos added since go to train."""
    ok = (isinstance(record, dict) and isinstance(record.get("files"), dict) and record["files"]
          and all(isinstance(k, str) and isinstance(v, list) and all(isinstance(f, str) for f in v)
                  for k, v in record["files"].items()))
    if not ok:
        raise FlowerclfError(f"--resume: {path}: field 'split' is damaged; train again with --overwrite")
    carved = {name: s for name, s in splits.items() if s.carved}
    if ("train" not in carved or carved["train"].carved["source"] != record.get("source")
            or set(record["files"]) != set(carved) - {"train"}):  # the same held-out parts, none of them train
        raise FlowerclfError(f"--resume: {path} set aside {', '.join(list(record['files'])[:3])} from "
                             f"{'DATA_DIR' if record.get('source') == '.' else 'train/'}, but DATA_DIR is laid out "
                             f"otherwise now; resume on the data it was trained on, or train anew with --overwrite")
    pool = replace(carved["train"], files=[f for s in carved.values() for f in s.files],
                   labels=[label for s in carved.values() for label in s.labels])
    where = {rel: name for name, rels in record["files"].items() for rel in rels}
    parts: dict[str, list[int]] = {name: [] for name in carved}
    for i, f in enumerate(pool.files):
        parts[where.get(os.path.relpath(f, pool.root), "train")].append(i)
    empty = [name for name in parts if not parts[name]]  # train too: a record that holds out every photo
    if empty:
        raise FlowerclfError(f"--resume: {path} leaves {empty[0]} no photo of DATA_DIR now; resume on the data it was "
                             f"trained on, or train anew with --overwrite")
    return {**splits, **{name: replace(pool, files=[pool.files[i] for i in idx], labels=[pool.labels[i] for i in idx],
                                       carved=carved[name].carved) for name, idx in parts.items()}}


def split_label(name: str, images: ImageSet) -> str:
    """How a split is named to the user: its folder (val/), or what it was carved from (valid: 20% of train/)."""
    if not images.carved:
        return f"{images.name or name}/"
    return f"{name} ({_share(images)})"


def _share(images: ImageSet) -> str:
    """A carved part's share of its source: "20% of train/"."""
    source = "train/" if images.carved["source"] == "train" else f"{images.root}/"
    return f"{images.carved['fraction']:.0%} of {source}"


def class_counts(images: ImageSet) -> np.ndarray:
    """Photos per class, in output-index order."""
    return np.bincount(np.asarray(images.labels, dtype=np.int64), minlength=len(images.class_to_idx))


def skewed(counts: np.ndarray) -> bool:
    """The largest class holds more than SKEW times the photos of the smallest (a class with none is no skew: it has
    no photo to weigh, and describe() says so on its own line)."""
    present = counts[counts > 0]
    return bool(present.max() > SKEW * present.min())


def describe(splits: dict[str, ImageSet]) -> list[str]:
    """What a run says first: the folders it uses; how it split what had no split; classes too small to split;
    skew."""
    train, names = splits["train"], class_names(splits["train"].class_to_idx)
    sizes = [f"{len(train):,} photos, {len(names)} classes"] + [f"{len(s):,}" for s in list(splits.values())[1:]]
    lines = ["data: " + ", ".join(f"{n} ({size}; {_share(s)})" if s.carved else f"{s.name or n}/ ({size})"
                                  for (n, s), size in zip(splits.items(), sizes))]
    held = {n: s for n, s in splits.items() if s.carved and n != "train"}
    if held and train.carved["source"] == "train":
        lines.append(f"no validation folder (valid/, val/ or validation/): {len(held['valid']):,} photos of train/ "
                     f"validate ({held['valid'].carved['fraction']:.0%} of each class, seed {train.carved['seed']}, "
                     f"the same on a rerun), nothing copied; --valid_split sets the fraction")
    elif held:
        shares = "/".join(str(round(100 * s.carved["fraction"])) for s in splits.values())
        lines.append(f"no train/ folder: the class folders of {train.root}/ are split {shares} into "
                     f"{', '.join(splits)} per class (seed {train.carved['seed']}, the same on a rerun), "
                     f"nothing copied")
    counts = class_counts(train) + sum(class_counts(s) for s in held.values())
    for n, s in held.items():
        short = np.flatnonzero(class_counts(s) == 0)
        if len(short):
            shown = ", ".join(f"{names[i]!r} ({counts[i]})" for i in short[:10]) + (" ..." if len(short) > 10 else "")
            lines.append(f"too few photos to split, so {n} has no photo of: {shown} (photos per class; the rest "
                         f"stay in train); add photos to these classes")
    counts = class_counts(train)
    big, small = int(counts.argmax()), int(counts.argmin())
    none = np.flatnonzero(counts == 0)  # every photo of a class left out as unreadable (--skip_bad_images)
    if len(none):
        lines.append(f"no training photo of: {', '.join(repr(names[i]) for i in none[:10])}"
                     f"{' ...' if len(none) > 10 else ''}; the model cannot learn these classes: add photos")
    elif skewed(counts):
        lines.append(f"skewed classes: {names[big]!r} has {counts[big]:,} training photos, {names[small]!r} "
                     f"{counts[small]:,} ({counts[big] / counts[small]:.1f}x)")
    return lines
