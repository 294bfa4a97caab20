"""Figures: training curves and the confusion matrix as PNGs (matplotlib's Agg backend, imported when drawing)."""
from __future__ import annotations

import numpy as np

from flowerclf.base.files import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str) -> None:
    """A matplotlib figure to a PNG, atomically, then closed."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    pyplot().close(fig)


def plain_text(text: str) -> str:
    """`text` as matplotlib should show it: a `$` is a dollar sign, never the start of math."""
    return str(text).replace("$", r"\$")


def plot_history(history: list[dict], path: str) -> None:
    """Loss and validation accuracy per epoch, with the best epoch (the one checkpoint.pth keeps) marked."""
    plt = pyplot()
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
    save_figure(fig, path)


def plot_confusion_matrix(cm: np.ndarray, labels: list[str], path: str) -> None:
    """Row-normalized confusion matrix; readable from 2 to 102+ classes (figure grows, font shrinks)."""
    plt = pyplot()
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


def plot_reliability(before: list[dict], after: list[dict], temperature: float, path: str) -> None:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature scaling."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, bins, title in ((axes[0], before, "raw softmax"), (axes[1], after, f"temperature {temperature:.2f}")):
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfectly calibrated")
        ax.bar([b["centre"] for b in bins], [b["accuracy"] for b in bins], width=1 / 15, alpha=0.7,
               edgecolor="black", label="accuracy per bin")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)
