"""The save directory of a training run: one run at a time, never inside the data, no silent overwrite."""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from typing import Callable, Iterator

from flowerclf.base.errors import FlowerclfError
from flowerclf.base.files import remove_stale_temp_files
from flowerclf.base.runfiles import RunFiles
from flowerclf.data.folders import SPLITS, is_inside


def check_not_in_data(save_dir: str, data_dir: str, what: str = "--save_dir") -> None:
    """Outputs written into a split would be read back as images of a class (or a new class)."""
    # with no train/, DATA_DIR's own folders are the classes (data.folders.scan_data_dir splits them)
    for split in SPLITS if os.path.isdir(os.path.join(data_dir, "train")) else ("",):
        if is_inside(save_dir, os.path.join(data_dir, split)):
            raise FlowerclfError(f"{what} {save_dir} is inside {os.path.join(data_dir, split)}, so the files written "
                                 f"there would become training images; pick a folder outside DATA_DIR's splits")


class Claim:
    """A held save directory; with --overwrite, the previous run's outputs wait in a hidden folder.

    They stay there, whole, until this run's first checkpoint.pth is written (`saved`), and go
    back where they were when the run fails before that (an error, NaN, Ctrl-C).
    """

    def __init__(self, files: RunFiles, log: Callable[[str], None]):
        self.files, self.log, self.aside = files, log, []

    def set_aside(self, paths: list[str]) -> None:
        os.makedirs(self.files.previous, exist_ok=True)
        for path in paths:
            os.replace(path, os.path.join(self.files.previous, os.path.basename(path)))
            self.aside.append(os.path.basename(path))
        self.log(f"--overwrite: moved the previous run's {', '.join(self.aside)} into "
                 f"{self.files.previous}/ until this run saves its first checkpoint")

    def saved(self) -> None:
        """This run has a checkpoint now: the previous run's outputs go."""
        if os.path.isdir(self.files.previous):
            shutil.rmtree(self.files.previous)
        if self.aside:
            self.log(f"--overwrite: removed the previous run's {', '.join(self.aside)}")
            self.aside = []

    def restore(self) -> list[str]:
        """Put the set-aside outputs back (over anything of this run's); return their names."""
        if not os.path.isdir(self.files.previous):
            return []
        names = sorted(os.listdir(self.files.previous))
        for name in names:
            os.replace(os.path.join(self.files.previous, name), os.path.join(self.files.folder, name))
        os.rmdir(self.files.previous)
        self.aside = []
        return names


@contextmanager
def claim(files: RunFiles, data_dir: str, overwrite: bool, resume: bool,
          log: Callable[[str], None]) -> Iterator[Claim]:
    """Hold the save directory for this run: locked against a second run, checked writable before any work.

    Another run's checkpoint.pth is replaced only with `overwrite` and continued with `resume`.
    With `overwrite` its outputs (all of them, so nothing describes two models) are set aside
    and removed once this run's first checkpoint exists, or put back if this run fails first.
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
        remove_stale_temp_files(save_dir)  # of saves a kill -9 cut short
        held = Claim(files, log)
        if os.path.isdir(files.previous):  # an --overwrite run was killed: keep whichever model is whole
            if os.path.exists(files.checkpoint):
                held.saved()
            else:
                log(f"put back the previous run's {', '.join(held.restore())}, which a killed --overwrite run "
                    f"had set aside")
        existing = [path for path in files.outputs() if os.path.exists(path)]
        if files.checkpoint in existing and not (overwrite or resume):
            raise FlowerclfError(f"{files.checkpoint} holds another run's model; pass --overwrite to replace it, "
                                 f"--resume to continue it, or another --save_dir")
        if overwrite and existing:
            held.set_aside(existing)
        try:
            yield held
        except BaseException:
            put_back = held.restore()
            if put_back:
                log(f"--overwrite: this run failed before its first checkpoint; put back the previous run's "
                    f"{', '.join(put_back)}")
            raise
        held.saved()
    finally:
        lock.close()  # closing releases the lock
