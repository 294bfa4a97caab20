"""The label audit's results kept beside the feature store, so a rerun on the same features and labels reuses them.

FLOWERCLF_STORE/audit/KEY.json holds the ranked suspects of one audit: KEY is the sha256 of its features, labels,
folds and weight decays, this module's VERSION and cleanlab's version, so anything that would change the answer
is another key. A file there that fails its checks (damaged, cut short, or not one of ours) is audited again and
replaced; files whose names are not ours are never read or deleted. The KEEP most recently used are kept.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import stat
from importlib import metadata
from typing import Callable, Sequence

import numpy as np

from flowerclf.base.files import atomic_write
from flowerclf.features.store import store_dir

VERSION = 1           # bump when the heads, the ranking or the file's fields change
KEEP = 32             # audit files kept (about 50 bytes a suspect: 0.1 MiB for flowers5-dev's)
NAME = re.compile(r"[0-9a-f]{64}\.json")
_BYTES_PER_ROW = 256  # a file larger than this per audited photo (plus a little) is not one of ours


def cache_dir() -> str:
    """FLOWERCLF_STORE/audit."""
    return os.path.join(store_dir(), "audit")


def _cleanlab_version() -> str:
    try:
        return metadata.version("cleanlab")
    except metadata.PackageNotFoundError:
        return "missing"


def audit_key(features: Sequence[np.ndarray], labels: np.ndarray, folds: int, weight_decays: Sequence[float]) -> str:
    """The sha256 naming an audit of these features (one array per backbone) and labels; arrays are hashed in
    place, not copied."""
    h = hashlib.sha256(json.dumps({"version": VERSION, "cleanlab": _cleanlab_version(), "folds": folds,
                                   "weight_decays": list(weight_decays),
                                   "shapes": [list(x.shape) for x in features]}).encode())
    for x in features:
        h.update(np.ascontiguousarray(x, np.float32))
    h.update(np.ascontiguousarray(labels, np.int64))
    return h.hexdigest()


def _valid(found, rows: int, classes: int, weight_decays: Sequence[float]) -> bool:
    """Whether `found` is an audit of `rows` photos and `classes` classes as label_audit returns it."""
    if not (isinstance(found, dict) and set(found) == {"weight_decay", "log_loss", "suspects"}
            and isinstance(found["suspects"], list)):
        return False
    chosen = found["weight_decay"] if isinstance(found["weight_decay"], list) else [found["weight_decay"]]
    if not chosen or not all(type(wd) is float and wd in weight_decays for wd in chosen):
        return False
    loss = found["log_loss"]
    if type(loss) not in (int, float) or not math.isfinite(loss) or loss < 0:
        return False
    seen = set()
    for s in found["suspects"]:
        if not (isinstance(s, list) and len(s) == 4 and type(s[0]) is int and type(s[1]) is int
                and 0 <= s[0] < rows and 0 <= s[1] < classes and s[0] not in seen
                and all(type(p) in (int, float) and 0 <= p <= 1 for p in s[2:])):  # NaN fails 0 <= p
            return False
        seen.add(s[0])
    return True


def load(key: str, rows: int, classes: int, weight_decays: Sequence[float]) -> dict | None:
    """The stored audit named `key`, or None: none stored, or one that fails its checks."""
    path = os.path.join(cache_dir(), key + ".json")
    limit = _BYTES_PER_ROW * rows + 4096  # bounded by the audit, never by the file
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:  # a FIFO or /dev/zero would never end
            return None
        with open(path, "rb") as f:
            found = json.loads(f.read(limit + 1))
        os.utime(path)  # most recently used: kept longest
    except (OSError, ValueError):  # none, unreadable, not JSON or not UTF-8
        return None
    return found if _valid(found, rows, classes, weight_decays) else None


def save(key: str, found: dict, warn: Callable[[str], None]) -> None:
    """Keep `found` under `key` (atomically), then remove our least recently used files beyond KEEP."""
    folder = cache_dir()
    try:
        atomic_write(os.path.join(folder, key + ".json"), lambda f: f.write(json.dumps(found).encode()),
                     durable=False)  # a lost file is only an audit done again
    except OSError as e:
        warn(f"warning: could not keep the audit for reruns in {folder} ({e}); the next run audits again")
        return
    used = {}
    for e in _ours():
        with contextlib.suppress(FileNotFoundError):  # another run's pruning got there first
            used[e.path] = e.stat(follow_symlinks=False).st_mtime_ns
    for path in sorted(used, key=used.get)[:-KEEP]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _ours() -> list[os.DirEntry]:
    """Our audit files in cache_dir() (none if it cannot be read)."""
    try:
        return [e for e in os.scandir(cache_dir()) if NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
    except OSError:
        return []


def summary() -> tuple[int, int]:
    """(audit files, their bytes) in cache_dir()."""
    ours = _ours()
    return len(ours), sum(e.stat(follow_symlinks=False).st_size for e in ours)


def clear() -> int:
    """Delete our audit files; return how many."""
    ours = _ours()
    for e in ours:
        with contextlib.suppress(FileNotFoundError):
            os.remove(e.path)
    return len(ours)
