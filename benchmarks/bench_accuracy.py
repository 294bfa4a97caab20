"""Accuracy references: a tuned logistic regression on the frozen features, our head, and fine-tuning.

usage: python benchmarks/bench_accuracy.py DATA_DIR [--arch efficientnet_lite0] [--unfreeze 3]
                                          [--finetune_epochs 8] [--save_dir DIR]

1. logistic regression (scikit-learn, standardized features, C picked on valid from a grid)
   on the same features train.py caches;
2. train.py's default head on those features;
3. train.py --unfreeze N (fine-tuning), which should beat both where the data allow it.
Needs scikit-learn (pip install -r benchmarks/requirements.txt).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowerclf.data.folders import scan_data_dir  # noqa: E402
from flowerclf.data.transforms import create_transform  # noqa: E402
from flowerclf.features.engines import feature_forward, state_fingerprint  # noqa: E402
from flowerclf.features.passes import sharded_features  # noqa: E402
from flowerclf.models.registry import ModelSpec, build_model  # noqa: E402
from flowerclf.training.config import TrainConfig  # noqa: E402
from flowerclf.training.trainer import train  # noqa: E402


def frozen_features(data_dir: str, arch: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The features train.py trains its head on (same engine, same preprocessing), per split."""
    import torch

    splits = scan_data_dir(data_dir)
    model, pp = build_model(ModelSpec(arch, "DEFAULT", [], 0.0, 2))
    device = torch.device("cpu")
    forward, _ = feature_forward(model.backbone, arch, pp.crop_size, "auto", device, False,
                                 state_fingerprint(model.backbone), print)
    out = {}
    for name, images in splits.items():
        feats, labels = sharded_features(forward, images, create_transform(pp), 8, 0, device, name)
        out[name] = (feats.numpy(), labels.numpy())
    return out


def logistic_regression(feats) -> dict:
    """Best C on valid; its test accuracy."""
    scaler = StandardScaler().fit(feats["train"][0])
    x = {k: scaler.transform(v[0]) for k, v in feats.items()}
    best = None
    for c in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit(x["train"], feats["train"][1])
        valid = clf.score(x["valid"], feats["valid"][1])
        if best is None or valid > best["valid_acc"]:
            best = {"C": c, "valid_acc": valid, "test_acc": clf.score(x["test"], feats["test"][1])}
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", help="ImageFolder tree with train/, valid/, test/")
    p.add_argument("--arch", default="efficientnet_lite0", help="backbone (default: %(default)s)")
    p.add_argument("--unfreeze", default="3", help="stages to fine-tune (default: %(default)s)")
    p.add_argument("--finetune_epochs", type=int, default=8, help="fine-tuning epochs (default: %(default)s)")
    p.add_argument("--finetune_lr", type=float, default=0.003, help="fine-tuning head LR (default: %(default)s)")
    p.add_argument("--save_dir", help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    unfreeze = args.unfreeze if args.unfreeze == "all" else int(args.unfreeze)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.save_dir or tmp
        quiet = lambda line: None  # noqa: E731
        head = train(TrainConfig(data_dir=args.data_dir, save_dir=os.path.join(root, "head"),
                                                   arch=args.arch), log=quiet)["metrics"]
        lr = logistic_regression(frozen_features(args.data_dir, args.arch))
        start = time.perf_counter()
        tuned = train(TrainConfig(
            data_dir=args.data_dir, save_dir=os.path.join(root, "finetune"), arch=args.arch, unfreeze=unfreeze,
            epochs=args.finetune_epochs, learning_rate=args.finetune_lr), log=print)["metrics"]
        seconds = time.perf_counter() - start
    print(f"\n{'method':46s} {'valid':>7s} {'test':>7s}")
    print(f"{f'logistic regression on frozen features (C={lr[chr(67)]})':46s} {100 * lr['valid_acc']:6.2f}% "
          f"{100 * lr['test_acc']:6.2f}%")
    print(f"{'train.py default head on frozen features':46s} {100 * head['valid_acc']:6.2f}% "
          f"{100 * head['test_acc']:6.2f}%")
    print(f"{f'train.py --unfreeze {args.unfreeze}, {args.finetune_epochs} epochs ({seconds:.0f}s)':46s} "
          f"{100 * tuned['valid_acc']:6.2f}% {100 * tuned['test_acc']:6.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
