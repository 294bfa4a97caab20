"""Audit an ImageFolder data set on its own: photos that look mislabeled, duplicates and leaks.

usage: python audit.py DATA_DIR [--arch densenet121 [ARCH ...]] [--save_dir DIR] [--category_names cat_to_name.json]
"""
from __future__ import annotations

import argparse
import os
import sys

from flowerclf.base import cli

EXAMPLES = """examples:
  python audit.py flowers --arch efficientnet_lite0 --save_dir runs/audit
  python audit.py my_photos --arch resnet50 --valid_split 0.2 --category_names cat_to_name.json
  python audit.py flowers --arch efficientnet_lite0 efficientnet_lite2   # two backbones: more errors found

The audit a frozen train.py run ends with, without training: the backbone's center-crop features of
every photo of train/, valid/ and test/ (from the feature store; the photos it lacks go through the
backbone, with a progress line, and are stored for train.py), out-of-fold heads on train and valid,
cleanlab's label issues, and copies by content hash and feature cosine (of the first --arch). With several
--arch, their heads' probabilities are averaged: on flowers5-dev with 5% planted errors, efficientnet_lite0
and efficientnet_lite2 together find more of them than either alone (README). Writes SAVE_DIR/audit.json
(replacing one there) and ends with one line:
  audit: 12 train/valid photos look mislabeled, 3 duplicates across classes, 2 test photos also in train; ...
"""


def build_parser() -> cli.ArgumentParser:
    """The command-line interface of audit.py."""
    p = cli.ArgumentParser("audit.py", __doc__, EXAMPLES)
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder with train/, valid/ (or val/, validation/, or "
                                                        "--valid_split) and optionally test/, or only class folders")
    p.add_argument("--save_dir", "--save-dir", default=".",
                   help="where audit.json is written (default: current directory)")
    p.add_argument("--arch", nargs="+", default=["densenet121"], metavar="ARCH",
                   help="the backbone(s) whose features are audited, as train.py's --arch; the same arch and "
                        "--weights reuse the features a train.py run stored; several: their out-of-fold "
                        "probabilities are averaged (default: densenet121)")
    p.add_argument("--weights", nargs="+", default=["DEFAULT"], metavar="WEIGHTS",
                   help="as train.py's --weights: DEFAULT, a torchvision weight name or a local .pth; one for "
                        "every --arch, in order, or one for all (default: DEFAULT)")
    p.add_argument("--category_names", "--category-names", metavar="JSON",
                   help="JSON mapping class folders to names, e.g. cat_to_name.json, used in audit.json")
    p.add_argument("--valid_split", "--valid-split", type=float, metavar="FRACTION",
                   help="no validation folder: this fraction of each class of train/ is the valid split, as "
                        "train.py takes it (default: 0.2; 0.15 for a DATA_DIR of class folders; 0 refuses)")
    p.add_argument("--seed", type=cli.whole_number, default=0,
                   help="the seed of --valid_split, as train.py's (default: %(default)s)")
    cli.add_device_flags(p)
    cli.add_workers_flag(p)
    p.add_argument("--feature_batch_size", "--feature-batch-size", type=cli.whole_number, default=0, metavar="N",
                   help="batch size of the backbone pass (default: 0 = auto, as train.py: 8 on a CPU, 128 on a GPU)")
    p.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="runtime of the backbone pass, as train.py's (default: %(default)s)")
    p.add_argument("--no_store", "--no-store", dest="store", action="store_false",
                   help="neither read nor write the feature store: every photo goes through the backbone, and "
                        "content hashes are computed from the files")
    return p


def run(args: argparse.Namespace) -> None:
    """Check the flags and folders, then audit and write audit.json."""
    from flowerclf.base.errors import FlowerclfError
    from flowerclf.training.config import TrainConfig
    from flowerclf.training.preflight import preflight

    if len(args.weights) not in (1, len(args.arch)):
        raise FlowerclfError(f"--weights: give one for every --arch ({len(args.arch)}) or one for all, not "
                             f"{len(args.weights)} (see audit.py --help)")
    twice = sorted({a for a in args.arch if args.arch.count(a) > 1})
    if twice:
        raise FlowerclfError(f"--arch names {', '.join(twice)} twice: give each backbone once (see audit.py --help)")
    weights = args.weights * len(args.arch) if len(args.weights) == 1 else args.weights
    # train.py's own checks (arch names, save dir outside the data, the splits, the names), before torch loads
    cfgs = [TrainConfig(args.data_dir, args.save_dir, arch, w, device=args.device, gpu=args.gpu, seed=args.seed,
                        num_workers=args.num_workers, store=args.store, engine=args.engine,
                        category_names=args.category_names, feature_batch_size=args.feature_batch_size,
                        valid_split=args.valid_split) for arch, w in zip(args.arch, weights)]
    cfg = cfgs[0]
    splits = preflight(cfg)

    from flowerclf.base.runfiles import RunFiles
    from flowerclf.data.folders import load_category_names
    from flowerclf.evaluation.audit import audit_folder, summary, write_audit

    log = lambda line: print(cli.printable(line), flush=True)  # noqa: E731
    result = audit_folder(splits, [(c.arch, c.weights) for c in cfgs], load_category_names(cfg.category_names),
                          cfg.device, cfg.gpu, cfg.engine, cfg.feature_batch_size, cfg.num_workers, cfg.store, log)
    os.makedirs(cfg.save_dir, exist_ok=True)
    path = write_audit(result, RunFiles(cfg.save_dir).audit)
    log(summary(result, path))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, audit, write audit.json; return the exit code."""
    return cli.run_main(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
