"""The feature store at scale: a cold pass, a full hit and 1% new photos, on synthetic folders of growing size.

usage: python benchmarks/bench_store.py [--sizes 1000 4000 16000] [--arch mobilenet_v3_small] [--engine torch]
       [--scenarios cold] [--no_audit]

For each size N: a folder of N training images (drawn shapes, 32 px, 4 classes) and 100
validation images; then three `train.py DIR --arch ARCH --weights none --epochs 1 --engine ENGINE`
processes on one fresh store: cold (every image computed), full hit (the same command again), and
+1% (N/100 new training photos); `--scenarios cold` runs only the first (the memory check).
Each row: the process's wall time, the feature time (its `features ready in` line), what it
computed, the store's size on disk and the process's peak RSS. The exported backbone comes from
the user's cache, so no row pays for the export.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flowerclf.data import samples  # noqa: E402
from flowerclf.features import store  # noqa: E402


VALID_PER_CLASS = 25
SCENARIOS = ("cold", "full hit", "+1%")


def run_train(data: str, save: str, arch: str, engine: str, cache: str, flags: tuple = ()) -> dict:
    """One train.py process (with `flags` added): wall seconds, feature seconds, images computed, peak RSS in MiB."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), data, "--save_dir", save, "--arch", arch,
           "--weights", "none", "--epochs", "1", "--engine", engine, "--overwrite", *flags]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, FLOWERCLF_STORE=cache))
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"train.py failed:\n{out}")
    computed = sum(int(n.replace(",", "")) for n in re.findall(r"cached, ([\d,]+) computed", out))
    return {"wall": seconds, "features": float(re.search(r"features ready in ([\d.]+)s", out)[1]),
            "computed": computed, "rss": usage.ru_maxrss / 1024}


def add_photos(data: str, n: int, seed: int) -> None:
    """n new training photos, spread over the classes, with names of their own."""
    with tempfile.TemporaryDirectory() as tmp:
        samples.make_demo(tmp, {"train": -(-n // len(samples.DEMO_SHAPES))}, size=32, seed=seed)
        new = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(tmp, "train")) for f in fs)[:n]
        for path in new:
            shape = os.path.basename(os.path.dirname(path))
            shutil.copy(path, os.path.join(data, "train", shape, "new_" + os.path.basename(path)))


def fresh_cache(path: str, exports: str) -> str:
    """A FLOWERCLF_STORE folder with no feature store yet, sharing the user's exported backbones."""
    os.makedirs(path)
    os.symlink(exports, os.path.join(path, "onnx"))
    return path


def bench_size(n: int, arch: str, engine: str, scenarios: list[str], work: str, exports: str,
               flags: tuple = ()) -> None:
    """Print the scenarios on a folder of n training images and a fresh store."""
    data, cache = os.path.join(work, f"data{n}"), fresh_cache(os.path.join(work, f"cache{n}"), exports)
    samples.make_demo(data, {"train": n // len(samples.DEMO_SHAPES), "valid": VALID_PER_CLASS}, size=32)
    for scenario in (s for s in SCENARIOS if s in scenarios):
        if scenario == "+1%":
            add_photos(data, n // 100, seed=n)
        r = run_train(data, os.path.join(work, "run"), arch, engine, cache, flags)
        path = os.path.join(cache, store.STORE_NAME)
        mib = sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p)) / 2 ** 20
        print(f"{n:7,d} {scenario:9s} {r['wall']:7.1f} {r['features']:10.1f} {r['computed']:9,d} {mib:9.1f} "
              f"{r['rss']:8.0f}", flush=True)
    shutil.rmtree(data)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000],
                   help="training images per folder (default: %(default)s)")
    p.add_argument("--arch", default="mobilenet_v3_small", help="backbone, random weights (default: %(default)s)")
    p.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="train.py --engine (default: %(default)s: ONNX Runtime on a CPU)")
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS),
                   help="which rows per size, in this order (default: all three)")
    p.add_argument("--no_audit", action="store_true",
                   help="train.py --no_audit: the run without its data audit, whose memory grows with the photos "
                        "(default: off)")
    args = p.parse_args(argv)
    flags = ("--no_audit",) if args.no_audit else ()
    exports = os.path.join(store.store_dir(), "onnx")
    os.makedirs(exports, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        # warm-up: the exported backbone lands in the user's cache, as after any first run
        samples.make_demo(os.path.join(work, "warm"), {"train": 2, "valid": 1}, size=32)
        run_train(os.path.join(work, "warm"), os.path.join(work, "run"), args.arch, args.engine,
                  fresh_cache(os.path.join(work, "cachewarm"), exports))
        print(f"{args.arch} --weights none --engine {args.engine}, {os.cpu_count()} CPUs; "
              f"train.py --epochs 1 per row "
              f"(+ {VALID_PER_CLASS * len(samples.DEMO_SHAPES)} validation images)")
        print(f"{'images':>7s} {'scenario':9s} {'wall s':>7s} {'features s':>10s} {'computed':>9s} "
              f"{'store MiB':>9s} {'RSS MiB':>8s}")
        for n in args.sizes:
            bench_size(n, args.arch, args.engine, args.scenarios, work, exports, flags)
    return 0


if __name__ == "__main__":
    sys.exit(main())
