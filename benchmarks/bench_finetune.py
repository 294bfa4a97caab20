"""Frozen head against --unfreeze 1/2/3 on one data set, in one process: test accuracy, wall time, and --patience.

usage: python benchmarks/bench_finetune.py DATA_DIR [--arch efficientnet_lite0] [--epochs 3] [--frozen_epochs 30]

Every run is train.py's defaults but --no_audit (the audit is not training) and --patience 0 (every
epoch runs, so the histories can say what each --patience would have cost), in its own save dir,
with one fresh feature store for the whole benchmark: the first frozen run pays the backbone's ONNX
export and the feature pass (cold), every later run finds both stored (the fine-tunes' head phase too). The frozen runs
go --frozen_epochs long, one per seed, so their histories say where the best epoch comes; the
fine-tunes go --epochs after their epoch 0. Then, for each --patience K, what stopping would have
cost: the best valid accuracy lost and the epochs saved, over every run's history.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowerclf.training.config import TrainConfig  # noqa: E402
from flowerclf.training.trainer import train  # noqa: E402


def with_patience(history: list[dict], k: int) -> tuple[float, int]:
    """(the best valid accuracy a run with --patience k keeps, the epochs it runs), replayed from `history`."""
    best_acc, best_epoch = -1.0, None
    for h in history:
        if h["valid_acc"] > best_acc:
            best_acc, best_epoch = h["valid_acc"], h["epoch"]
        if h["epoch"] - best_epoch >= k:
            return best_acc, h["epoch"]
    return best_acc, history[-1]["epoch"]


def one_run(name: str, cfg: TrainConfig, log_path: str) -> dict:
    """Train `cfg` with its log in `log_path`; the figures of the run."""
    with open(log_path, "w") as log:
        started = time.perf_counter()
        result = train(cfg, log=lambda line: print(line, file=log, flush=True))
        seconds = time.perf_counter() - started
    history = result["history"]
    best = max(history, key=lambda h: h["valid_acc"])
    row = {"run": name, "seconds": seconds, "test_acc": result["metrics"]["test_acc"],
           "valid_acc": best["valid_acc"], "best_epoch": result["epoch"], "epochs": history[-1]["epoch"],
           "first_valid_acc": history[0]["valid_acc"], "history": history}
    print(f"{name}: test {100 * row['test_acc']:.2f}%  valid {100 * row['valid_acc']:.2f}% (epoch "
          f"{row['best_epoch']}; first reported {100 * row['first_valid_acc']:.2f}%)  {seconds:.0f}s", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs after epoch 0: each is a full pass "
                   "through the backbone, 20 s on the quiet 2-core machine, minutes on a loaded one (default: 3)")
    p.add_argument("--frozen_epochs", type=int, default=30, help="epochs of each frozen run (default: 30)")
    p.add_argument("--unfreeze", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one frozen run per seed (default: 0 1 2)")
    p.add_argument("--out", default="bench_finetune.json", help="every run's figures and history")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench_finetune_")
    os.environ["FLOWERCLF_STORE"] = os.path.join(work, "store")  # fresh: the first run is a cold one
    load = [os.getloadavg()[0]]
    print(f"load average at start: {load[0]:.1f} on {os.cpu_count()} cores; logs in {work}", flush=True)
    runs = [(f"frozen seed {seed}" + (" (cold store)" if i == 0 else ""), {"epochs": args.frozen_epochs, "seed": seed})
            for i, seed in enumerate(args.seeds)]
    runs += [(f"--unfreeze {n}", {"epochs": args.epochs, "unfreeze": n}) for n in args.unfreeze]
    rows = []
    for name, flags in runs:
        save = os.path.join(work, name.split(" (")[0].replace(" ", "_").strip("-"))
        cfg = TrainConfig(data_dir=args.data_dir, save_dir=save, arch=args.arch, audit=False, patience=0, **flags)
        rows.append(one_run(name, cfg, save + ".log"))
        with open(args.out, "w") as f:  # after every run: a benchmark cut short keeps what it measured
            json.dump({"load_average": load + [os.getloadavg()[0]], "cores": os.cpu_count(), "rows": rows}, f,
                      indent=1)
    load.append(os.getloadavg()[0])
    print(f"load average at end: {load[1]:.1f}\n")
    print("| run | epochs | best epoch | first valid acc | best valid acc | test acc | wall time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['epochs']} | {r['best_epoch']} | {100 * r['first_valid_acc']:.2f}% | "
              f"{100 * r['valid_acc']:.2f}% | {100 * r['test_acc']:.2f}% | {r['seconds']:.0f} s |")
    print("\n| --patience K | valid acc lost (worst run) | last epochs run (sum over runs) |")
    print("|---|---|---|")
    total = sum(r["epochs"] for r in rows)
    for k in (1, 2, 3, 4, 5, 8, 10):
        kept = [with_patience(r["history"], k) for r in rows]
        lost = max(r["valid_acc"] - acc for r, (acc, _) in zip(rows, kept))
        print(f"| {k} | {100 * lost:.2f} points | {sum(n for _, n in kept)} of {total} |")


if __name__ == "__main__":
    main()
