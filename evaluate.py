"""Evaluate a checkpoint on any ImageFolder split: accuracy, per-class report, confusion matrix.

usage: python evaluate.py CHECKPOINT SPLIT_DIR [--out DIR] [--category_names cat_to_name.json]
"""
from __future__ import annotations

import argparse
import json
import sys

from flowerclf.base import cli

EXAMPLES = """examples:
  python evaluate.py runs/lite0/checkpoint.pth flowers/test --category_names cat_to_name.json
  python evaluate.py runs/lite0/checkpoint.pth flowers/valid --out runs/lite0/valid-eval --json

Writes OUT/eval_STEM_report.json, a row-normalized confusion matrix OUT/eval_STEM_confusion_matrix.png
and OUT/eval_STEM_report.html (STEM is the split folder's name), so the report train.py wrote stays.
"""


def build_parser() -> cli.ArgumentParser:
    """The command-line interface of evaluate.py."""
    p = cli.ArgumentParser("evaluate.py", __doc__, EXAMPLES)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pth made by train.py")
    p.add_argument("split", metavar="SPLIT_DIR", help="ImageFolder split, e.g. flowers/test (one folder per class)")
    p.add_argument("--out", metavar="DIR", help="where the report files go (default: the checkpoint's folder)")
    p.add_argument("--category_names", "--category-names", metavar="JSON",
                   help="JSON mapping class folders to names, e.g. cat_to_name.json")
    p.add_argument("--batch_size", "--batch-size", type=cli.positive_int,
                   help="images per batch (default: auto, 8 on a CPU, 128 on a GPU)")
    cli.add_device_flags(p)
    cli.add_workers_flag(p)
    p.add_argument("--json", action="store_true", help="print the whole report as JSON instead of a summary")
    return p


def run(args: argparse.Namespace) -> None:
    """Evaluate, then print the report as JSON or a summary."""
    from flowerclf.evaluation.evaluate import evaluate_split

    result, written, page = evaluate_split(
        args.checkpoint, args.split, args.out, args.category_names, args.batch_size, args.device, args.gpu,
        args.num_workers, log=lambda line: print(line, file=sys.stderr))  # stdout may be --json
    if args.json:  # stdout stays one JSON document; the page's path goes last on stderr
        print(json.dumps(result, indent=2))
        print(f"report: {page}", file=sys.stderr)
        return
    print(f"{args.split}: {result['images']} images, top-1 {100 * result['top1']:.2f}%  "
          f"top-{result['top_k']} {100 * result['top5']:.2f}%")
    for pair in result["most_confused"][:5]:
        print(f"  {cli.printable(pair['true'])} taken for {cli.printable(pair['predicted'])}: {pair['count']}x")
    print("wrote " + ", ".join(written))
    print(f"report: {page}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, evaluate, write the report; return the exit code."""
    return cli.run_main(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
