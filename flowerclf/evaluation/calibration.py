"""Calibration of a split's logits: one temperature (NLL), expected calibration error, the "not sure" threshold.

numpy and scipy only. The result is plain data stored in the checkpoint and in model.onnx's
metadata: {"temperature": T, "threshold": P, "kept": share}; prediction divides the logits by T
and marks an answer whose top probability is below P as not sure.
"""
from __future__ import annotations

import math

import numpy as np

from flowerclf.evaluation.metrics import log_softmax, softmax

KEEP_CORRECT = 0.95   # the share of validation's correct answers the "not sure" threshold keeps
ECE_BINS = 15
LOG_T_BOUNDS = (math.log(0.05), math.log(50.0))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    labels = np.asarray(labels)
    return float(-log_softmax(np.asarray(logits, dtype=np.float64) / temperature)[np.arange(len(labels)),
                                                                                   labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The one temperature T > 0 minimizing the NLL of softmax(logits / T) (bounded search on log T)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    found = minimize_scalar(lambda log_t: nll(logits, labels, math.exp(log_t)), bounds=LOG_T_BOUNDS,
                            method="bounded", options={"xatol": 1e-4})
    t = math.exp(found.x)
    return t if nll(logits, labels, t) < nll(logits, labels) else 1.0  # never worse than leaving it alone


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the top-probability-weighted gap between confidence and accuracy over `bins` equal-width bins."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(conf[inside].mean() - correct[inside].mean())
    return float(total)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per non-empty bin: its centre, mean confidence, accuracy and photo count (the reliability diagram)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return [{"centre": (b + 0.5) / bins, "confidence": float(conf[which == b].mean()),
             "accuracy": float(correct[which == b].mean()), "count": int((which == b).sum())}
            for b in range(bins) if (which == b).any()]


def confidence_threshold(probs: np.ndarray, labels: np.ndarray, keep: float = KEEP_CORRECT) -> float:
    """The highest top probability P such that answers >= P keep at least `keep` of the correct ones (0 if none)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf = probs.max(axis=1)[probs.argmax(axis=1) == labels]
    if not len(conf):
        return 0.0
    ordered = np.sort(conf)[::-1]
    return float(ordered[max(0, math.ceil(keep * len(ordered)) - 1)])


def calibrate(logits: np.ndarray, labels: np.ndarray, keep: float = KEEP_CORRECT) -> dict:
    """The checkpoint's "calibration" entry from validation logits: temperature, threshold, the share kept."""
    t = fit_temperature(logits, labels)
    return {"temperature": t, "threshold": confidence_threshold(softmax(logits, t), labels, keep), "kept": keep}


def calibration_summary(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """ECE and NLL of a split before (T = 1) and after temperature scaling."""
    return {"ece_before": expected_calibration_error(softmax(logits), labels),
            "ece_after": expected_calibration_error(softmax(logits, temperature), labels),
            "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, temperature)}


def describe(summary: dict, temperature: float) -> str:
    """One line: the temperature and what it did to ECE and NLL."""
    return (f"temperature {temperature:.3f}: ECE {100 * summary['ece_before']:.2f}% -> "
            f"{100 * summary['ece_after']:.2f}%, NLL {summary['nll_before']:.4f} -> {summary['nll_after']:.4f}")


def report_calibration(logits: np.ndarray, labels: np.ndarray, temperature: float, png: str) -> str:
    """Draw the split's reliability diagram to `png`; return describe()'s line for it."""
    from flowerclf.evaluation.plots import plot_reliability

    plot_reliability(reliability_bins(softmax(logits), labels), reliability_bins(softmax(logits, temperature), labels),
                     temperature, png)
    return describe(calibration_summary(logits, labels, temperature), temperature)
