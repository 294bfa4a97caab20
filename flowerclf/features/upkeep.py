"""The store's upkeep for cache.py: what it and the working copies beside it hold, their size on disk, clearing."""
from __future__ import annotations

import os
import shutil

from flowerclf.base.files import TEMP_PREFIX
from flowerclf.features.copies import copies_dir
from flowerclf.features.store import FeatureStore


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

def copies_summary() -> tuple[int, int]:
    """(working copies, their bytes on disk) beside the store."""
    count = size = 0
    for root, _, names in os.walk(copies_dir()):
        for name in names:
            if name.endswith(".jpg") and not name.startswith(TEMP_PREFIX):  # not a killed writer's temp file
                try:
                    size += os.path.getsize(os.path.join(root, name))
                    count += 1
                except OSError:  # removed meanwhile
                    pass
    return count, size

def clear_copies() -> int:
    """Remove every working copy (fine-tuning makes them again as it needs them); returns how many there were."""
    count = copies_summary()[0]
    shutil.rmtree(copies_dir(), ignore_errors=True)
    return count
