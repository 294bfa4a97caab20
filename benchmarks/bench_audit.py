"""Planted label errors: how many the audit finds, and what it adds to a frozen run's wall time.

usage: python benchmarks/bench_audit.py DATA_DIR [--arch efficientnet_lite0] [--share 0.05] [--seeds 10] [--runs 1]

1. A copy of DATA_DIR in a temp dir with `--share` of its training photos moved to a wrong class (seed 0);
   `train.py COPY --arch A --epochs 10` on it, `--runs` times with the audit and as many with --no_audit
   (after one warm-up run that hashes the copy's paths), alternating: the wall times, their medians and the
   median of each round's difference (the two runs of a round are neighbours in time, so a load that comes and
   goes moves both); the planted photos among audit.json's top 2x-planted suspects (recall, precision) and the
   audit's own seconds.
2. On the stored features of DATA_DIR itself, plantings with seeds 0..`--seeds`-1 (the features do not
   change with a photo's folder, only its label does): recall and precision within the top 2x planted of
   the heads' weight decay chosen by out-of-fold log loss (the audit's) against the fixed 0.1 used before.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flowerclf.data.folders import scan_data_dir  # noqa: E402
from flowerclf.evaluation import audit  # noqa: E402


def plant(labels: np.ndarray, classes: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels with round(share * n) of them moved to another class, the moved rows), seeded."""
    rng = np.random.default_rng(seed)
    moved = rng.choice(len(labels), round(share * len(labels)), replace=False)
    given = labels.copy()
    given[moved] = (labels[moved] + rng.integers(1, classes, len(moved))) % classes
    return given, moved


def planted_copy(data_dir: str, tmp: str, share: float) -> tuple[str, set[str]]:
    """DATA_DIR copied under `tmp` with seed 0's planted photos in a wrong class folder; their new paths."""
    copy = os.path.join(tmp, "data")
    shutil.copytree(data_dir, copy)
    train = scan_data_dir(copy)["train"]
    classes = sorted(train.class_to_idx, key=train.class_to_idx.get)
    given, moved = plant(np.array(train.labels), len(classes), share, 0)
    paths = set()
    for row in moved:
        src = train.files[row]
        dst = os.path.join(copy, "train", classes[given[row]], "moved_" + os.path.basename(src))
        os.rename(src, dst)
        paths.add(os.path.realpath(dst))
    return copy, paths


def within_top(ranked: list, planted: set) -> tuple[float, float]:
    """(recall, precision) of the planted ones within the first 2x-planted of `ranked`."""
    top = ranked[:2 * len(planted)]
    hits = len(set(top) & planted)
    return hits / len(planted), hits / max(1, len(top))


def train_run(copy: str, save: str, arch: str, audit_on: bool) -> float:
    """Seconds of one `train.py COPY --arch A --epochs 10` run in a fresh process."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), copy, "--arch", arch, "--epochs", "10",
           "--save_dir", save, "--overwrite"] + ([] if audit_on else ["--no_audit"])
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"error: train.py failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def stored_features(data_dir: str, arch: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(features, labels, classes) of DATA_DIR's train and valid photos, from the feature store."""
    from flowerclf.features.passes import FeaturePass
    from flowerclf.models.registry import ModelSpec, build_model, freeze, resolve_weights
    from flowerclf.runtime.devices import resolve_device

    splits = scan_data_dir(data_dir)
    weights = resolve_weights(arch, "DEFAULT").spec  # as train.py names them: the store's vectors are reused
    classes = len(splits["train"].class_to_idx)
    model, preprocess = build_model(ModelSpec(arch, weights, [8], 0.0, classes))
    freeze(model.backbone)
    with FeaturePass(model.backbone, arch, weights, preprocess, "auto", resolve_device("cpu", False), False, 8, 0,
                     True, print) as passes:
        parts = [passes.features(splits[name], name) for name in ("train", "valid")]
    return np.concatenate([f.numpy() for f, _ in parts]), np.concatenate([y.numpy() for _, y in parts]), classes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--share", type=float, default=0.05)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--runs", type=int, default=1)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        copy, planted = planted_copy(args.data_dir, tmp, args.share)
        save = os.path.join(tmp, "run")
        train_run(copy, save, args.arch, False)  # warm-up: the copy's paths hashed, the ONNX backbone exported
        times, shares = {True: [], False: []}, []
        for run in range(args.runs):
            for audit_on in (True, False) if run % 2 == 0 else (False, True):  # neither always goes first
                times[audit_on].append(train_run(copy, save + str(int(audit_on)), args.arch, audit_on))
                if audit_on:
                    result = json.load(open(os.path.join(save + "1", "audit.json")))
                    shares.append(result["seconds"] / times[True][-1])
        ranked = [os.path.realpath(s["path"]) for s in result["suspects"]]
    recall, precision = within_top(ranked, planted)
    with_, without = np.median(times[True]), np.median(times[False])
    paired = np.median(np.array(times[True]) - np.array(times[False]))
    print(f"planted copy: {len(planted)} of the training photos moved; audit.json: weight decay "
          f"{result['weight_decay']}, {len(ranked)} suspects; top {2 * len(planted)}: recall {100 * recall:.1f}%, "
          f"precision {100 * precision:.1f}%")
    print(f"train.py --epochs 10, medians: {with_:.1f}s with the audit, {without:.1f}s with --no_audit "
          f"({100 * (with_ / without - 1):+.1f}%; median difference in a round {paired:+.2f}s, "
          f"{100 * paired / without:+.1f}%); the audit's own seconds: "
          f"{', '.join(f'{100 * s:.1f}%' for s in shares)} of their runs; runs (s) "
          f"{ {k: [round(t, 1) for t in v] for k, v in times.items()} }")

    x, labels, classes = stored_features(args.data_dir, args.arch)
    n_train = len(scan_data_dir(args.data_dir)["train"])
    scores = {"fixed 0.1 (before)": [], "chosen by log loss (now)": []}
    chosen, seconds = [], {"fixed 0.1 (before)": 0.0, "chosen by log loss (now)": 0.0}
    for seed in range(args.seeds):
        given, moved = plant(labels[:n_train], classes, args.share, seed)
        y = np.concatenate([given, labels[n_train:]])
        started = time.perf_counter()
        before = audit.out_of_fold_probabilities(x, y, classes, weight_decay=0.1)
        seconds["fixed 0.1 (before)"] += time.perf_counter() - started
        started = time.perf_counter()
        now, wd, _ = audit.chosen_probabilities(x, y, classes)
        seconds["chosen by log loss (now)"] += time.perf_counter() - started
        chosen.append(wd)
        for name, probs in (("fixed 0.1 (before)", before), ("chosen by log loss (now)", now)):
            scores[name].append(within_top(audit.label_suspects(probs, y), set(moved.tolist())))
    for name, found in scores.items():
        r, pr = np.array(found).T
        print(f"{name:25s}: recall {100 * r.mean():.1f}% (min {100 * r.min():.1f}, max {100 * r.max():.1f}), "
              f"precision {100 * pr.mean():.1f}% over seeds 0-{args.seeds - 1}; seed 0 recall {100 * r[0]:.1f}%; "
              f"heads {seconds[name] / args.seeds:.2f}s a planting")
    print(f"weight decays chosen: {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
