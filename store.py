"""The feature store: one SQLite file per user of float32 feature vectors, keyed by image content and feature setup.

Torch-free (standard library only), so `python cache.py` reads it without importing torch.

Tables:
- files:   path -> (size, mtime, ctime, sha256 of the bytes): a file is read and hashed again
           only when its size or times change, so a rerun hashes nothing;
- setups:  one row per feature setup (backbone weights fingerprint, Preprocess, view, engine,
           precision, library versions: a JSON key), with the arch and weights names to show;
- vectors: (setup, content sha256) -> the feature vector's float32 bytes.
A moved or renamed photo keeps its content hash, so it is a hit; an edited one is a miss.
WAL mode lets runs read while another writes; writers take turns (busy timeout).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from typing import Callable, Iterable, Sequence

STORE_NAME = "features.sqlite"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 600  # another run's write batch is short; waiting this long means something is stuck
PAGE_SIZE = 65536     # on disk 1.08-1.16x the float32 bytes for 512- to 2,048-float vectors (4 KiB pages: up to 2x)
WAL_PAGES = 256       # checkpoint the write-ahead log at 16 MiB, and keep it no larger
_CHUNK = 500          # parameters per `IN (...)` query, well under SQLite's limit on every version
_DAMAGE = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                                  ctime_ns INTEGER NOT NULL, digest BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS setups (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, arch TEXT NOT NULL,
                                   weights TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (setup INTEGER NOT NULL REFERENCES setups(id), digest BLOB NOT NULL,
                                    vector BLOB NOT NULL, PRIMARY KEY (setup, digest));
"""


def cache_dir() -> str:
    """Where flowerclf keeps per-user files (the feature store, exported backbones): $FLOWERCLF_CACHE or
    ~/.cache/flowerclf."""
    return os.environ.get("FLOWERCLF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowerclf")


def default_path() -> str:
    """The user's feature store file."""
    return os.path.join(cache_dir(), STORE_NAME)


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
    """An SQLite file, but not a feature store of this schema version."""


def _is_busy(error: sqlite3.Error) -> bool:
    return getattr(error, "sqlite_errorname", "").startswith("SQLITE_BUSY")


def _is_damage(error: sqlite3.DatabaseError) -> bool:
    """Damage (garbage, a torn or foreign file), as opposed to a lock or a full disk."""
    return isinstance(error, OtherFormat) or getattr(error, "sqlite_errorname", "") in _DAMAGE


class FeatureStore:
    """One open store file. A damaged file is set aside (with one warning) and a new store started in its place."""

    def __init__(self, path: str, warn: Callable[[str], None]):
        self.path, self.warn = path, warn
        self.db = None
        try:
            self._connect()
        except sqlite3.DatabaseError as e:
            self._set_aside_if_damaged(e)
            self._connect()

    def _connect(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise OtherFormat(f"schema version {version}, not {SCHEMA_VERSION}")
        self.db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # takes effect only while the file is empty
        self._again_while_busy("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a killed process loses nothing committed
        self.db.execute(f"PRAGMA wal_autocheckpoint = {WAL_PAGES}")
        self.db.execute(f"PRAGMA journal_size_limit = {WAL_PAGES * PAGE_SIZE}")
        with self._write():
            for statement in _SCHEMA.split(";")[:-1]:  # not executescript: it would commit first
                self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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

    def _set_aside_if_damaged(self, error: sqlite3.DatabaseError) -> None:
        """Move a damaged store (and its -wal/-shm) to STORE.damaged; re-raise anything else (a lock, a full disk)."""
        if not _is_damage(error):
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
            setup = self.db.execute("SELECT id FROM setups WHERE key = ?", (name,)).fetchone()[0]
            found = {}
            for part in _chunks(list(dict.fromkeys(digests))):
                found.update(self.db.execute(
                    f"SELECT digest, vector FROM vectors WHERE setup = ? AND digest IN ({_marks(len(part))})",
                    (setup, *part)))
            return digests, setup, found
        return self._retry_if_damaged(find)

    def put(self, setup: int, rows: Iterable[tuple[bytes, bytes]]) -> None:
        """Store (content hash, float32 bytes) rows in one transaction; a vector already there is kept."""
        with self._write():
            self.db.executemany("INSERT OR IGNORE INTO vectors (setup, digest, vector) VALUES (?, ?, ?)",
                                ((setup, d, v) for d, v in rows))

    # ------------------------------------------------------------ upkeep

    def summary(self) -> list[dict]:
        """Per arch and weights: stored vectors, their bytes and the number of setups (views, engines)."""
        rows = self._retry_if_damaged(lambda: self.db.execute(
            "SELECT s.arch, s.weights, count(DISTINCT s.id), count(v.digest), coalesce(sum(length(v.vector)), 0) "
            "FROM setups s LEFT JOIN vectors v ON v.setup = s.id GROUP BY s.arch, s.weights "
            "ORDER BY s.arch, s.weights").fetchall())
        return [dict(arch=a, weights=w, setups=s, entries=n, bytes=b) for a, w, s, n, b in rows]

    def files_known(self) -> int:
        """How many file paths have a remembered content hash."""
        return self._retry_if_damaged(lambda: self.db.execute("SELECT count(*) FROM files").fetchone()[0])

    def clear(self, arch: str | None = None) -> int:
        """Delete all vectors (and remembered hashes), or only `arch`'s; shrink the file. Returns vectors deleted."""
        where, args = ("WHERE arch = ?", (arch,)) if arch else ("", ())
        with self._write():
            ids = f"SELECT id FROM setups {where}"
            deleted = self.db.execute(f"DELETE FROM vectors WHERE setup IN ({ids})", args).rowcount
            self.db.execute(f"DELETE FROM setups {where}", args)
            if not arch:
                self.db.execute("DELETE FROM files")
        self.db.execute("VACUUM")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    def disk_bytes(self) -> int:
        """The store's size on disk, write-ahead log included."""
        return sum(os.path.getsize(self.path + s) for s in ("", "-wal") if os.path.exists(self.path + s))


def open_store(warn: Callable[[str], None], path: str | None = None) -> FeatureStore | None:
    """The user's store, or None (with one warning) when it cannot be opened: features are then computed anyway."""
    path = path or default_path()
    try:
        return FeatureStore(path, warn)
    except (sqlite3.Error, OSError) as e:
        warn(f"warning: cannot open the feature store {path} ({e}); features are computed without it "
             f"(set FLOWERCLF_CACHE to a writable folder)")
        return None
