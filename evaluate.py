"""Evaluate a checkpoint on any ImageFolder split: accuracy, per-class report, confusion matrix.

usage: python evaluate.py CHECKPOINT SPLIT_DIR [--out DIR] [--category_names cat_to_name.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

EXAMPLES = """examples:
  python evaluate.py runs/lite0/checkpoint.pth flowers/test --category_names cat_to_name.json
  python evaluate.py runs/lite0/checkpoint.pth flowers/valid --out runs/lite0/valid-eval --json

Writes OUT/STEM_report.json and a row-normalized confusion matrix PNG (STEM is the split
folder's name; for test/ the files are test_report.json and confusion_matrix.png, as
train.py writes them).
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of evaluate.py."""
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pth made by train.py")
    p.add_argument("split", metavar="SPLIT_DIR", help="ImageFolder split, e.g. flowers/test (one folder per class)")
    p.add_argument("--out", metavar="DIR", help="where the report files go (default: the checkpoint's folder)")
    p.add_argument("--category_names", "--category-names", metavar="JSON",
                   help="JSON mapping class folders to names, e.g. cat_to_name.json")
    p.add_argument("--batch_size", "--batch-size", type=int,
                   help="images per batch (default: the feature batch size the checkpoint was trained with)")
    p.add_argument("--gpu", action="store_true", help="run on CUDA; fails if there is no CUDA device")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="device to run on; auto picks CUDA, then MPS, then CPU (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON instead of a summary")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, evaluate, write the report; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.gpu and args.device not in ("auto", "cuda"):
        parser.error(f"--gpu asks for CUDA but --device is {args.device}; pass one of them")

    import data_utils as du
    import engine
    import model_utils as mu
    import report

    try:
        names = du.load_category_names(args.category_names)
        device = mu.resolve_device(args.device, args.gpu)
        model, ckpt = mu.load_model(args.checkpoint, device)
        images = du.scan_split(args.split, ckpt["class_to_idx"])
        batch_size = args.batch_size or ckpt.get("args", {}).get("feature_batch_size") or \
            engine.resolve_feature_batch_size(0, device)
        trained = ckpt.get("args", {})
        # features on the engine training used, so the numbers match what train.py printed
        forward, _ = engine.feature_forward(
            model.backbone, ckpt["model"]["arch"], ckpt["preprocess"]["crop_size"],
            "torch" if trained.get("unfreeze") else trained.get("engine", "torch"), device,
            bool(trained.get("amp")), mu.state_fingerprint(model.backbone), lambda line: print(line, file=sys.stderr))
        logits, labels = engine.split_logits(model, images, du.Preprocess.from_dict(ckpt["preprocess"]), batch_size,
                                             device, forward=forward)
        classes = du.class_names(ckpt["class_to_idx"])
        result = report.classification_report(logits.numpy(), labels.numpy(), classes, names)
        out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
        os.makedirs(out, exist_ok=True)
        written = report.write_report(result, out, os.path.basename(os.path.normpath(args.split)))
    except (du.FlowerclfError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.split}: {result['images']} images, top-1 {100 * result['top1']:.2f}%  "
              f"top-5 {100 * result['top5']:.2f}%")
        for pair in result["most_confused"][:5]:
            print(f"  {pair['true']} taken for {pair['predicted']}: {pair['count']}x")
        print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
