"""predict.py --plot: the classic sanity check, each image above a bar chart of its top-k names."""
from __future__ import annotations

import os

from flowerclf.evaluation.plots import plain_text, pyplot, save_figure

PLOT_COLUMNS, PLOT_MAX_IMAGES = 4, 16
TITLE_CHARS, NAME_CHARS = 34, 22  # what fits a 4.2-inch tile at the fonts below


def fit(text: str, limit: int) -> str:
    """`text` shortened to `limit` characters with an ellipsis in the middle, so both ends stay readable."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = limit - 1
    return f"{text[:(keep + 1) // 2]}…{text[len(text) - keep // 2:]}"


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
        top_ax.set_title(plain_text(f"{fit(os.path.basename(result['image']), TITLE_CHARS)}\n"
                                    f"{fit(preds[0]['name'], TITLE_CHARS - 5)} {100 * preds[0]['probability']:.0f}%"),
                         fontsize=11)
        bar_ax.axis("on")
        bars = bar_ax.barh(range(len(preds)), [100 * p["probability"] for p in preds], color="tab:blue")
        bar_ax.bar_label(bars, labels=[f"{100 * p['probability']:.1f}%" for p in preds], padding=3, fontsize=9)
        bar_ax.set_yticks(range(len(preds)), [plain_text(fit(p["name"], NAME_CHARS)) for p in preds])
        bar_ax.invert_yaxis()
        bar_ax.set_xlim(0, 118)  # room for the label of a bar at 100%
        bar_ax.set_xlabel("probability (%)")
    fig.tight_layout()
    save_figure(fig, path)
