"""--balance on a skewed set: balanced accuracy and the small class's recall on test/, with and without it.

usage: python benchmarks/bench_balance.py DATA_DIR [--cut daisy] [--keep 0.1] [--seeds 0 1 2]
                                          [--arch efficientnet_lite0] [--work DIR]

Makes a skewed copy of DATA_DIR under --work (links, nothing copied into the repo): train/ keeps
--keep of --cut's photos (seeded), every other class and valid/, test/ as they are. Then trains the
frozen head with --balance off and on for each seed and reports test/'s top-1, balanced accuracy
and --cut's recall. The features come from the feature store, so only the first run computes them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowerclf.training.config import TrainConfig  # noqa: E402
from flowerclf.training.trainer import train  # noqa: E402


def skewed_copy(data_dir: str, out: str, cut: str, keep: float, seed: int = 0) -> int:
    """out/ as data_dir/ with train/CUT/ cut to `keep` of its photos (symlinks); returns how many it kept."""
    for split in ("valid", "test"):
        os.symlink(os.path.abspath(os.path.join(data_dir, split)), os.path.join(out, split))
    train_dir, kept = os.path.join(data_dir, "train"), 0
    if not os.path.isdir(os.path.join(train_dir, cut)):
        raise SystemExit(f"error: {train_dir}/ has no class {cut}/")
    for cls in sorted(os.listdir(train_dir)):
        names = sorted(os.listdir(os.path.join(train_dir, cls)))
        if cls == cut:
            rng = np.random.default_rng(seed)
            names = sorted(rng.choice(names, size=max(1, round(len(names) * keep)), replace=False))
            kept = len(names)
        os.makedirs(os.path.join(out, "train", cls))
        for name in names:
            os.symlink(os.path.abspath(os.path.join(train_dir, cls, name)), os.path.join(out, "train", cls, name))
    return kept


def one_run(data: str, save: str, arch: str, balance: str, seed: int, cut: str) -> dict:
    """A frozen run; test/'s top-1, balanced accuracy and the cut class's recall."""
    train(TrainConfig(data_dir=data, save_dir=save, arch=arch, balance=balance, seed=seed, audit=False),
          log=lambda line: None)
    with open(os.path.join(save, "test_report.json")) as f:
        report = json.load(f)
    recall = next(c["recall"] for c in report["per_class"] if c["class"] == cut)
    return {"top1": report["top1"], "balanced": report["balanced_accuracy"], "recall": recall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", help="ImageFolder tree with train/, valid/, test/ (e.g. flowers5-dev)")
    p.add_argument("--cut", default="daisy", help="the class whose train/ photos are cut (default: %(default)s)")
    p.add_argument("--keep", type=float, default=0.1, help="share of its photos kept (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--arch", default="efficientnet_lite0", help="backbone (default: %(default)s)")
    p.add_argument("--work", help="where the skewed copy and the runs go (default: a temporary folder)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        data = os.path.join(work, "skewed")
        os.makedirs(data)
        kept = skewed_copy(args.data_dir, data, args.cut, args.keep)
        print(f"{args.data_dir} with train/{args.cut}/ cut to {kept} photos ({args.keep:.0%}); {args.arch} frozen, "
              f"test/ figures")
        results = {"off": [], "on": []}
        for seed in args.seeds:
            for balance in results:
                r = one_run(data, os.path.join(work, f"{balance}-{seed}"), args.arch, balance, seed, args.cut)
                results[balance].append(r)
                print(f"seed {seed}  --balance {balance:3}  top-1 {100 * r['top1']:.1f}%  balanced "
                      f"{100 * r['balanced']:.1f}%  {args.cut} recall {100 * r['recall']:.1f}%", flush=True)
        for balance, rs in results.items():
            mean = {k: 100 * float(np.mean([r[k] for r in rs])) for k in rs[0]}
            print(f"mean of {len(rs)}  --balance {balance:3}  top-1 {mean['top1']:.1f}%  balanced "
                  f"{mean['balanced']:.1f}%  {args.cut} recall {mean['recall']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
