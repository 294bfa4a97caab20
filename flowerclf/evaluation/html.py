"""report.html: a run's results as one offline page (run, curves, confusion matrix, class table, top losses).

No CDN and no framework: inline CSS, a few lines of inline JavaScript to sort the class table,
the figures linked beside the page and photo thumbnails embedded as JPEG data URIs.
"""
from __future__ import annotations

import base64
import html
import io
import os
import time
import urllib.parse
from pathlib import Path
from typing import Callable

from flowerclf.base.errors import FlowerclfError
from flowerclf.base.files import atomic_write
from flowerclf.base.runfiles import RunFiles
from flowerclf.data.images import load_rgb

THUMBNAIL_PX = 180

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
header { background: #23324a; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 6px; font-size: 22px; }
.stats span { display: inline-block; margin-right: 22px; font-size: 17px; }
.stats b { font-size: 22px; }
main { padding: 8px 28px 40px; max-width: 1400px; }
section { background: #fff; border-radius: 8px; padding: 14px 20px; margin: 16px 0;
          box-shadow: 0 1px 3px rgba(0, 0, 0, .12); }
h2 { font-size: 18px; margin: 4px 0 12px; }
table { border-collapse: collapse; }
td, th { padding: 4px 12px; text-align: left; border-bottom: 1px solid #e3e6ea; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; user-select: none; background: #eef1f5; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; }
img.figure { max-width: 100%; height: auto; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 12px; }
figure { margin: 0; background: #fafbfc; border: 1px solid #e3e6ea; border-radius: 6px; padding: 6px; }
figure img { display: block; margin: 0 auto 4px; max-width: 100%; }
figcaption { font-size: 13px; }
.wrong { color: #b3261e; }
.right { color: #1e7b34; }
figure.wrong { border: 2px solid #b3261e; }
figure.right { border: 2px solid #7bbf8a; }
.muted { color: #667085; }
code { font-size: 13px; }
"""

# Numbers sort by data-value; a second click on the same column reverses the order.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var up = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col], d;
        if ("value" in x.dataset) { d = parseFloat(x.dataset.value) - parseFloat(y.dataset.value); }
        else { d = x.textContent.localeCompare(y.textContent); }
        return up ? d : -d;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def run_facts(script: str, train_args: dict, device: str, split: str, images: str, best_epoch) -> dict[str, str]:
    """The 'Run' table: what was trained on what, where it ran, which epoch is kept, when."""
    epochs = train_args.get("epochs")
    return {
        "made by": script,
        "model": f"{train_args.get('arch', '?')}, weights {train_args.get('weights', '?')}",
        "trained on": str(train_args.get("data_dir", "?")),
        "evaluated on": split,
        "images": images,
        "device": f"{device}, feature engine {train_args.get('engine', 'torch')}",
        "best epoch": f"{best_epoch} of {epochs}" if epochs else str(best_epoch),
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _link(target: str, page_dir: str) -> str:
    """A URL for a file: relative to the page when beside it or below, else an absolute file: URI."""
    rel = os.path.relpath(os.path.abspath(target), page_dir)
    if not rel.startswith(".."):
        return urllib.parse.quote(rel.replace(os.sep, "/"))
    return Path(target).resolve().as_uri()


def _thumbnail(path: str) -> str:
    """An <img> with the photo shrunk to a JPEG data URI, or a note when it cannot be read any more."""
    try:
        img = load_rgb(path)
    except FlowerclfError as e:
        return f'<p class="muted">{_e(e)}</p>'
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" width="{img.width}" height="{img.height}" alt="{_e(path)}">'


def _photo(path: str, page_dir: str, caption: str, kind: str = "") -> str:
    return (f'<figure class="{kind}"><a href="{_e(_link(path, page_dir))}" title="{_e(path)}">{_thumbnail(path)}</a>'
            f'<figcaption>{caption}</figcaption></figure>')


def _class_table(per_class: list[dict]) -> str:
    """Per-class rows, worst first (lowest F1, then lowest recall), sortable by any column."""
    rows = []
    for c in sorted(per_class, key=lambda c: (c["f1"], c["recall"], c["class"])):
        cells = [f"<td>{_e(c['class'])}</td>", f"<td>{_e(c['name'])}</td>"]
        cells += [f'<td class="num" data-value="{c[k]}">{100 * c[k]:.1f}%</td>' for k in ("precision", "recall", "f1")]
        cells.append(f'<td class="num" data-value="{c["support"]}">{c["support"]}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    sorted_by = ' aria-sort="ascending"'  # the default order, shown on its column
    heads = "".join(f"<th{sorted_by if h == 'F1' else ''}>{h}</th>"
                    for h in ("class", "name", "precision", "recall", "F1", "support"))
    return (f'<table class="sortable" id="classes"><thead><tr>{heads}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _loss_card(t: dict, page_dir: str) -> str:
    """One top-loss photo: right (green) or wrong (red), its names, probability and loss."""
    kind = "right" if t.get("correct", t["true"] == t["predicted"]) else "wrong"
    return _photo(t["path"], page_dir,
                  f'<b class="{kind}">{"right" if kind == "right" else "wrong"}</b><br>'
                  f'true: <b>{_e(t["true"])}</b><br>predicted: <b class="{kind}">{_e(t["predicted"])}</b> '
                  f'({100 * t["probability"]:.1f}%)<br><span class="muted">loss {t["loss"]:.3f}</span>', kind)


def _mistakes(result: dict, page_dir: str) -> str:
    """The highest-loss grid (right and wrong marked apart) and the most confused pairs with an example each."""
    shown = result.get("top_losses", [])
    wrong = sum(1 for t in shown if not t.get("correct", t["true"] == t["predicted"]))
    all_right = not result["most_confused"]
    pairs = [_photo(p["example"], page_dir, f'<b>{_e(p["true"])}</b> taken for <b class="wrong">'
                                            f'{_e(p["predicted"])}</b>: {p["count"]}x', "wrong")
             for p in result["most_confused"] if "example" in p]
    summary = ("Every photo was classified correctly: these are the ones it was least sure of."
               if all_right else f"{wrong} of these {len(shown)} are wrong (red); the others are right but unsure "
                                 f"(green).")
    return (f'<section><h2>Highest loss: the {len(shown)} photos the model was least sure of</h2>'
            f'<p id="loss-summary">{summary} Highest cross-entropy first; each photo links to its file.</p>'
            f'<div class="grid" id="top-losses">{"".join(_loss_card(t, page_dir) for t in shown)}</div></section>'
            f'<section><h2>Most confused pairs</h2>'
            + (f'<div class="grid" id="confused">{"".join(pairs)}</div>' if pairs
               else '<p>No confusions: every photo was classified correctly.</p>') + '</section>')


def write_html_report(out_dir: str, stem: str, result: dict, facts: dict[str, str], settings: dict,
                      figures: dict[str, str], sections: Callable[[str], str] | None = None) -> str:
    """OUT/report.html (OUT/STEM_report.html for a split other than test): the run `facts` and training
    `settings`, the `figures` ({title: PNG path}, those that exist), the class table, the mistakes, and
    what `sections(page folder)` adds (the audit).
    """
    path = RunFiles(out_dir).report_html(stem)
    page_dir = os.path.dirname(os.path.abspath(path))
    stats = "".join(f"<span>{label} <b>{value}</b></span>" for label, value in (
        ("top-1", f"{100 * result['top1']:.2f}%"),
        ("balanced accuracy", f"{100 * result['balanced_accuracy']:.2f}%"),  # the mean per-class recall
        (f"top-{result.get('top_k', 5)}", f"{100 * result['top5']:.2f}%"),
        ("images", result["images"]), ("classes", len(result["per_class"]))))
    run_rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts.items())
    setting_rows = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in settings.items())
    figs = "".join(f'<section><h2>{_e(title)}</h2><a href="{_e(_link(png, page_dir))}">'
                   f'<img class="figure" src="{_e(_link(png, page_dir))}" alt="{_e(title)}"></a></section>'
                   for title, png in figures.items() if os.path.isfile(png))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>flowerclf report: {_e(facts.get("evaluated on", ""))}</title><style>{STYLE}</style></head>
<body><header><h1>flowerclf report</h1><div class="stats">{stats}</div></header><main>
<section><h2>Run</h2><table id="run">{run_rows}</table>
<details><summary>all training settings</summary><table>{setting_rows}</table></details></section>
{figs}
<section><h2>Per class (worst first; click a column to sort)</h2>{_class_table(result["per_class"])}</section>
{_mistakes(result, page_dir)}
{sections(page_dir) if sections else ""}
</main><script>{SCRIPT}</script></body></html>
"""
    atomic_write(path, lambda f: f.write(page.encode("utf-8")))
    return path
