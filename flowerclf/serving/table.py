"""predict.py --csv: one row per photo with the values --json gives, streamed into FILE.partial, renamed at the end.

Torch-free: the inference-only install writes CSV too.
"""
from __future__ import annotations

import csv
import os
from typing import Iterable

from flowerclf.base.errors import FlowerclfError

# a spreadsheet runs a cell starting with one of these as a formula (=HYPERLINK(...), +cmd|...): such cells get a '
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


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
