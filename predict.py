"""Predict the top-k flower names of images with a checkpoint made by train.py.

usage: python predict.py IMAGE [IMAGE ...] CHECKPOINT [--top_k 5] [--category_names cat_to_name.json] [--csv FILE]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Iterable

from flowerclf.base import cli
from flowerclf.base.errors import FlowerclfError

EXAMPLES = """examples:
  python predict.py rose.jpg checkpoint.pth
  python predict.py photos/ checkpoint.pth --top_k 3 --category_names cat_to_name.json --json
  python predict.py rose.jpg checkpoint.pth --category_names cat_to_name.json --plot rose_top5.png
  python predict.py rose.jpg model.onnx --top_k 3          # torch-free, from train.py --export onnx
  python predict.py photos/ model.onnx --csv predictions.csv  # a folder of any size, one row per photo
"""
# a spreadsheet runs a cell starting with one of these as a formula (=HYPERLINK(...), +cmd|...): such cells get a '
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


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


def csv_header(k: int) -> list[str]:
    """The --csv columns for answers of k classes."""
    return ["image", "confident", *(f"{c}_{n}" for n in range(1, k + 1) for c in ("class", "name", "probability")),
            "error"]


def _cell(text: str) -> str:
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def csv_row(item: dict, k: int) -> list[str]:
    """One iter_predict item as its --csv row: the JSON's values (probabilities as JSON prints them)."""
    ranks = [value for p in item.get("predictions", []) for value in (p["class"], p["name"], repr(p["probability"]))]
    confident = "" if "confident" not in item else ("true" if item["confident"] else "false")
    return [_cell(cell) for cell in (item["image"], confident, *ranks, *[""] * (3 * k - len(ranks)),
                                     item.get("error", ""))]


def write_csv(items: Iterable[dict], path: str, k: int) -> Iterable[dict]:
    """Stream `items` as rows into PATH.partial (each row flushed as it comes), rename it to `path` at the end;
    yield each item once its row is written."""
    partial = path + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # valid UTF-8 whatever the file names: a name's bytes that are not UTF-8 are written as \udcNN text
    with open(partial, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.writer(f)
        writer.writerow(csv_header(k))
        for item in items:
            writer.writerow(csv_row(item, k))
            f.flush()  # the rows so far are on disk for whoever watches FILE.partial, whatever the folder's size
            yield item
        os.fsync(f.fileno())
    os.replace(partial, path)


def check_csv_target(path: str, inputs: list[str], checkpoint: str) -> None:
    """--csv names a file to write: never a folder, a device, the checkpoint or one of the inputs; and its
    FILE.partial, when one is there, must be a stopped --csv's rows (we never overwrite a file we did not write)."""
    if path == "-":
        raise FlowerclfError("--csv - would write a file named '-'; without --csv the answers go to stdout "
                             "(--json for JSON)")
    if os.path.isdir(path) or path.endswith(os.sep):  # out/ even before it exists
        raise FlowerclfError(f"--csv {path} is a folder; give a file name such as {os.path.join(path, 'preds.csv')}")
    if os.path.exists(path) and not os.path.isfile(path):  # /dev/stdout, a pipe: the rename would replace it
        raise FlowerclfError(f"--csv {path} is not a regular file (a device or a pipe?); --csv writes a file and "
                             f"renames it into place, so give a file name (without --csv the answers go to stdout)")
    partial = path + ".partial"
    if os.path.lexists(partial) and not _our_partial(partial):
        raise FlowerclfError(f"--csv {path}: {partial} exists and is not the rows of a stopped predict.py --csv, "
                             f"and --csv would overwrite it; move it away, or give another --csv")
    for other in (checkpoint, *inputs):
        if os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other):
            raise FlowerclfError(f"--csv {path} is {other}, one of the inputs; give another file name")


def _our_partial(path: str) -> bool:
    """True for a regular file (not a link) that starts as write_csv's rows do."""
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    start = (",".join(csv_header(1)[:-1]) + ",").encode()  # the header's columns before class_2 (or error)
    with open(path, "rb") as f:
        return f.read(len(start)) == start


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
