"""The save directory of a training run: one run at a time, never inside the data, no silent overwrite."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from typing import Callable, Iterator

from flowerclf.base.errors import FlowerclfError
from flowerclf.base.runfiles import RunFiles
from flowerclf.data.folders import SPLITS


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def check_not_in_data(save_dir: str, data_dir: str) -> None:
    """Outputs written into a split would be read back as images of a class (or a new class)."""
    for split in SPLITS:
        if _inside(save_dir, os.path.join(data_dir, split)):
            raise FlowerclfError(f"--save_dir {save_dir} is inside {os.path.join(data_dir, split)}, so its charts "
                                 f"would become training images; pick a folder outside DATA_DIR's splits")


@contextmanager
def claim(files: RunFiles, data_dir: str, overwrite: bool, resume: bool,
          log: Callable[[str], None]) -> Iterator[None]:
    """Hold the save directory for this run: locked against a second run, checked writable before any work.

    Another run's checkpoint.pth is replaced only with `overwrite` (its other outputs are removed
    first, so nothing describes the old model) and continued with `resume`.
    """
    save_dir = files.folder
    check_not_in_data(save_dir, data_dir)
    os.makedirs(save_dir, exist_ok=True)
    lock = open(files.lock, "a+")  # an unwritable folder fails here, before any work
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise FlowerclfError(f"another train.py (pid {lock.read().strip() or '?'}) is writing to {save_dir}; "
                                 f"wait for it to finish or pick another --save_dir") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        for name in os.listdir(save_dir):  # temp files of saves a kill -9 cut short; we hold the lock
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(save_dir, name))
        existing = [path for path in files.outputs() if os.path.exists(path)]
        if files.checkpoint in existing and not (overwrite or resume):
            raise FlowerclfError(f"{files.checkpoint} holds another run's model; pass --overwrite to replace it, "
                                 f"--resume to continue it, or another --save_dir")
        if overwrite and existing:
            for path in existing:
                os.unlink(path)
            log(f"--overwrite: removed the previous run's {', '.join(os.path.basename(p) for p in existing)}")
        yield
    finally:
        lock.close()  # closing releases the lock
