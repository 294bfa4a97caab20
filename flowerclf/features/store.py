"""The feature store: one SQLite file per user of float32 feature vectors, keyed by image content and feature setup.

Torch-free (standard library only; numpy only to check vectors in lookup), so `python cache.py` reads it
without importing torch.

Tables:
- files:   path -> (size, mtime, ctime, sha256 of the bytes): a file is read and hashed again
           only when its size or times change, so a rerun hashes nothing;
- setups:  one row per feature setup (backbone weights fingerprint, Preprocess, view, engine,
           precision, library versions: a JSON key), with the arch and weights names to show and the
           vector length (set by the first vector stored); ids are never reused (AUTOINCREMENT), so a
           vector written under a setup that `cache.py clear` deleted can never pass for another setup's;
- vectors: (setup, content sha256) -> the feature vector's float32 bytes.
A moved or renamed photo keeps its content hash, so it is a hit; an edited one is a miss.
WAL mode lets runs read while another writes; writers take turns (busy timeout).
A stored vector of the wrong length (torn) or with NaN or inf is dropped on lookup and computed again.
A store of a newer schema version is refused (never touched); one of an older version is rebuilt.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
import urllib.parse
from collections import Counter
from typing import Callable, Iterable, Sequence

STORE_NAME = "features.sqlite"
SCHEMA_VERSION = 2  # 2: setups ids AUTOINCREMENT (never reused), setups.dim
BUSY_TIMEOUT_S = 600  # another run's write batch is short; waiting this long means something is stuck
PAGE_SIZE = 65536     # on disk 1.08-1.16x the float32 bytes for 512- to 2,048-float vectors (4 KiB pages: up to 2x)
WAL_PAGES = 256       # checkpoint the write-ahead log at 16 MiB, and keep it no larger
_CHUNK = 500          # parameters per `IN (...)` query, well under SQLite's limit on every version
_DAMAGE = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                                  ctime_ns INTEGER NOT NULL, digest BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS setups (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE,
                                   arch TEXT NOT NULL, weights TEXT NOT NULL, detail TEXT NOT NULL, dim INTEGER);
CREATE TABLE IF NOT EXISTS vectors (setup INTEGER NOT NULL REFERENCES setups(id), digest BLOB NOT NULL,
                                    vector BLOB NOT NULL, PRIMARY KEY (setup, digest));
"""


