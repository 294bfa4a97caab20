"""Planted label errors: how many the audit finds, and what it adds to a frozen run's wall time, cold and warm.

usage: python benchmarks/bench_audit.py DATA_DIR [--arch efficientnet_lite0] [--second efficientnet_lite2]
                                        [--share 0.05] [--seeds 10] [--runs 3] [--cold_runs 2]

1. A copy of DATA_DIR in a temp dir with `--share` of its training photos moved to a wrong class (seed 0), and a
   feature store of its own (FLOWERCLF_STORE in the temp dir), so nothing of yours is read or changed:
   - cold: `train.py COPY --arch A --epochs 10` on an empty store, with the audit and with --no_audit,
     `--cold_runs` of each (alternating), each in a store of its own (the features computed, the backbone
     exported): a user's first run;
   - warm: `--runs` rounds of three runs on the store the cold runs filled, in an order that turns each round:
     --no_audit, the audit computed (FLOWERCLF_STORE/audit emptied first: a rerun after labels changed), and the
     audit reused (a rerun on the same photos and labels); the medians, and the median of each round's
     difference from its --no_audit run (a round's runs are neighbours in time, so a load that comes and goes
     moves them all);
   - the planted photos among the top 2x-planted suspects of the run's audit.json (recall, precision), and of
     `audit.py COPY --arch A SECOND` (two backbones, their heads averaged), with its wall time.
2. On the store's features of the same photos, plantings with seeds 0..`--seeds`-1 (the features do not change
   with a photo's folder, only its label does): recall and precision within the top 2x planted of A alone and of
   A and SECOND averaged, as the audit ranks them.
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


def timed(cmd: list[str], store: str) -> float:
    """Seconds of one command in a fresh process with FLOWERCLF_STORE=store."""
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, FLOWERCLF_STORE=store))
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"error: {os.path.basename(cmd[1])} failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def train_cmd(copy: str, save: str, arch: str, audit_on: bool) -> list[str]:
    """`train.py COPY --arch A --epochs 10`, with the audit or --no_audit."""
    return [sys.executable, os.path.join(ROOT, "train.py"), copy, "--arch", arch, "--epochs", "10",
            "--save_dir", save, "--overwrite"] + ([] if audit_on else ["--no_audit"])


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


def found(save: str, planted: set) -> tuple[float, float, dict]:
    """(recall, precision, audit.json) of the audit in `save`."""
    result = json.load(open(os.path.join(save, "audit.json")))
    return (*within_top([os.path.realpath(s["path"]) for s in result["suspects"]], planted), result)


def timings(copy: str, tmp: str, arch: str, runs: int, cold_runs: int) -> tuple[dict, dict]:
    """Wall times of the cold and warm runs of part 1 by kind, and the audits' own seconds (audit.json's)."""
    times = {k: [] for k in ("cold audit", "cold --no_audit", "--no_audit", "computed", "reused")}
    own = {"cold audit": [], "computed": [], "reused": []}
    for run in range(cold_runs):
        for kind in ("cold audit", "cold --no_audit")[::1 if run % 2 == 0 else -1]:
            save = os.path.join(tmp, kind.replace(" ", "_"))
            times[kind].append(timed(train_cmd(copy, save, arch, kind == "cold audit"), f"{save}_store{run}"))
            if kind == "cold audit":
                own[kind].append(json.load(open(os.path.join(save, "audit.json")))["seconds"])
    store = os.path.join(tmp, "cold_audit_store0")  # features, hashes, export and an audit: as after a first run
    kinds = ["--no_audit", "computed", "reused"]
    for run in range(runs):
        for kind in kinds[run % 3:] + kinds[:run % 3]:
            if kind == "computed":
                shutil.rmtree(os.path.join(store, "audit"), ignore_errors=True)
            elif kind == "reused" and not os.listdir(os.path.join(store, "audit")):
                sys.exit("error: no audit kept in the warm store to reuse")  # the cold or computed run keeps one
            times[kind].append(timed(train_cmd(copy, os.path.join(tmp, kind), arch, kind != "--no_audit"), store))
            if kind in own:
                own[kind].append(json.load(open(os.path.join(tmp, kind, "audit.json")))["seconds"])
    return times, own


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--second", default="efficientnet_lite2", help="audit.py's second backbone")
    p.add_argument("--share", type=float, default=0.05)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cold_runs", type=int, default=2)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        copy, planted = planted_copy(args.data_dir, tmp, args.share)
        times, own = timings(copy, tmp, args.arch, args.runs, args.cold_runs)
        recall, precision, result = found(os.path.join(tmp, "computed"), planted)
        store = os.path.join(tmp, "cold_audit_store0")
        both = [sys.executable, os.path.join(ROOT, "audit.py"), copy, "--arch", args.arch, args.second,
                "--save_dir", os.path.join(tmp, "both")]
        both_seconds = timed(both, store)
        both_recall, both_precision, _ = found(os.path.join(tmp, "both"), planted)
        os.environ["FLOWERCLF_STORE"] = store  # part 2 reads the same photos' features from this store
        features = {arch: stored_features(args.data_dir, arch) for arch in (args.arch, args.second)}

    n = 2 * len(planted)
    print(f"planted copy: {len(planted)} of the training photos moved; top {n} of the suspects:")
    print(f"  train.py's audit ({args.arch}): recall {100 * recall:.1f}%, precision {100 * precision:.1f}% "
          f"({len(result['suspects'])} suspects, weight decay {result['weight_decay']})")
    print(f"  audit.py --arch {args.arch} {args.second}: recall {100 * both_recall:.1f}%, precision "
          f"{100 * both_precision:.1f}% ({both_seconds:.1f}s on a store with {args.arch}'s features)")
    cold_with, cold_without = np.median(times["cold audit"]), np.median(times["cold --no_audit"])
    print(f"train.py --epochs 10, cold store: median {cold_with:.1f}s with the audit, {cold_without:.1f}s with "
          f"--no_audit ({100 * (cold_with / cold_without - 1):+.1f}%)")
    base = np.array(times["--no_audit"])
    for kind in ("computed", "reused"):
        t = np.array(times[kind])
        print(f"train.py --epochs 10, warm store, audit {kind}: median {np.median(t):.2f}s against --no_audit "
              f"{np.median(base):.2f}s ({100 * (np.median(t) / np.median(base) - 1):+.1f}%; median difference in "
              f"a round {np.median(t - base):+.2f}s, {100 * np.median(t - base) / np.median(base):+.1f}%)")
    print(f"runs (s): { {k: [round(t, 2) for t in v] for k, v in times.items()} }; the audits' own seconds: {own}")

    (x, labels, classes), (x2, labels2, _) = features[args.arch], features[args.second]
    assert (labels == labels2).all()
    n_train = len(scan_data_dir(args.data_dir)["train"])
    scores = {args.arch: [], f"{args.arch} + {args.second}": []}
    for seed in range(args.seeds):
        given, moved = plant(labels[:n_train], classes, args.share, seed)
        y = np.concatenate([given, labels[n_train:]])
        for name, views in zip(scores, ([x], [x, x2])):
            ranked = [r for r, *_ in audit.label_audit(views, y, classes)["suspects"]]
            scores[name].append(within_top(ranked, set(moved.tolist())))
    for name, hits in scores.items():
        r, pr = np.array(hits).T
        print(f"stored features, {name:40s}: recall {100 * r.mean():.1f}% (min {100 * r.min():.1f}, max "
              f"{100 * r.max():.1f}), precision {100 * pr.mean():.1f}% over seeds 0-{args.seeds - 1}; seed 0: "
              f"recall {100 * r[0]:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
