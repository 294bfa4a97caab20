"""report.html: its top losses and confused pairs, the page train.py and evaluate.py write, seen in a browser."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import evaluate
from flowerclf.evaluation.html import write_html_report
from flowerclf.evaluation.metrics import classification_report


def test_top_losses_and_pair_examples_on_a_hand_example():
    logits = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 4.0], [0.0, 0.5]])
    labels = np.array([0, 0, 0, 1, 0])
    files = ["a.png", "b.png", "c.png", "d.png", "e.png"]
    r = classification_report(logits, labels, ["x", "y"], {"x": "ex"}, files=files, top_losses=3)
    # cross-entropy by hand: b = log(1 + e^2), e = log(1 + e^0.5), c = log(1 + e^-1)
    assert [t["path"] for t in r["top_losses"]] == ["b.png", "e.png", "c.png"]
    b = r["top_losses"][0]
    assert (b["true"], b["predicted"]) == ("ex", "y")
    assert b["loss"] == pytest.approx(np.log1p(np.exp(2.0)))
    assert b["probability"] == pytest.approx(1 / (1 + np.exp(-2.0)))  # of the predicted class
    assert r["most_confused"] == [{"true": "ex", "predicted": "y", "count": 2, "example": "b.png"}]
    assert "top_losses" not in classification_report(logits, labels, ["x", "y"])


def _evaluate(trained_run, out, split, *flags):
    return evaluate.main([str(trained_run["save"] / "checkpoint.pth"), os.path.join(trained_run["data"], split),
                          "--out", str(out), "--category_names", trained_run["names"], *flags])


def test_train_writes_an_offline_report_and_prints_its_path_last(trained_run):
    page = trained_run["save"] / "report.html"
    assert trained_run["stdout"].strip().splitlines()[-1] == f"report: {page}"
    text = page.read_text()
    # offline: nothing is fetched from a network, every figure is a file beside the page
    assert not re.search(r'(src|href)="(https?:)?//', text)
    for figure in ("training_curves.png", "confusion_matrix.png"):
        assert f'src="{figure}"' in text and (trained_run["save"] / figure).is_file()
    assert "efficientnet_lite0" in text and "pink primrose" in text


def test_evaluate_json_has_the_top_losses_and_the_page_for_any_split(trained_run, tmp_path, capsys):
    assert _evaluate(trained_run, tmp_path, "test", "--json") == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert captured.err.strip().splitlines()[-1] == f"report: {tmp_path / 'eval_test_report.html'}"
    top = result["top_losses"]
    assert len(top) == result["images"] == 9
    assert set(top[0]) == {"path", "true", "predicted", "probability", "loss", "correct"}
    assert not top[0]["correct"] and sum(not t["correct"] for t in top) == 9 - round(9 * result["top1"])
    assert [t["loss"] for t in top] == sorted((t["loss"] for t in top), reverse=True)
    assert top[0]["path"] == trained_run["mislabelled"]  # the one photo filed under the wrong class
    assert (top[0]["true"], top[0]["predicted"]) == ("pink primrose", "globe thistle")
    pair = result["most_confused"][0]
    assert (pair["true"], pair["predicted"], pair["example"]) == ("pink primrose", "globe thistle",
                                                                  trained_run["mislabelled"])
    assert _evaluate(trained_run, tmp_path, "valid") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"report: {tmp_path / 'eval_valid_report.html'}"
    assert (tmp_path / "eval_valid_report.html").is_file()


def test_evaluate_keeps_the_report_train_wrote(trained_run, capsys):
    save = trained_run["save"]
    before = {name: (save / name).read_bytes() for name in ("report.html", "test_report.json", "confusion_matrix.png")}
    assert evaluate.main([str(save / "checkpoint.pth"), os.path.join(trained_run["data"], "test")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {save / 'eval_test_report.html'}"
    assert {name: (save / name).read_bytes() for name in before} == before


def test_report_in_a_browser(trained_run, browser, tmp_path, capsys):
    from selenium.webdriver.common.by import By

    assert _evaluate(trained_run, tmp_path, "test", "--json") == 0
    top = json.loads(capsys.readouterr().out)["top_losses"]
    browser.get((trained_run["save"] / "report.html").as_uri())
    loaded = browser.execute_script("return Array.from(document.images, i => [i.alt, i.complete && i.naturalWidth])")
    assert ["Training curves", 1000] in loaded and dict(loaded)["Confusion matrix"] > 300

    grid = browser.find_elements(By.CSS_SELECTOR, "#top-losses figure")
    assert len(grid) == len(top) == 9
    first = grid[0]
    assert first.find_element(By.TAG_NAME, "a").get_attribute("href") == Path(top[0]["path"]).resolve().as_uri()
    assert first.find_element(By.TAG_NAME, "img").get_property("naturalWidth") > 0
    caption = first.find_element(By.TAG_NAME, "figcaption").text
    assert "true: pink primrose" in caption and "predicted: globe thistle" in caption and "wrong" in caption
    kinds = [figure.get_attribute("class") for figure in grid]
    assert kinds == ["right" if t["correct"] else "wrong" for t in top] and "right" in kinds
    red, green = (browser.execute_script(
        f"return getComputedStyle(document.querySelector('#top-losses figure.{k} figcaption b.{k}')).color")
        for k in ("wrong", "right"))
    assert red != green  # a right answer's predicted name is not painted as a mistake
    summary = browser.find_element(By.ID, "loss-summary").text
    assert f"{kinds.count('wrong')} of these 9 are wrong" in summary
    assert f"({100 * top[0]['probability']:.1f}%)" in caption
    confused = browser.find_element(By.CSS_SELECTOR, "#confused figure")
    assert "pink primrose taken for globe thistle" in confused.text

    def column(i):
        return [row.find_elements(By.TAG_NAME, "td")[i].text for row in
                browser.find_elements(By.CSS_SELECTOR, "#classes tbody tr")]

    f1 = [float(x.rstrip("%")) for x in column(4)]
    assert f1 == sorted(f1) and len(f1) == 3  # worst class first
    support = browser.find_element(By.XPATH, "//table[@id='classes']//th[text()='support']")
    support.click()
    assert column(5) == ["2", "3", "4"]  # test/1 has its 3 photos plus the mislabelled one
    support.click()
    assert column(5) == ["4", "3", "2"]
    browser.find_element(By.XPATH, "//table[@id='classes']//th[text()='name']").click()
    assert column(1) == ["blanket flower", "globe thistle", "pink primrose"]


def test_a_split_without_mistakes_says_so_in_both_sections(tmp_path):
    from PIL import Image

    files = []
    for i in range(4):
        files.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(files[-1])
    logits = np.array([[2.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 0.5]])
    result = classification_report(logits, np.array([0, 0, 1, 1]), ["a", "b"], files=files)
    page = open(write_html_report(str(tmp_path), "test", result, {}, {}, {})).read()
    assert "Every photo was classified correctly: these are the ones it was least sure of." in page
    assert "No confusions: every photo was classified correctly." in page and 'class="wrong"' not in page
    assert "top-2" in page and "top-5" not in page  # k is capped at the number of classes
