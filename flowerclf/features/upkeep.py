"""The store's upkeep for cache.py: what it and the working copies beside it hold, their size on disk, clearing."""
from __future__ import annotations

import os
import re

from flowerclf.base.files import TEMP_PREFIX
from flowerclf.features.copies import copies_dir
from flowerclf.features.store import FeatureStore

COPY_NAME = re.compile(r"[0-9a-f]{64}\.jpg")  # copies.py's: the photo's sha256


def summary(store: FeatureStore) -> list[dict]:
    """Per arch and weights: stored vectors, their bytes and the number of setups (views, engines)."""
    rows = store._retry_if_damaged(lambda: store.db.execute(
        "SELECT s.arch, s.weights, count(DISTINCT s.id), count(v.digest), coalesce(sum(length(v.vector)), 0) "
        "FROM setups s LEFT JOIN vectors v ON v.setup = s.id GROUP BY s.arch, s.weights "
        "ORDER BY s.arch, s.weights").fetchall())
    return [dict(arch=a, weights=w, setups=s, entries=n, bytes=b) for a, w, s, n, b in rows]

def files_known(store: FeatureStore) -> int:
    """How many file paths have a remembered content hash."""
    return store._retry_if_damaged(lambda: store.db.execute("SELECT count(*) FROM files").fetchone()[0])

def clear(store: FeatureStore, arch: str | None = None) -> int:
    """Delete all vectors (and remembered hashes), or only `arch`'s; shrink the file. Returns vectors deleted."""
    where, args = ("WHERE arch = ?", (arch,)) if arch else ("", ())
    with store._write():
        ids = f"SELECT id FROM setups {where}"
        deleted = store.db.execute(f"DELETE FROM vectors WHERE setup IN ({ids})", args).rowcount
        store.db.execute(f"DELETE FROM setups {where}", args)
        if not arch:
            store.db.execute("DELETE FROM files")
    store.db.execute("VACUUM")
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return deleted

def disk_bytes(store: FeatureStore) -> int:
    """The store's size on disk, write-ahead log included."""
    return sum(os.path.getsize(store.path + s) for s in ("", "-wal") if os.path.exists(store.path + s))

def _copy_files():
    """(path, is a copy) of what the working copies' writers leave under copies_dir(): the copies, named by a
    sha256, and a killed writer's temp files. Nothing else there is ours to count or delete."""
    for root, _, names in os.walk(copies_dir()):
        for name in names:
            if COPY_NAME.fullmatch(name) or name.startswith(TEMP_PREFIX):
                yield os.path.join(root, name), not name.startswith(TEMP_PREFIX)


def copies_summary() -> tuple[int, int]:
    """(working copies, their bytes on disk) beside the store."""
    count = size = 0
    for path, is_copy in _copy_files():
        if is_copy:
            try:
                size += os.path.getsize(path)
                count += 1
            except OSError:  # removed meanwhile
                pass
    return count, size


def clear_copies() -> int:
    """Remove every working copy and its writers' temp files (fine-tuning makes them again as it needs them), then
    the folders left empty; a file we did not write stays, and so does its folder. Returns the copies removed."""
    count = 0
    for path, is_copy in list(_copy_files()):
        try:
            os.unlink(path)
            count += is_copy
        except OSError:  # removed meanwhile, or not ours to remove
            pass
    for root, _, _ in os.walk(copies_dir(), topdown=False):
        try:
            os.rmdir(root)  # only when empty
        except OSError:
            pass
    return count
