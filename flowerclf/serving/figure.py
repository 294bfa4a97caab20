"""predict.py --plot: the classic sanity check, each image above a bar chart of its top-k names."""
from __future__ import annotations

import os

from flowerclf.evaluation.plots import plain_text, pyplot, save_figure


PLOT_COLUMNS, PLOT_MAX_IMAGES = 4, 16


def plot_predictions(images: list, results: list[dict], path: str) -> None:
    """The classic sanity check: each image above a bar chart of its top-k names, in a grid of up to 4 columns."""
    plt = pyplot()
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
