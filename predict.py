"""Predict the top-k flower names of images with a checkpoint made by train.py.

usage: python predict.py IMAGE [IMAGE ...] CHECKPOINT [--top_k 5] [--category_names cat_to_name.json] [--csv FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from flowerclf.base import cli
from flowerclf.base.errors import FlowerclfError
from flowerclf.serving.table import check_csv_target, write_csv

EXAMPLES = """examples:
  python predict.py rose.jpg checkpoint.pth
  python predict.py photos/ checkpoint.pth --top_k 3 --category_names cat_to_name.json --json
  python predict.py rose.jpg checkpoint.pth --category_names cat_to_name.json --plot rose_top5.png
  python predict.py rose.jpg model.onnx --top_k 3          # torch-free, from train.py --export onnx
  python predict.py photos/ model.onnx --csv predictions.csv  # a folder of any size, one row per photo
"""


def build_parser() -> cli.ArgumentParser:
    """The command-line interface of predict.py."""
    p = cli.ArgumentParser("predict.py", __doc__, EXAMPLES)
    p.add_argument("paths", nargs="+", metavar="IMAGE ... CHECKPOINT",
                   help="one or more images or folders of images, then checkpoint.pth (torch) or model.onnx "
                        "(ONNX Runtime: starts in a fraction of a second, needs no torch)")
    cli.add_answer_flags(p)
    cli.add_device_flags(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="print one JSON list instead of text (an unreadable photo is an item with its 'error')")
    out.add_argument("--csv", metavar="FILE",
                     help="write one row per photo to FILE instead of printing: image, confident, then class_N, "
                          "name_N, probability_N for N = 1..top_k, then error (an unreadable photo is a row with its "
                          "error, not a stop), the values of --json; a cell that starts with = + - @, a tab or a "
                          "carriage return gets a leading ' so a spreadsheet shows it as text instead of running it. "
                          "Rows stream into FILE.partial as photos are predicted (a progress line on stderr), which "
                          "becomes FILE at the end: FILE is never half written, a stopped run leaves its rows in "
                          "FILE.partial")
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
    """Predict every input; print text or JSON, or write --csv (and draw --plot); return 0, or 1 when some inputs
    failed."""
    if len(args.paths) < 2:
        raise FlowerclfError("give at least one IMAGE and then the CHECKPOINT (see predict.py --help)")
    *inputs, checkpoint = args.paths

    from flowerclf.base.progress import progress
    from flowerclf.data.folders import load_category_names
    from flowerclf.data.images import load_rgb
    from flowerclf.serving.figure import PLOT_MAX_IMAGES
    from flowerclf.serving.predictor import Predictor, list_inputs

    if args.plot and os.path.isdir(args.plot):
        raise FlowerclfError(f"--plot {args.plot} is a folder; give a file name such as {args.plot}/top5.png")
    if args.csv:  # --category_names is read too, and --plot written after the rows
        check_csv_target(args.csv, [*inputs, *([args.category_names] if args.category_names else [])], checkpoint)
        if args.plot and os.path.realpath(args.plot) == os.path.realpath(args.csv):
            raise FlowerclfError(f"--csv and --plot both name {args.csv}; give each its own file")
    names = load_category_names(args.category_names)
    predictor = Predictor.load(checkpoint, args.device, args.gpu)
    if args.min_confidence is not None:
        predictor.threshold = args.min_confidence
    files, errors = list_inputs(inputs)
    for err in errors:
        print(cli.error_line(err), file=sys.stderr)
    items = predictor.iter_files(progress(files, "predict", unit="image") if args.csv else files, args.top_k, names)
    if args.csv and files:
        items = write_csv(items, args.csv, min(args.top_k, len(predictor.classes)))
    kept, shown, predicted, unreadable = [], [], 0, 0  # kept: the items to print (none with --csv: they stream)
    for item in items:
        if "error" in item:
            unreadable += 1
            if not args.csv:  # --csv: the row says it, not 10,000 lines on stderr
                print(cli.error_line(item["error"]), file=sys.stderr)
        else:
            predicted += 1
            if args.plot and len(shown) < PLOT_MAX_IMAGES:
                shown.append(item)
        if not args.csv and (args.json or "error" not in item):
            kept.append(item)
    if args.plot and shown:  # before the text, so a closed stdout (| head) cannot stop it
        from flowerclf.serving.figure import plot_predictions
        if len(shown) < predicted:
            print(f"note: --plot shows the first {len(shown)} of {predicted} images", file=sys.stderr)
        plot_predictions([load_rgb(r["image"]) for r in shown], shown, args.plot)
        print(f"wrote {cli.printable(args.plot)}", file=sys.stderr)
    if args.csv and files:
        print(f"wrote {cli.printable(args.csv)}: {predicted} photos predicted"
              + (f", {unreadable} unreadable (their rows say why)" if unreadable else ""), file=sys.stderr)
    if kept and (args.json or predicted):
        print(json.dumps(kept, indent=2) if args.json else format_text(kept))
    # some inputs failed: 1 when others were predicted, 2 when nothing was
    errors = len(errors) + unreadable
    return 0 if not errors else (1 if predicted else 2)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, predict, print; return the exit code."""
    return cli.run_main(build_parser(), argv, run,
                        lambda args: f"the rows so far are in {cli.printable(args.csv)}.partial"
                        if args.csv and os.path.isfile(args.csv + ".partial") else "")  # none before the first


if __name__ == "__main__":
    sys.exit(main())
