"""A run's result files: history (JSON, CSV, curves) and a split's report (JSON and confusion matrix)."""
from __future__ import annotations

import csv
import io
import json

import numpy as np

from flowerclf.base.files import atomic_write
from flowerclf.base.runfiles import RunFiles
from flowerclf.evaluation.plots import plot_confusion_matrix, plot_history


def write_json(obj, path: str) -> None:
    """JSON to `path`, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode("utf-8")))


def write_history(history: list[dict], files: RunFiles, curves: bool = True) -> list[str]:
    """history.json, history.csv and (with `curves`) training_curves.png; returns the paths written."""
    write_json(history, files.history_json)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write(files.history_csv, lambda f: f.write(text.getvalue().encode("utf-8")))
    if not curves:
        return [files.history_json, files.history_csv]
    plot_history(history, files.curves)
    return [files.history_json, files.history_csv, files.curves]


def write_report(report: dict, files: RunFiles, stem: str = "test") -> list[str]:
    """STEM_report.json and the confusion matrix PNG (none past MATRIX_CLASSES classes); returns the paths written."""
    write_json(report, files.report_json(stem))
    if report["confusion_matrix"] is None:
        return [files.report_json(stem)]
    names = {c["class"]: c["name"] for c in report["per_class"]}
    plot_confusion_matrix(np.array(report["confusion_matrix"]), [names[c] for c in report["confusion_classes"]],
                          files.confusion(stem))
    return [files.report_json(stem), files.confusion(stem)]
