"""Atomic file output: every file flowerclf writes appears whole or not at all."""
from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call write(binary file) on a temp file beside `path`, fsync, then rename it over `path`.

    A crash or kill at any moment leaves either the old file or the new one, never half of one.
    The file gets the usual mode (0666 less the umask), not mkstemp's private 0600.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(str(path))[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
