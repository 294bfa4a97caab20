"""What the model learned, as files: history, curves, test report, confusion matrix, prediction figures.

numpy and matplotlib only (Agg backend: no display needed); matplotlib is imported when a plot is drawn.
"""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

from files import atomic_write


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt



def write_json(obj, path: str) -> None:
    """JSON to `path`, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode("utf-8")))


def save_figure(fig, path: str) -> None:
    """A matplotlib figure to a PNG, atomically, then closed."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    _pyplot().close(fig)


def write_history(history: list[dict], save_dir: str) -> list[str]:
    """history.json, history.csv and training_curves.png; returns the paths written."""
    paths = [os.path.join(save_dir, n) for n in ("history.json", "history.csv", "training_curves.png")]
    write_json(history, paths[0])
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write(paths[1], lambda f: f.write(text.getvalue().encode("utf-8")))
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["valid_loss"] for h in history], "o-", label="valid")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["valid_acc"] for h in history], "o-", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="valid accuracy (%)", title="Validation accuracy")
    best = max(history, key=lambda h: h["valid_acc"])  # the first best epoch, the one checkpoint.pth keeps
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axvline(best["epoch"], color="grey", linestyle="--", linewidth=1)
    ax_acc.annotate(f"best: epoch {best['epoch']}", (best["epoch"], 100 * best["valid_acc"]),
                    textcoords="offset points", xytext=(4, -12), fontsize=9)
    fig.tight_layout()
    save_figure(fig, paths[2])
    return paths


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (labels, predicted), 1)
    return cm


def ranked(logits: np.ndarray, k: int) -> np.ndarray:
    """The k highest-scoring classes of each row, best first; ties go to the lower class index."""
    return np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]


def accuracies(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Top-1 and top-k accuracy, k = min(5, classes): the one definition training and reports share."""
    topk = ranked(logits, min(5, np.shape(logits)[1]))
    labels = np.asarray(labels)
    return float((topk[:, 0] == labels).mean()), float((topk == labels[:, None]).any(axis=1).mean())


TOP_LOSSES = 24  # photos in report.html's top-loss grid


def classification_report(logits: np.ndarray, labels: np.ndarray, classes: list[str],
                          names: dict[str, str] | None = None, most_confused: int = 10,
                          files: list[str] | None = None, top_losses: int = TOP_LOSSES) -> dict:
    """Top-1/top-5 accuracy, per-class precision/recall/F1/support, the most confused pairs.

    With the `files` of the rows, also the `top_losses` highest-loss photos and an example photo per pair.
    """
    names = names or {}
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    top1, top5 = accuracies(logits, labels)
    cm = confusion_matrix(labels, ranked(logits, 1)[:, 0], len(classes))
    tp = np.diag(cm).astype(float)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                   where=(precision + recall) > 0)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    pairs = sorted(((int(off[i, j]), i, j) for i, j in zip(*np.nonzero(off))), key=lambda t: (-t[0], t[1], t[2]))
    label = lambda i: names.get(classes[i], classes[i])  # noqa: E731
    result = {
        "images": int(len(labels)),
        "top1": top1,
        "top5": top5,
        "per_class": [{"class": c, "name": label(i), "precision": float(precision[i]), "recall": float(recall[i]),
                       "f1": float(f1[i]), "support": int(support[i])} for i, c in enumerate(classes)],
        "most_confused": [{"true": label(i), "predicted": label(j), "count": n} for n, i, j in pairs[:most_confused]],
        "confusion_matrix": cm.tolist(),
    }
    if files is not None:
        _add_mistakes(result, logits, labels, files, label, [(i, j) for _, i, j in pairs[:most_confused]], top_losses)
    return result


def _add_mistakes(result: dict, logits: np.ndarray, labels: np.ndarray, files: list[str], label,
                  pairs: list[tuple[int, int]], n: int) -> None:
    """result["top_losses"]: the n photos of highest cross-entropy; each confused pair's highest-loss "example"."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    loss, predicted = -log_probs[rows, labels], ranked(logits, 1)[:, 0]
    order = np.argsort(-loss, kind="stable")  # ties keep the file order
    result["top_losses"] = [{"path": files[r], "true": label(labels[r]), "predicted": label(predicted[r]),
                             "probability": float(np.exp(log_probs[r, predicted[r]])), "loss": float(loss[r])}
                            for r in order[:n]]
    for pair, (i, j) in zip(result["most_confused"], pairs):
        pair["example"] = files[next(r for r in order if labels[r] == i and predicted[r] == j)]


def plot_confusion_matrix(cm: np.ndarray, labels: list[str], path: str) -> None:
    """Row-normalized confusion matrix; readable from 2 to 102+ classes (figure grows, font shrinks)."""
    plt = _pyplot()
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(labels)
    side = min(40.0, max(5.0, 0.22 * n + 3))
    font = min(10.0, 0.35 * side * 72 / max(n, 1))  # about a third of a cell
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (each row sums to 1)")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if norm[i, j] > 0:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=font,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(report: dict, save_dir: str, stem: str = "test") -> list[str]:
    """STEM_report.json and confusion_matrix.png (the latter prefixed by STEM unless it is 'test')."""
    paths = [os.path.join(save_dir, f"{stem}_report.json"),
             os.path.join(save_dir, "confusion_matrix.png" if stem == "test" else f"{stem}_confusion_matrix.png")]
    write_json(report, paths[0])
    plot_confusion_matrix(np.array(report["confusion_matrix"]), [c["name"] for c in report["per_class"]], paths[1])
    return paths


PLOT_COLUMNS, PLOT_MAX_IMAGES = 4, 16


def plain_text(text: str) -> str:
    """`text` as matplotlib should show it: a `$` is a dollar sign, never the start of math."""
    return str(text).replace("$", r"\$")


def plot_predictions(images: list, results: list[dict], path: str) -> None:
    """The classic sanity check: each image above a bar chart of its top-k names, in a grid of up to 4 columns."""
    plt = _pyplot()
    n = len(results)
    cols, rows = min(n, PLOT_COLUMNS), -(-n // PLOT_COLUMNS)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(4.2 * cols, 7.5 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [1.2, 1] * rows})
    for ax in axes.flat:
        ax.axis("off")
    for i, (img, result) in enumerate(zip(images, results)):
        preds = result["predictions"]
        top_ax, bar_ax = axes[2 * (i // cols)][i % cols], axes[2 * (i // cols) + 1][i % cols]
        top_ax.imshow(img)
        top_ax.set_title(plain_text(f"{os.path.basename(result['image'])}\n{preds[0]['name']} "
                                    f"{100 * preds[0]['probability']:.0f}%"), fontsize=11)
        bar_ax.axis("on")
        bar_ax.barh(range(len(preds)), [100 * p["probability"] for p in preds], color="tab:blue")
        bar_ax.set_yticks(range(len(preds)), [plain_text(p["name"]) for p in preds])
        bar_ax.invert_yaxis()
        bar_ax.set_xlim(0, 100)
        bar_ax.set_xlabel("probability (%)")
    fig.tight_layout()
    save_figure(fig, path)
