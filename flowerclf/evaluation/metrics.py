"""Metrics of a split's logits: top-1/top-k accuracy, per-class precision/recall/F1, confusions, top losses.

numpy only: the same numbers for training, evaluate.py and the reports.
"""
from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise probabilities of logits / temperature."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature))


MATRIX_CLASSES = 300  # a confusion matrix of more classes is neither readable nor small (100,000: 75 GiB)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (labels, predicted), 1)
    return cm


def matrix_rows(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray | None:
    """The classes a confusion matrix shows: all of them, or past MATRIX_CLASSES those the split holds or was
    taken for; None when even those are too many."""
    if n_classes <= MATRIX_CLASSES:
        return np.arange(n_classes)
    present = np.union1d(labels, predicted)
    return present if len(present) <= MATRIX_CLASSES else None


def ranked(logits: np.ndarray, k: int) -> np.ndarray:
    """The k highest-scoring classes of each row, best first; ties go to the lower class index."""
    return np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]


def accuracies(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Top-1 and top-k accuracy, k = min(5, classes): the one definition training and reports share."""
    topk = ranked(logits, min(5, np.shape(logits)[1]))
    labels = np.asarray(labels)
    return float((topk[:, 0] == labels).mean()), float((topk == labels[:, None]).any(axis=1).mean())


def balanced_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The mean of the per-class recalls over the classes the split holds: each class counts once, however many
    photos it has (top-1 lets the big classes drown a small one)."""
    labels = np.asarray(labels, dtype=np.int64)
    support = np.bincount(labels)  # counted over the photos in two bincounts, no loop over the classes
    right = np.bincount(labels[ranked(logits, 1)[:, 0] == labels], minlength=len(support))
    present = support > 0
    return float((right[present] / support[present]).mean()) if present.any() else 0.0


TOP_LOSSES = 24  # photos in report.html's top-loss grid


def classification_report(logits: np.ndarray, labels: np.ndarray, classes: list[str],
                          names: dict[str, str] | None = None, most_confused: int = 10,
                          files: list[str] | None = None, top_losses: int = TOP_LOSSES) -> dict:
    """Top-1/top-k accuracy (k = min(5, classes), in "top5" and named by "top_k"), balanced accuracy, per-class
    precision/recall/F1/support, the most confused pairs.

    With the `files` of the rows, also the `top_losses` highest-loss photos and an example photo per pair.
    """
    names = names or {}
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    top1, top5 = accuracies(logits, labels)
    n, guess = len(classes), ranked(logits, 1)[:, 0]
    # counted per pair of the split, never per pair of classes: the work follows the photos
    tp = np.bincount(labels[guess == labels], minlength=n).astype(float)
    predicted, support = np.bincount(guess, minlength=n), np.bincount(labels, minlength=n)
    wrong = np.flatnonzero(guess != labels)
    codes, counts = np.unique(labels[wrong].astype(np.int64) * n + guess[wrong], return_counts=True)
    rows = matrix_rows(labels, guess, n)
    cm = None
    if rows is not None:
        index = np.full(n, -1)
        index[rows] = np.arange(len(rows))
        cm = confusion_matrix(index[labels], index[guess], len(rows)).tolist()
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                   where=(precision + recall) > 0)
    pairs = sorted(((int(c), int(code // n), int(code % n)) for code, c in zip(codes, counts)),
                   key=lambda t: (-t[0], t[1], t[2]))
    label = lambda i: names.get(classes[i], classes[i])  # noqa: E731
    result = {
        "images": int(len(labels)),
        "top1": top1,
        "top5": top5,
        "top_k": min(5, len(classes)),
        "balanced_accuracy": balanced_accuracy(logits, labels),
        "per_class": [{"class": c, "name": label(i), "precision": float(precision[i]), "recall": float(recall[i]),
                       "f1": float(f1[i]), "support": int(support[i])} for i, c in enumerate(classes)],
        "most_confused": [{"true": label(i), "predicted": label(j), "count": n} for n, i, j in pairs[:most_confused]],
        "confusion_matrix": cm,  # None past MATRIX_CLASSES classes in the split
        "confusion_classes": None if rows is None else [classes[i] for i in rows],  # its rows and columns
    }
    if files is not None:
        _add_mistakes(result, logits, labels, files, label, [(i, j) for _, i, j in pairs[:most_confused]], top_losses)
    return result


def _add_mistakes(result: dict, logits: np.ndarray, labels: np.ndarray, files: list[str], label,
                  pairs: list[tuple[int, int]], n: int) -> None:
    """result["top_losses"]: the n photos of highest cross-entropy; each confused pair's highest-loss "example"."""
    log_probs = log_softmax(logits)
    rows = np.arange(len(labels))
    loss, predicted = -log_probs[rows, labels], ranked(logits, 1)[:, 0]
    order = np.argsort(-loss, kind="stable")  # ties keep the file order
    result["top_losses"] = [{"path": files[r], "true": label(labels[r]), "predicted": label(predicted[r]),
                             "probability": float(np.exp(log_probs[r, predicted[r]])), "loss": float(loss[r]),
                             "correct": bool(predicted[r] == labels[r])}
                            for r in order[:n]]
    for pair, (i, j) in zip(result["most_confused"], pairs):
        pair["example"] = files[next(r for r in order if labels[r] == i and predicted[r] == j)]
