"""torchrun --nproc_per_node=2 on the CPU (gloo): frozen and fine-tuning paths, equivalence, failures."""
import contextlib
import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, make_image_folder, truncated_jpeg
from PIL import Image

from flowerclf.base.errors import FlowerclfError
from flowerclf.data.folders import scan_split
from flowerclf.features import store
from flowerclf.runtime import ddp

COMMON = ["--arch", "mobilenet_v3_small", "--weights", "none", "--hidden_units", "8", "--dropout", "0",
          "--batch_size", "6", "--engine", "torch", "--device", "cpu"]  # gloo on the CPU, GPUs or not


def _run(data, save, nproc, *extra, timeout=240, cache=None):
    """train.py under torchrun (nproc > 1) or alone; `cache`: another FLOWERCLF_STORE than the test's."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = launcher + [os.path.join(ROOT, "train.py"), data, "--save_dir", str(save)] + COMMON + list(extra)
    env = dict(os.environ, **({"FLOWERCLF_STORE": str(cache)} if cache else {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _predicts(data, save):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), os.path.join(data, "test", "1"),
                          str(save / "checkpoint.pth"), "--json"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.parametrize("extra", [[], ["--unfreeze", "1"]], ids=["frozen-stored", "unfreeze"])
@pytest.mark.slow
def test_two_processes_train_and_write_one_checkpoint(image_folder, tmp_path, _cache, extra):
    run = _run(image_folder, tmp_path / "s", 2, "--epochs", "2", *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("epoch 2/2") == 1  # only rank 0 prints
    assert "x 2 processes" in run.stdout
    files = sorted(os.listdir(tmp_path / "s"))
    assert [f for f in files if f.endswith(".pth")] == ["checkpoint.pth", "checkpoint_last.pth"]
    assert not [f for f in files if f.startswith((".tmp", ".flowerclf-tmp"))]
    ckpt = torch.load(tmp_path / "s" / "checkpoint.pth", weights_only=True)
    assert not any(k.startswith(("module.", "head.module.")) for k in ckpt["state_dict"])
    assert len(_predicts(image_folder, tmp_path / "s")) == 3
    if extra:
        return
    with contextlib.closing(sqlite3.connect(os.path.join(_cache, store.STORE_NAME))) as db:
        assert db.execute("SELECT count(*) FROM vectors").fetchone()[0] == 18 + 9 + 9  # each rank's shard
    make_image_folder(tmp_path / "new", per_class={"train": 1}, seed=7)
    shutil.copy(tmp_path / "new" / "train" / "1" / "1_0.png", os.path.join(image_folder, "train", "1", "new.png"))
    run = _run(image_folder, tmp_path / "s", 2, "--epochs", "1", "--overwrite")  # one miss: both ranks compute it
    assert run.returncode == 0, run.stderr[-3000:]
    assert "features train: 18 cached, 1 computed" in run.stdout and "features test: 9 cached, 0 computed" in run.stdout


@pytest.mark.slow
def test_a_store_warning_on_any_rank_reaches_the_user(image_folder, tmp_path):
    (tmp_path / "not-a-folder").write_text("")  # FLOWERCLF_STORE names a file: no rank can open a store there
    run = _run(image_folder, tmp_path / "s", 2, "--epochs", "1", cache=tmp_path / "not-a-folder")
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in ("", "[rank 1] "):
        assert f"\n{rank}warning: cannot open the feature store" in "\n" + run.stdout, run.stdout
    assert run.stdout.count("epoch 1/1") == 1  # progress stays rank 0's


def test_other_ranks_log_only_their_warnings_and_errors_with_their_rank(monkeypatch):
    monkeypatch.setattr(ddp, "rank", lambda: 3)
    said = []
    log = ddp.warnings_only(said.append)
    for line in ("epoch 1/2  train loss 0.1", "warning: feature store x: locked", "error: boom", "features ready"):
        log(line)
    assert said == ["[rank 3] warning: feature store x: locked", "[rank 3] error: boom"]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(image_folder, tmp_path):
    one = _run(image_folder, tmp_path / "one", 1, "--epochs", "4")
    two = _run(image_folder, tmp_path / "two", 2, "--epochs", "4", cache=tmp_path / "store2")  # not one's features
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert "features train: 0 cached, 18 computed" in two.stdout
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    # same features (each rank extracts half, then they swap), same batches, gradients averaged to
    # the same mean: accuracies agree exactly, losses to float rounding
    assert [h["valid_acc"] for h in h1] == [h["valid_acc"] for h in h2]
    np.testing.assert_allclose([h["valid_loss"] for h in h1], [h["valid_loss"] for h in h2], atol=1e-4)
    np.testing.assert_allclose([h["train_loss"] for h in h1], [h["train_loss"] for h in h2], atol=1e-4)


@pytest.mark.slow
def test_a_failing_rank_ends_the_job(image_folder, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad = os.path.join(image_folder, "train", "1", "1_0a.jpg")
    with open(bad, "wb") as f:
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])  # a valid header, truncated data: decoding fails
    assert scan_split(os.path.join(image_folder, "train")).files.index(bad) % 2 == 1  # rank 1's shard
    start = time.monotonic()
    run = _run(image_folder, tmp_path / "s", 2, "--epochs", "2", timeout=120)
    assert run.returncode != 0
    assert time.monotonic() - start < 120
    assert "[rank 1] error: " in run.stderr and "1_0a.jpg cannot be read" in run.stderr
    assert "[rank 1]: Traceback" not in run.stderr


@pytest.mark.slow
def test_the_ranks_a_failing_rank_leaves_end_with_one_line(image_folder, tmp_path):
    truncated_jpeg(os.path.join(image_folder, "train", "1", "1_0a.jpg"))  # rank 1's shard, as above
    with socket.socket() as s:  # the two ranks by hand, as torchrun starts them, so no launcher stops rank 0
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), image_folder, "--save_dir", str(tmp_path / "s"),
               "--epochs", "2", "--no_store"] + COMMON
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                      env=env))
    (_, err0), (_, err1) = (p.communicate(timeout=120) for p in procs)
    assert procs[1].returncode == 2 and err1.strip().startswith("[rank 1] error: ") and "cannot be read" in err1
    lines = err0.strip().splitlines()
    assert procs[0].returncode == 1 and len(lines) == 1, err0[-3000:]
    assert lines[0].startswith("[rank 0] error: another process of this torchrun job failed")


def test_a_process_group_that_cannot_form_is_one_error(monkeypatch):
    for name, value in dict(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="notaport").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(FlowerclfError, match=r"could not join the job \(ValueError: .*MASTER_PORT"):
        ddp.join(torch.device("cpu"), 10)


def test_more_processes_per_node_than_gpus_is_one_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of a node with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(FlowerclfError, match=r"torchrun started 2 processes on this node but it has 1 CUDA "
                                             r"device\(s\); pass --nproc_per_node=1"):
        ddp.join(torch.device("cuda"), 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.slow
def test_torchrun_with_more_processes_than_gpus_stops_with_one_line(image_folder, tmp_path):
    nproc = torch.cuda.device_count() + 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "train.py"), image_folder, "--save_dir", str(tmp_path), "--device", "cuda",
           "--arch", "mobilenet_v3_small", "--weights", "none", "--epochs", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if "error: torchrun started" in line]
    assert len(lines) == 1 and f"[rank {nproc - 1}] error:" in lines[0], run.stderr[-3000:]
    assert f"[rank {nproc - 1}]: Traceback" not in run.stderr