def store_dir() -> str:
    """Where flowerclf keeps per-user files (the feature store, exported backbones): $FLOWERCLF_STORE
    (or its old name $FLOWERCLF_CACHE), else ~/.cache/flowerclf."""
    return (os.environ.get("FLOWERCLF_STORE") or os.environ.get("FLOWERCLF_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "flowerclf"))


def default_path() -> str:
    """The user's feature store file."""
    return os.path.join(store_dir(), STORE_NAME)


def file_digest(path: str) -> bytes:
    """sha256 of a file's bytes (1.7 GB/s here: 30 ms for flowers5-dev's 1,728 photos)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def _chunks(items: Sequence, size: int = _CHUNK):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _marks(n: int) -> str:
    return ",".join("?" * n)


class OtherFormat(sqlite3.DatabaseError):
    """An SQLite file, but no feature store of ours (a negative schema version)."""


class NewerStore(sqlite3.DatabaseError):
    """A feature store of a schema version newer than this code knows: refused, never set aside or changed.

    Its message names the file, the problem and the fix (cache.py turns it into FlowerclfError)."""


def _check_version(path: str, version: int) -> None:
    """Refuse a newer store; a negative version is no store of ours (damage). 0 (new) and older are fine."""
    if version > SCHEMA_VERSION:
        raise NewerStore(f"the feature store {path} is schema version {version}, newer than this flowerclf "
                         f"reads ({SCHEMA_VERSION}): upgrade flowerclf, or set FLOWERCLF_STORE to another folder")
    if version < 0:
        raise OtherFormat(f"schema version {version}, not {SCHEMA_VERSION}")


def _is_busy(error: sqlite3.Error) -> bool:
    return getattr(error, "sqlite_errorname", "").startswith("SQLITE_BUSY")


def _unusable(vectors: dict[bytes, bytes], dim: int | None) -> list[bytes]:
    """The content hashes whose stored vector is damage of its row: not `dim` float32s (torn), or NaN or inf.

    Without a recorded dim, the most common length among `vectors` stands for it.
    """
    if not vectors:
        return []
    import numpy as np  # only here: `cache.py info` and the rest of the store need the standard library only

    size = 4 * dim if dim else Counter(map(len, vectors.values())).most_common(1)[0][0]
    torn = {d for d, v in vectors.items() if len(v) != size or not size or size % 4}
    whole = [d for d in vectors if d not in torn]
    if whole:
        finite = np.isfinite(np.frombuffer(b"".join(vectors[d] for d in whole), np.float32).reshape(len(whole), -1))
        return [*torn, *(d for d, ok in zip(whole, finite.all(axis=1)) if not ok)]
    return list(torn)


def _is_damage(error: sqlite3.DatabaseError) -> bool:
    """Damage (garbage, a torn or foreign file), as opposed to a lock or a full disk."""
    return isinstance(error, OtherFormat) or getattr(error, "sqlite_errorname", "") in _DAMAGE


class FeatureStore:
    """One open store file. A damaged file is set aside (with one warning) and a new store started in its place."""

    def __init__(self, path: str, warn: Callable[[str], None], read_only: bool = False):
        """`read_only` (`cache.py info`): open it as it is, change nothing (see _open_read_only)."""
        self.path, self.warn, self.read_only = path, warn, read_only
        self.db, self.version, self._gone = None, SCHEMA_VERSION, set()
        if read_only:
            self._open_read_only()
            return
        try:
            self._connect()
        except NewerStore:
            self.db.close()
            raise
        except sqlite3.DatabaseError as e:
            self._set_aside_if_damaged(e)
            self._connect()

    def _connect(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        _check_version(self.path, self.db.execute("PRAGMA user_version").fetchone()[0])  # before any write
        self.db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # takes effect only while the file is empty
        self._again_while_busy("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a killed process loses nothing committed
        self.db.execute(f"PRAGMA wal_autocheckpoint = {WAL_PAGES}")
        self.db.execute(f"PRAGMA journal_size_limit = {WAL_PAGES * PAGE_SIZE}")
        with self._write():
            old = self.db.execute("PRAGMA user_version").fetchone()[0]  # again: another run may have just set it
            _check_version(self.path, old)
            if 0 < old < SCHEMA_VERSION:  # its vectors may sit under a reused setup id: start them afresh
                self.db.execute("DROP TABLE IF EXISTS vectors")
                self.db.execute("DROP TABLE IF EXISTS setups")
            for statement in _SCHEMA.split(";")[:-1]:  # not executescript: it would commit first
                self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if 0 < old < SCHEMA_VERSION:
            self.warn(f"note: feature store {self.path} was schema version {old}; rebuilt it as version "
                      f"{SCHEMA_VERSION} (remembered file hashes kept, features are computed again as needed)")

    def _again_while_busy(self, statement: str) -> None:
        """Run `statement`, again after a growing pause (up to the busy timeout) while SQLite says SQLITE_BUSY.

        Switching a brand-new file to WAL while another process writes it (creating it too) fails at once with
        "database is locked": SQLite reads the header under a read lock, then asks for the write lock, and
        calls the busy handler only for a connection that holds no lock (deadlock avoidance), so the busy
        timeout alone does not make two runs take turns there.
        """
        deadline, pause = time.monotonic() + BUSY_TIMEOUT_S, 0.001
        while True:
            try:
                self.db.execute(statement).fetchall()
                return
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(2 * pause, 0.1)

    def _open_read_only(self) -> None:
        """Open the file for reading only: no schema, no pragma writes, no -wal or -shm file made, so it works
        on a read-only file or folder. A store is refused only when it is of a newer version (NewerStore).

        A -wal file exists while any run has the store open: then read through it (mode=ro). Without one,
        nobody has it open, and it is read as immutable, without locks or a -shm file (which mode=ro would
        make, and cannot in a read-only folder). A run starting meanwhile writes to a new -wal file and
        changes the file itself only at its first checkpoint (after WAL_PAGES pages).
        """
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        if not os.path.exists(self.path + "-wal"):
            uri += "&immutable=1"
        self.db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self.version = self.db.execute("PRAGMA user_version").fetchone()[0]
        try:
            _check_version(self.path, self.version)
        except sqlite3.DatabaseError:
            self.db.close()
            raise

    def _set_aside_if_damaged(self, error: sqlite3.DatabaseError) -> None:
        """Move a damaged store (and its -wal/-shm) to STORE.damaged; re-raise anything else (a lock, a full disk)."""
        if not _is_damage(error) or self.read_only:  # read-only: report it, change nothing
            raise error
        if self.db is not None:
            self.db.close()
        aside = self.path + ".damaged"
        self.warn(f"warning: feature store {self.path} is damaged ({error}); moved it to {aside} and started "
                  f"a new one (features are computed again as needed)")
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(self.path + suffix, aside + suffix)
            except FileNotFoundError:  # another run set it aside first
                pass

    def _retry_if_damaged(self, work: Callable):
        """Run `work()`; when it finds the file damaged, set it aside, start a new store and run it again."""
        try:
            return work()
        except sqlite3.DatabaseError as e:
            self._set_aside_if_damaged(e)
            self._connect()
            return work()

    @contextlib.contextmanager
    def _write(self):
        """A write transaction, taken at once (BEGIN IMMEDIATE) so two writers queue instead of deadlocking."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.db.in_transaction:  # SQLite may have rolled back already (a damaged page, a full disk)
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ keys

    def digests(self, paths: Sequence[str]) -> list[bytes]:
        """The content hash of each file: remembered per path, recomputed only when its size or times change."""
        paths = [os.path.abspath(p) for p in paths]
        stats = [os.stat(p) for p in paths]
        memo, out, fresh = {}, [], []
        for part in _chunks(paths):
            memo.update((r[0], r[1:]) for r in self.db.execute(
                f"SELECT path, size, mtime_ns, ctime_ns, digest FROM files WHERE path IN ({_marks(len(part))})", part))
        for path, st in zip(paths, stats):
            stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            row = memo.get(path)
            if row is not None and tuple(row[:3]) == stamp:
                out.append(row[3])
            else:
                out.append(file_digest(path))
                fresh.append((path, *stamp, out[-1]))
        if fresh:
            with self._write():
                self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", fresh)
        return out

    def lookup(self, paths: Sequence[str], key: dict, arch: str, weights: str
               ) -> tuple[list[bytes], int, dict[bytes, bytes]]:
        """(content hash of each file, setup id, the stored vectors among them: content hash -> float32 bytes).

        `key` is everything but the image that changes a vector; it is registered on first use,
        with the arch and weights names that `cache.py info` shows.
        """
        text = json.dumps(key, sort_keys=True)
        name = hashlib.sha256(text.encode()).hexdigest()

        def find():  # again from the start on a new store when this one turns out damaged
            digests = self.digests(paths)
            with self._write():
                self.db.execute("INSERT OR IGNORE INTO setups (key, arch, weights, detail) VALUES (?, ?, ?, ?)",
                                (name, arch, weights, text))
            setup, dim = self.db.execute("SELECT id, dim FROM setups WHERE key = ?", (name,)).fetchone()
            found, torn = {}, []
            for part in _chunks(list(dict.fromkeys(digests))):
                some = dict(self.db.execute(
                    f"SELECT digest, vector FROM vectors WHERE setup = ? AND digest IN ({_marks(len(part))})",
                    (setup, *part)))
                torn += [(setup, d, some.pop(d)) for d in _unusable(some, dim)]
                found.update(some)
            if torn:  # deleted, so that the vectors computed again in their place are stored
                with self._write():
                    self.db.executemany("DELETE FROM vectors WHERE setup = ? AND digest = ? AND vector = ?", torn)
                self.warn(f"warning: feature store {self.path}: {len(torn):,} stored feature vectors were damaged "
                          f"(torn, or NaN or inf); dropped them, they are computed again")
            return digests, setup, found
        return self._retry_if_damaged(find)

    def put(self, setup: int, rows: Iterable[tuple[bytes, bytes]]) -> int:
        """Store (content hash, float32 bytes) rows in one transaction; a vector already there is kept.

        Returns how many were stored. Nothing is stored under a setup that is gone (`cache.py clear` during
        the run; one warning per setup), nor a vector whose length differs from the setup's first one.
        """
        rows = list(rows)
        with self._write():
            row = self.db.execute("SELECT dim FROM setups WHERE id = ?", (setup,)).fetchone()
            if row is None:
                if setup not in self._gone:
                    self._gone.add(setup)
                    self.warn(f"warning: feature store {self.path}: these features were cleared from it during "
                              f"this run (cache.py clear); the rest of this pass is not stored")
                return 0
            dim = row[0]
            if dim is None:  # the setup's first vector sets the length of all
                dim = next((len(v) // 4 for _, v in rows if v and len(v) % 4 == 0), None)
                if dim is None:
                    return 0
                self.db.execute("UPDATE setups SET dim = ? WHERE id = ?", (dim, setup))
            return self.db.executemany("INSERT OR IGNORE INTO vectors (setup, digest, vector) VALUES (?, ?, ?)",
                                       ((setup, d, v) for d, v in rows if len(v) == 4 * dim)).rowcount


def open_store(warn: Callable[[str], None], path: str | None = None) -> FeatureStore | None:
    """The user's store, or None (with one warning) when it cannot be opened: features are then computed anyway."""
    path = path or default_path()
    try:
        return FeatureStore(path, warn)
    except NewerStore as e:
        warn(f"warning: {e}; features are computed without it")
        return None
    except (sqlite3.Error, OSError) as e:
        warn(f"warning: cannot open the feature store {path} ({e}); features are computed without it "
             f"(set FLOWERCLF_STORE to a writable folder)")
        return None
