"""The torch-free base: atomic files (Ctrl-C, a full disk, the umask) and progress lines."""
import errno
import os
import signal

import pytest
from conftest import TINY, one_error_line
from conftest import run_script as _main

import train
from flowerclf.base import files, progress


def test_ctrl_c_during_a_save_finishes_the_file_then_stops(tmp_path):
    path = tmp_path / "out.bin"

    def write(f):
        f.write(b"first half ")
        os.kill(os.getpid(), signal.SIGINT)
        f.write(b"second half")
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, write)
    assert path.read_bytes() == b"first half second half"


def test_a_full_disk_is_one_line_and_loses_nothing(tiny_run, tmp_path, monkeypatch):
    data, save = tiny_run
    work = tmp_path / "s"
    work.mkdir()
    for name in ("checkpoint.pth", "checkpoint_last.pth"):
        (work / name).write_bytes((save / name).read_bytes())
    before = (work / "checkpoint.pth").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full)
    code, _, err = _main(train, [data, "--save_dir", str(work), "--epochs", "4", "--resume"] + TINY)
    line = one_error_line(code, err)
    assert "No space left on device" in line and "MiB free in" in line and str(work) in line
    assert (work / "checkpoint.pth").read_bytes() == before
    assert not [f for f in os.listdir(work) if f.startswith(files.TEMP_PREFIX)]


def test_outputs_respect_the_umask(tiny_run):
    _, save = tiny_run
    old = os.umask(0o022)
    os.umask(old)
    for name in ("checkpoint.pth", "history.json", "training_curves.png"):
        assert (save / name).stat().st_mode & 0o777 == 0o666 & ~old


def test_progress_in_a_log_is_a_line_now_and_then(monkeypatch, capsys):  # (conftest turns them off elsewhere)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    assert list(progress.progress(range(3), "features train")) == [0, 1, 2]  # pytest's stderr is no terminal
    assert capsys.readouterr().err.splitlines()[-1].startswith("features train: batch 3/3, ")
