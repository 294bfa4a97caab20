"""Atomic file output: every file flowerclf writes appears whole or not at all, even on Ctrl-C or a full disk."""
from __future__ import annotations

import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator

# atomic_write's temp files: `.flowerclf-tmp-PID-RANDOM.EXT`, so a sweep removes only ours, and only a dead writer's
TEMP_PREFIX = ".flowerclf-tmp-"


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C inside lets the block finish, then raises KeyboardInterrupt (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], durable: bool = True) -> None:
    """Call write(binary file) on a temp file beside `path`, fsync, then rename it over `path`.

    A crash or kill at any moment leaves either the old file or the new one, never half of one;
    Ctrl-C waits for the rename. `durable=False` skips the fsync: a killed process still leaves a
    whole file (the kernel has it), but a power cut may lose it. The file gets the usual mode
    (0666 less the umask), not mkstemp's private 0600. A failed write (a full disk) removes the
    temp file and names `path`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with interrupts_deferred():
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=os.path.splitext(str(path))[1],
                                   dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~_umask())
                write(f)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(e, OSError) and not e.filename:
                raise OSError(e.errno, e.strerror, str(path)) from None
            raise


def _alive(pid: int) -> bool:
    """True when a process `pid` exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is not ours to signal
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_stale_temp_files(folder: str) -> list[str]:
    """Remove the temp files atomic_write left in `folder` when its process was killed; return their names.

    Only names of our own pattern whose writer's pid is gone: a user's `.tmp-draft.txt`, or a save
    that a live process (another run, another script) is writing now, stays.
    """
    removed = []
    for name in os.listdir(folder):
        pid = name[len(TEMP_PREFIX):].split("-", 1)[0] if name.startswith(TEMP_PREFIX) else ""
        if pid.isascii() and pid.isdigit() and int(pid) > 0 and not _alive(int(pid)):
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:  # another sweep got there first
                continue
            removed.append(name)
    return removed
