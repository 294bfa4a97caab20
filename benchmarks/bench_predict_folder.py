"""Peak memory and speed of predict.py --csv on a large folder against a folder a tenth of its size.

usage: python benchmarks/bench_predict_folder.py [--large 50000] [--small 5000] [--model onnx|pth] [--work DIR]

Both folders hold tiny synthetic JPEGs (16x16, 64 distinct ones written round robin, 1,000 per
subfolder) and are predicted, in turn, by fresh `predict.py FOLDER MODEL --csv` processes with an
untrained mobilenet_v3_small built here (no download) whose preprocessing works at 32x32, so the
run measures the streaming around the model rather than the model. The default model is its
model.onnx (the inference-only install: a small process, so growth would show); `--model pth`
runs checkpoint.pth on torch, with OMP_NUM_THREADS=1 (on a loaded 2-core machine torch's two
threads ran ~8x slower than one). Peak RSS is each child's own maxrss (os.wait4); img/s counts
the whole process, start-up included. Streaming keeps the large folder's peak within 1.25x of
the small one's.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import resource
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# An untrained mobilenet_v3_small with a 3-class head that predicts at 32x32, and its model.onnx. Made in a child
# process: a child's maxrss counts the memory of the process it was forked from, so this one must stay small.
MAKE_MODEL = """
import sys
sys.path.insert(0, sys.argv[1])
from flowerclf.data.transforms import Preprocess
from flowerclf.models.checkpoints import atomic_save, make_checkpoint
from flowerclf.models.onnx import export_checkpoint
from flowerclf.models.registry import ModelSpec, build_model
spec = ModelSpec("mobilenet_v3_small", "none", [8], 0.1, 3)
model, _ = build_model(spec)
atomic_save(make_checkpoint(model, spec, Preprocess(resize_size=32, crop_size=32), {"1": 0, "2": 1, "3": 2}),
            sys.argv[2])
if sys.argv[3] == "onnx":
    export_checkpoint(sys.argv[2])
"""


def photo_folder(folder: str, n: int) -> str:
    """`folder` with n tiny JPEGs (made once: reused when it already holds n)."""
    done = os.path.join(folder, ".complete")
    if os.path.exists(done) and open(done).read() == str(n):
        return folder
    rng = np.random.default_rng(0)
    photos = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
        photos.append(buf.getvalue())
    for i in range(n):
        sub = os.path.join(folder, f"{i // 1000:03d}")
        if i % 1000 == 0:
            os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"{i:06d}.jpg"), "wb") as f:
            f.write(photos[i % len(photos)])
    with open(done, "w") as f:
        f.write(str(n))
    return folder


def predict_folder(folder: str, checkpoint: str, out: str) -> tuple[float, float, int]:
    """(peak RSS in MiB, seconds, rows) of one predict.py --csv process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "predict.py"), folder, checkpoint, "--csv", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"predict.py failed ({proc.returncode}): {err.strip()}")
    with open(out, newline="") as f:
        rows = sum(1 for _ in csv.reader(f)) - 1
    return usage.ru_maxrss / 1024, seconds, rows  # ru_maxrss is in KiB on Linux


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--large", type=int, default=50_000, help="photos in the large folder (default: %(default)s)")
    p.add_argument("--small", type=int, default=5_000, help="photos in the small folder (default: %(default)s)")
    p.add_argument("--model", choices=("onnx", "pth"), default="onnx",
                   help="predict with model.onnx (ONNX Runtime) or checkpoint.pth (torch) (default: %(default)s)")
    p.add_argument("--work", default="/tmp/bench-predict-folder",
                   help="where the photos, the checkpoint and the CSVs go (default: %(default)s)")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    checkpoint = os.path.join(args.work, "checkpoint.pth")
    subprocess.run([sys.executable, "-c", MAKE_MODEL, ROOT, checkpoint, args.model], check=True,
                   stderr=subprocess.DEVNULL)
    if args.model == "onnx":
        checkpoint = os.path.join(args.work, "model.onnx")
    figures = {}
    for n in (args.small, args.large):
        t0 = time.perf_counter()
        folder = photo_folder(os.path.join(args.work, f"photos-{n}"), n)
        print(f"{n} photos ready in {time.perf_counter() - t0:.1f}s", flush=True)
        peak, seconds, rows = predict_folder(folder, checkpoint, os.path.join(args.work, f"predictions-{n}.csv"))
        assert rows == n, (rows, n)
        figures[n] = peak
        print(f"{n:>6} photos, {args.model}: peak RSS {peak:.0f} MiB, {seconds:.1f}s, {n / seconds:.0f} img/s",
              flush=True)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(this script's own peak RSS, a floor under its children's figures: {own:.0f} MiB)")
    small, large = figures[args.small], figures[args.large]
    ratio = large / small
    print(f"peak RSS {args.large} / {args.small} photos: {ratio:.3f}x ({large - small:+.0f} MiB); "
          f"{'within' if ratio <= 1.25 else 'OVER'} 1.25x")
    return 0 if ratio <= 1.25 else 1


if __name__ == "__main__":
    sys.exit(main())
