"""Predict the top-k flower names of images with a checkpoint made by train.py.

usage: python predict.py IMAGE [IMAGE ...] CHECKPOINT [--top_k 5] [--category_names cat_to_name.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from flowerclf.base import cli
from flowerclf.base.errors import FlowerclfError

EXAMPLES = """examples:
  python predict.py rose.jpg checkpoint.pth
  python predict.py photos/ checkpoint.pth --top_k 3 --category_names cat_to_name.json --json
  python predict.py rose.jpg checkpoint.pth --category_names cat_to_name.json --plot rose_top5.png
  python predict.py rose.jpg model.onnx --top_k 3          # torch-free, from train.py --export onnx
"""


def build_parser() -> cli.ArgumentParser:
    """The command-line interface of predict.py."""
    p = cli.ArgumentParser("predict.py", __doc__, EXAMPLES)
    p.add_argument("paths", nargs="+", metavar="IMAGE ... CHECKPOINT",
                   help="one or more images or folders of images, then checkpoint.pth (torch) or model.onnx "
                        "(ONNX Runtime: starts in a fraction of a second, needs no torch)")
    cli.add_answer_flags(p)
    cli.add_device_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also save the sanity-check figure: each image above a bar chart of its top-k names "
                        "(a grid of up to 16 images)")
    return p


def format_text(results: list[dict]) -> str:
    """Per image: its path, a 'not sure: ...' line when the answer is below the threshold, then 'rank, name,
    probability %' lines."""
    lines = []
    for r in results:
        lines.append(cli.printable(r["image"]))
        if r.get("confident") is False:
            lines.append("  not sure: " + ", ".join(f"{cli.printable(p['name'])} {100 * p['probability']:.1f}%"
                                                   for p in r["predictions"][:2]))
        lines += [f"  {i}. {cli.printable(p['name'])}  {100 * p['probability']:.2f}%"
                  for i, p in enumerate(r["predictions"], 1)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Predict every input; print text or JSON (and draw --plot); return 0, or 1 when some inputs failed."""
    if len(args.paths) < 2:
        raise FlowerclfError("give at least one IMAGE and then the CHECKPOINT (see predict.py --help)")
    *inputs, checkpoint = args.paths

    from flowerclf.data.folders import load_category_names
    from flowerclf.data.images import load_rgb
    from flowerclf.serving.predictor import Predictor

    if args.plot and os.path.isdir(args.plot):
        raise FlowerclfError(f"--plot {args.plot} is a folder; give a file name such as {args.plot}/top5.png")
    names = load_category_names(args.category_names)
    predictor = Predictor.load(checkpoint, args.device, args.gpu)
    if args.min_confidence is not None:
        predictor.threshold = args.min_confidence
    results, errors = predictor.predict_paths(inputs, args.top_k, names)
    if args.plot and results:  # before the text, so a closed stdout (| head) cannot stop it
        from flowerclf.serving.figure import PLOT_MAX_IMAGES, plot_predictions
        shown = results[:PLOT_MAX_IMAGES]
        if len(shown) < len(results):
            print(f"note: --plot shows the first {len(shown)} of {len(results)} images", file=sys.stderr)
        plot_predictions([load_rgb(r["image"]) for r in shown], shown, args.plot)
        print(f"wrote {cli.printable(args.plot)}", file=sys.stderr)
    for err in errors:
        print(cli.error_line(err), file=sys.stderr)
    if results:
        print(json.dumps(results, indent=2) if args.json else format_text(results))
    # some inputs failed: 1 when others were predicted, 2 when nothing was
    return 0 if not errors else (1 if results else 2)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, predict, print; return the exit code."""
    return cli.run_main(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
