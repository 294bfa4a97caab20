"""The page serve.py shows: one HTML document (inline CSS and JavaScript, nothing fetched) to drop photos on.

Each photo is sent on its own to POST /predict, so each card gets its own answer or error.
"""
from __future__ import annotations

import html
import os

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
header { background: #23324a; color: #fff; padding: 16px 28px; }
header h1 { margin: 0; font-size: 22px; }
header p { margin: 4px 0 0; color: #c9d3e3; }
main { padding: 18px 28px 40px; max-width: 1400px; }
#drop { border: 2px dashed #8a96a8; border-radius: 10px; padding: 28px; text-align: center; background: #fff; }
#drop.over { border-color: #2f6fde; background: #eaf1fd; }
#drop label { color: #2f6fde; text-decoration: underline; cursor: pointer; }
#files { display: block; margin: 10px auto 0; }
#results { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); gap: 14px;
           margin-top: 18px; }
.card { background: #fff; border-radius: 8px; padding: 10px; box-shadow: 0 1px 3px rgba(0, 0, 0, .12); }
.card img { display: block; width: 100%; height: 190px; object-fit: contain; background: #eef1f5; }
.noimg { height: 190px; background: #eef1f5; color: #667085; display: flex; align-items: center;
         justify-content: center; }
.card h2 { font-size: 14px; margin: 6px 0; overflow-wrap: anywhere; }
.row { display: grid; grid-template-columns: 1fr 56px; gap: 2px 8px; margin: 5px 0; font-size: 14px; }
.row .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.row .prob { text-align: right; font-variant-numeric: tabular-nums; }
.track { grid-column: 1 / 3; height: 9px; background: #e3e6ea; border-radius: 5px; }
.bar { height: 100%; background: #2f6fde; border-radius: 5px; }
.row:first-of-type .bar { background: #1b9e55; }
.error { color: #b3261e; }
.unsure { color: #8a5a00; background: #fff4d6; border-radius: 4px; padding: 2px 6px; margin: 4px 0; }
.muted { color: #667085; }
"""

SCRIPT = """
var results = document.getElementById("results"), maxBytes = parseInt(document.body.dataset.maxBytes, 10);

function element(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) { e.className = cls; }
  if (text !== undefined) { e.textContent = text; }  // text, never HTML: names come from files
  return e;
}

function showError(card, message) {
  card.status.className = "error";
  card.status.textContent = message;
}

function percent(p) { return (100 * p).toFixed(1) + "%"; }

function showPredictions(card, answer) {
  var predictions = answer.predictions;
  card.status.remove();
  if (answer.confident === false) {  // below the threshold: the model's, or serve.py --min_confidence
    card.appendChild(element("p", "unsure", "not sure: " + predictions.slice(0, 2).map(function (p) {
      return p.name + " " + percent(p.probability);
    }).join(", ")));
  }
  predictions.forEach(function (p) {
    var row = element("div", "row"), track = element("div", "track"), bar = element("div", "bar");
    row.dataset.probability = p.probability;
    row.appendChild(element("span", "name", p.name));
    row.appendChild(element("span", "prob", (100 * p.probability).toFixed(1) + "%"));
    bar.style.width = (100 * p.probability).toFixed(1) + "%";
    track.appendChild(bar);
    row.appendChild(track);
    card.appendChild(row);
  });
}

function predict(file) {
  var card = element("div", "card"), img = element("img");
  img.alt = file.name;
  img.onerror = function () { card.replaceChild(element("div", "noimg", "no preview"), img); };
  img.src = URL.createObjectURL(file);
  card.appendChild(img);
  card.appendChild(element("h2", "", file.name));
  card.status = card.appendChild(element("p", "muted", "predicting\\u2026"));
  results.insertBefore(card, results.firstChild);
  if (file.size > maxBytes) {
    showError(card, "too large: " + (file.size / 1048576).toFixed(1) + " MB; the limit is " +
              (maxBytes / 1048576).toFixed(0) + " MB");
    return;
  }
  var form = new FormData();
  form.append("file", file, file.name);
  fetch("predict", {method: "POST", body: form}).then(function (response) {
    return response.json().then(function (answer) {
      if (response.ok) { showPredictions(card, answer[0]); }
      else { showError(card, answer.error); }
    });
  }).catch(function () { showError(card, "no answer from the server; is serve.py still running?"); });
}

function predictAll(files) { Array.prototype.forEach.call(files, predict); }

var drop = document.getElementById("drop"), input = document.getElementById("files");
input.addEventListener("change", function () { predictAll(input.files); input.value = ""; });
["dragenter", "dragover"].forEach(function (type) {
  document.addEventListener(type, function (e) { e.preventDefault(); drop.classList.add("over"); });
});
document.addEventListener("dragleave", function () { drop.classList.remove("over"); });
document.addEventListener("drop", function (e) {
  e.preventDefault();
  drop.classList.remove("over");
  predictAll(e.dataTransfer.files);
});
"""


def render(model_path: str, classes: int, top_k: int, max_bytes: int) -> bytes:
    """The page for this model, as UTF-8 bytes."""
    model = html.escape(os.path.basename(model_path))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>flowerclf: {model}</title><style>{STYLE}</style></head>
<body data-max-bytes="{max_bytes}">
<header><h1>flowerclf</h1><p>{model}: {classes} classes, top {top_k} shown</p></header>
<main><div id="drop"><p><b>Drop photos here</b> or <label for="files">choose photos</label>
(several at once; up to {max_bytes // 2 ** 20} MB each)</p>
<input id="files" type="file" accept="image/*" multiple></div>
<div id="results"></div></main>
<script>{SCRIPT}</script></body></html>
""".encode("utf-8")
