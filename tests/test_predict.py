"""predict.py end to end through the same main() users run: JSON, text, folders, --plot, bad input."""
import contextlib
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, an_image, make_image_folder, one_error_line, truncated_jpeg
from conftest import run_script as _main
from PIL import Image

import predict
import train
from flowerclf.base import cli
from flowerclf.data.images import load_rgb
from flowerclf.data.transforms import Preprocess, decode_size, preprocess_image
from flowerclf.serving.table import csv_header
from flowerclf.serving.predictor import Predictor
from flowerclf.serving.figure import plot_predictions


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """efficientnet_lite0 (offline pretrained weights) trained 2 epochs on a 3-class set."""
    tmp = tmp_path_factory.mktemp("run")
    data = make_image_folder(tmp / "data")
    save = str(tmp / "save")
    names = tmp / "names.json"
    names.write_text(json.dumps({"1": "pink primrose", "2": "globe thistle", "3": "blanket flower"}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train.main([data, "--arch", "efficientnet_lite0", "--epochs", "2", "--save_dir", save,
                           "--batch_size", "8"])
    assert code == 0
    return data, save, str(names), out.getvalue()


def test_train_then_predict_json(trained, capsys):
    data, save, names, out = trained
    assert "epoch 1/2" in out and "epoch 2/2" in out and "valid acc" in out
    assert "test accuracy: top-1" in out
    ckpt = os.path.join(save, "checkpoint.pth")
    assert os.path.isfile(ckpt)

    image = os.path.join(data, "test", "2", "2_0.png")
    assert predict.main([image, ckpt, "--top_k", "3", "--category_names", names, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == [image]
    preds = results[0]["predictions"]
    assert len(preds) == 3
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
    mapping = json.load(open(names))
    assert all(p["name"] == mapping[p["class"]] for p in preds)
    assert preds[0]["class"] == "2"  # solid colours are easy even after two epochs


def test_predict_text_and_folders(trained, capsys):
    data, save, _, _ = trained
    ckpt = os.path.join(save, "checkpoint.pth")
    folder = os.path.join(data, "test", "1")
    assert predict.main([folder, ckpt, "--top_k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 * 3  # 3 images, each a path line and 2 ranked lines
    assert lines[1].startswith("  1. 1  ") and lines[1].endswith("%")


def test_checkpoint_is_plain_data_with_the_best_epoch(trained):
    _, save, _, _ = trained
    ckpt = torch.load(os.path.join(save, "checkpoint.pth"), map_location="cpu", weights_only=True)
    assert ckpt["model"]["arch"] == "efficientnet_lite0" and ckpt["model"]["num_classes"] == 3
    assert ckpt["class_to_idx"] == {"1": 0, "2": 1, "3": 2}
    assert ckpt["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    best = max(ckpt["history"], key=lambda h: h["valid_acc"])
    assert ckpt["epoch"] == best["epoch"] and ckpt["metrics"]["valid_acc"] == best["valid_acc"]
    assert ckpt["args"]["epochs"] == 2


def test_predict_bad_inputs(trained, tmp_path, capsys):
    data, save, _, _ = trained
    ckpt = os.path.join(save, "checkpoint.pth")
    good = os.path.join(data, "test", "1", "1_0.png")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    assert predict.main([good, str(bad), str(tmp_path / "missing.jpg"), ckpt, "--json"]) == 1
    captured = capsys.readouterr()
    good_item, bad_item = json.loads(captured.out)  # the good one is still predicted; the bad one says why
    assert good_item["image"] == good and "predictions" in good_item and "error" not in good_item
    assert bad_item == {"image": str(bad), "error": bad_item["error"]} and "broken.jpg" in bad_item["error"]
    assert "broken.jpg" in captured.err and "missing.jpg does not exist" in captured.err
    assert predict.main([good, str(tmp_path / "nope.pth")]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint {tmp_path / 'nope.pth'} does not exist"
    assert predict.main([good, good]) == 2
    assert "is an image; give the images first" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a model")
    assert predict.main([good, str(tmp_path / "notes.txt")]) == 2
    assert "is not a loadable checkpoint" in capsys.readouterr().err


def test_predict_plot(trained, tmp_path):
    data, save, names, _ = trained
    out = tmp_path / "fig.png"
    image = os.path.join(data, "test", "2", "2_0.png")
    with contextlib.redirect_stdout(io.StringIO()):
        assert predict.main([image, os.path.join(save, "checkpoint.pth"), "--category_names", str(names),
                             "--top_k", "3", "--plot", str(out)]) == 0
    w, h = Image.open(out).size
    assert (w, h) == (420, 750)
    with contextlib.redirect_stdout(io.StringIO()):
        assert predict.main([os.path.join(data, "test", "1"), os.path.join(save, "checkpoint.pth"),
                             "--plot", str(out)]) == 0
    assert Image.open(out).size == (3 * 420, 750)  # one column per image


def test_prediction_grid_wraps_after_four_columns(tmp_path):
    img = Image.new("RGB", (8, 8), (200, 30, 30))
    result = {"image": "x.png", "predictions": [{"class": "1", "name": "pink primrose", "probability": 0.9},
                                                 {"class": "2", "name": "globe thistle", "probability": 0.1}]}
    plot_predictions([img] * 5, [result] * 5, str(tmp_path / "grid.png"))
    assert Image.open(tmp_path / "grid.png").size == (4 * 420, 2 * 750)


def test_plot_edges(tiny_run, tmp_path):
    data, save = tiny_run
    ckpt = str(save / "checkpoint.pth")
    assert "is a folder" in one_error_line(*_main(predict, [an_image(data), ckpt, "--plot", str(tmp_path)])[::2])
    (tmp_path / "names.json").write_text(json.dumps({"1": "$\\frac{a", "2": "b$", "3": "c"}))
    code, _, err = _main(predict, [an_image(data), ckpt, "--plot", str(tmp_path / "p.png"), "--category_names",
                                   str(tmp_path / "names.json")])
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 0 and f"wrote {tmp_path / 'p.png'}" in err


@pytest.mark.slow
def test_a_closed_stdout_is_quiet_and_the_plot_is_still_written(tiny_run, tmp_path):
    data, save = tiny_run
    plot = tmp_path / "p.png"
    cmd = (f"{sys.executable} {os.path.join(ROOT, 'predict.py')} {os.path.join(data, 'test')} "
           f"{save / 'checkpoint.pth'} --plot {plot} --json | head -1")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    assert proc.stdout == "[\n" and "Traceback" not in proc.stderr and plot.stat().st_size > 0


def test_a_pth_on_the_inference_only_install_says_what_to_do(tiny_run, monkeypatch):
    data, save = tiny_run
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "torch" else real(name))
    line = one_error_line(*_main(predict, [an_image(data), str(save / "checkpoint.pth")])[::2])
    assert "this install has no torch" in line and "export.py" in line


def test_class_names_cannot_drive_the_terminal(tiny_run, tmp_path):
    data, save = tiny_run
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    ckpt["class_to_idx"] = {"\x1b[2J": 0, "\x1b]0;owned\x07": 1, "ok": 2}
    torch.save(ckpt, tmp_path / "esc.pth")
    code, out, _ = _main(predict, [an_image(data), str(tmp_path / "esc.pth")])
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\\x1b[2J" in out
    assert cli.printable("a\x1b[31mb\nc") == "a\\x1b[31mb\nc"


def test_a_fifo_in_a_predicted_folder_does_not_hang(tiny_run, tmp_path):
    data, save = tiny_run
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(open(an_image(data), "rb").read())
    os.mkfifo(folder / "x.jpg")
    code, out, _ = _main(predict, [str(folder), str(save / "checkpoint.pth"), "--json"])
    assert code == 0 and [os.path.basename(r["image"]) for r in json.loads(out)] == ["a.png"]
    assert "not a regular file" in one_error_line(*_main(predict, [str(folder / "x.jpg"),
                                                                    str(save / "checkpoint.pth")])[::2])


def _predict_json(image, checkpoint, *flags):
    code, out, err = _main(predict, [image, str(checkpoint), "--json", "--top_k", "3", *flags])
    assert code == 0, err
    return json.loads(out)


def test_not_sure_in_text_and_json_and_min_confidence_overrides(tiny_run):
    data, save = tiny_run
    image, ckpt = an_image(data), save / "checkpoint.pth"
    threshold = torch.load(ckpt, weights_only=True)["calibration"]["threshold"]
    answer = _predict_json(image, ckpt)[0]
    assert answer["confident"] == (answer["predictions"][0]["probability"] >= threshold)
    unsure = _predict_json(image, ckpt, "--min_confidence", "1")[0]
    assert unsure["confident"] is False and unsure["predictions"] == answer["predictions"]
    assert _predict_json(image, ckpt, "--min_confidence", "0")[0]["confident"] is True
    code, out, _ = _main(predict, [image, str(ckpt), "--min_confidence", "1", "--top_k", "3"])
    first, second = unsure["predictions"][:2]
    assert out.splitlines()[:2] == [image, f"  not sure: {first['name']} {100 * first['probability']:.1f}%, "
                                           f"{second['name']} {100 * second['probability']:.1f}%"]
    assert "not sure" not in _main(predict, [image, str(ckpt), "--min_confidence", "0"])[1]
    for bad in ("1.5", "-0.1", "nan", "x"):
        assert "--min_confidence" in one_error_line(*_main(predict, [image, str(ckpt), "--min_confidence", bad])[::2])


def test_predictions_divide_the_logits_by_the_temperature(tiny_run, tmp_path):
    data, save = tiny_run
    image = an_image(data)
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    del ckpt["calibration"]  # a checkpoint made before calibration: the raw softmax, no "confident"
    torch.save(ckpt, tmp_path / "old.pth")
    old = _predict_json(image, tmp_path / "old.pth")[0]
    assert "confident" not in old
    ckpt["calibration"] = {"temperature": 2.5, "threshold": 0.5, "kept": 0.95}
    torch.save(ckpt, tmp_path / "warm.pth")
    warm = _predict_json(image, tmp_path / "warm.pth")[0]
    raw = {p["class"]: np.log(p["probability"]) for p in old["predictions"]}  # all 3 classes: logits + a constant
    scaled = {c: np.exp(v / 2.5) for c, v in raw.items()}
    total = sum(scaled.values())
    assert {p["class"]: p["probability"] for p in warm["predictions"]} == \
        pytest.approx({c: v / total for c, v in scaled.items()}, abs=1e-5)
    assert warm["confident"] == (warm["predictions"][0]["probability"] >= 0.5)


def test_the_stored_threshold_keeps_the_stated_share_of_valid_right_answers(tiny_run):
    data, save = tiny_run
    calibration = torch.load(save / "checkpoint.pth", weights_only=True)["calibration"]
    results = _predict_json(os.path.join(data, "valid"), save / "checkpoint.pth")
    right = [r["predictions"][0]["probability"] for r in results
             if r["predictions"][0]["class"] == os.path.basename(os.path.dirname(r["image"]))]
    assert right  # the share is of something
    kept = sum(p >= calibration["threshold"] - 1e-6 for p in right) / len(right)
    assert kept >= calibration["kept"] == 0.95


def test_swapped_predict_arguments(tiny_run):
    data, save = tiny_run
    line = one_error_line(*_main(predict, [str(save / "checkpoint.pth"), os.path.join(data, "test")])[::2])
    assert "is a folder" in line and "checkpoint (.pth or .onnx) last" in line


_PEAK_RSS = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from flowerclf.data.transforms import Preprocess
from flowerclf.serving.predictor import Predictor
predictor = Predictor(lambda batch: np.full((len(batch), 3), 1 / 3), ["1", "2", "3"], Preprocess())
results, errors = predictor.predict_paths([sys.argv[2]], 1)
assert len(results) == int(sys.argv[3]) and not errors, (len(results), errors)
# this process's own high-water mark: ru_maxrss would count the forked test runner's memory too
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) // 1024)
"""


def _peak_rss_mib(folder, n):
    """Peak RSS (MiB) of a fresh process that predicts the n images in `folder` with a numpy backend."""
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, ROOT, str(folder), str(n)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.slow
def test_predicting_a_folder_holds_one_batch_of_images_at_a_time(tmp_path):
    # each image becomes a 3x224x224 float32 array (0.6 MB) whatever its size: 600 of them held at once is 360 MB
    tile = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    for n in (20, 600):
        (tmp_path / str(n)).mkdir()
        for i in range(n):
            tile.save(tmp_path / str(n) / f"{i:04d}.png")
    small, large = _peak_rss_mib(tmp_path / "20", 20), _peak_rss_mib(tmp_path / "600", 600)
    assert large < small + 150, f"peak RSS {small} MiB for 20 images, {large} MiB for 600"


def test_iter_predict_streams_results_and_errors_in_input_order(tmp_path):
    colours = {"red": (220, 40, 40), "green": (40, 200, 60)}
    batches, decoded = [], []

    def probabilities(batch):
        batches.append(len(batch))
        red = (batch[:, 0].mean(axis=(1, 2)) > batch[:, 1].mean(axis=(1, 2))).astype(np.float64)
        return np.stack([red, 1 - red], axis=1)

    def load(name):
        decoded.append(name)
        if name.startswith("bad"):
            return load_rgb(io.BytesIO(b"not an image"), name)
        return Image.new("RGB", (20, 20), colours[name.rstrip("0123456789")])

    names = ["red0", "bad1", "green2", "red3", "bad4", "green5", "red6"]
    predictor = Predictor(probabilities, ["r", "g"], Preprocess(resize_size=16, crop_size=16), batch_size=2)
    stream = predictor.iter_predict(((n, lambda n=n: load(n)) for n in names), 1)
    first = next(stream)  # the first batch is answered before the later images are even decoded
    assert first["image"] == "red0" and first["predictions"][0]["class"] == "r"
    assert batches == [2] and decoded == names[:3]
    items = [first, *stream]
    assert [item["image"] for item in items] == names and batches == [2, 2, 1]
    answers = [item.get("error", item.get("predictions", [{}])[0].get("class")) for item in items]
    assert [a if len(a) == 1 else a.split(" is ")[0] for a in answers] == ["r", "bad1", "g", "r", "bad4", "g", "r"]
    assert all("is not an image PIL can read" in a for a in answers if len(a) > 1)
    results, errors = predictor.predict_bytes([], 1)
    assert results == [] and errors == []


def test_top_k_is_capped_at_the_number_of_classes(tiny_run, capsys):
    data, save = tiny_run
    assert predict.main([an_image(data), str(save / "checkpoint.pth"), "--top_k", "5", "--json"]) == 0
    assert [len(r["predictions"]) for r in json.loads(capsys.readouterr().out)] == [3]


def test_plot_tiles_fit_long_names_and_label_their_bars(tmp_path, monkeypatch):
    from flowerclf.serving import figure
    from flowerclf.serving.figure import NAME_CHARS, TITLE_CHARS, fit

    long = "a_very_long_photo_name_from_a_phone_camera_roll_2026-11-30_14-22-09.jpg"
    assert len(fit(long, TITLE_CHARS)) == TITLE_CHARS and fit(long, TITLE_CHARS).endswith("09.jpg")
    assert fit("rose", NAME_CHARS) == "rose"
    captured = {}
    real = figure.save_figure

    def keep(fig, path):
        captured["fig"] = fig
        real(fig, path)
    result = {"image": long, "predictions": [{"name": "an extraordinarily long flower name indeed", "probability": 0.7},
                                             {"name": "rose", "probability": 0.3}]}
    monkeypatch.setattr(figure, "save_figure", keep)
    plot_predictions([Image.new("RGB", (20, 20))], [result], str(tmp_path / "p.png"))
    texts = [t.get_text() for ax in captured["fig"].axes for t in ax.texts]
    assert texts == ["70.0%", "30.0%"]  # the bars carry their numbers
    title = captured["fig"].axes[0].get_title()
    assert all(len(line) <= TITLE_CHARS for line in title.splitlines())


def test_a_strip_is_one_line_from_predict_and_the_upload_path(tiny_run, tmp_path):
    from flowerclf.serving.predictor import Predictor
    ckpt = str(tiny_run[1] / "checkpoint.pth")
    strip = tmp_path / "strip.png"
    Image.new("RGB", (20000, 1)).save(strip)  # a few hundred bytes; resized whole it would be 3.9 GB
    line = one_error_line(*_main(predict, [str(strip), ckpt])[::2])
    assert line.startswith(f"error: {strip} is 20000x1 pixels, a strip narrower than 1:20")
    results, errors = Predictor.load(ckpt).predict_bytes([("strip.png", strip.read_bytes())], 3)
    assert results == [] and errors == [line[len("error: "):].replace(str(strip), "strip.png")]


def test_predict_decodes_as_the_checkpoint_was_trained(tiny_run, tmp_path):
    _, save = tiny_run
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1200, 0:1600] / 1600
    pixels = np.stack([120 + 80 * x - 40 * y, 90 + 60 * y, 150 - 50 * x], -1) + rng.normal(0, 6, (1200, 1600, 3))
    photo = str(tmp_path / "big.jpg")
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(photo, quality=90)
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    pp = Preprocess.from_dict(ckpt["preprocess"])
    assert pp.decode == "draft2" and load_rgb(photo, draft=decode_size(pp)).size == (800, 600)
    drafted, full = (preprocess_image(load_rgb(photo, draft=draft), pp) for draft in (decode_size(pp), None))
    assert not np.array_equal(drafted, full) and np.abs(drafted - full).mean() < 0.05
    del ckpt["preprocess"]["decode"]  # a checkpoint from before the rule
    torch.save(ckpt, tmp_path / "old.pth")
    answers = []
    for path, expected in ((save / "checkpoint.pth", drafted), (tmp_path / "old.pth", full)):
        predictor, inputs = Predictor.load(str(path), "cpu"), []
        model = predictor.probabilities
        predictor.probabilities = lambda batch: model(inputs.append(batch.copy()) or batch)
        results, errors = predictor.predict_paths([photo], 3)
        with open(photo, "rb") as f:  # serve.py's uploads
            assert predictor.predict_bytes([("big.jpg", f.read())], 3)[1] == []
        assert errors == [] and len(inputs) == 2
        for batch in inputs:  # exactly the decode its checkpoint names
            np.testing.assert_array_equal(batch[0], expected)
        answers.append({p["class"]: p["probability"] for p in results[0]["predictions"]})
    assert answers[0] == pytest.approx(answers[1], abs=0.05)  # and the answers barely move


def _csv_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _photo_folder(data, folder, names):
    """`folder` holding a copy of one test photo under each of `names`; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    photo = open(an_image(data), "rb").read()
    for name in names:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(photo)
    return str(folder)


def test_csv_rows_match_json_exactly(tiny_run, tmp_path):
    data, save = tiny_run
    ckpt = str(save / "checkpoint.pth")
    folder = os.path.join(data, "valid")
    broken = tmp_path / "broken.jpg"
    truncated_jpeg(broken)
    items = json.loads(_main(predict, [folder, str(broken), ckpt, "--top_k", "2", "--json"])[1])
    code, out, err = _main(predict, [folder, str(broken), ckpt, "--top_k", "2", "--csv", str(tmp_path / "p.csv")])
    assert code == 1 and out == "" and err.strip() == f"wrote {tmp_path / 'p.csv'}: 9 photos predicted, 1 unreadable " \
                                                      f"(their rows say why)"
    header, *rows = _csv_rows(tmp_path / "p.csv")
    assert header == ["image", "confident", "class_1", "name_1", "probability_1", "class_2", "name_2",
                      "probability_2", "error"]
    assert len(rows) == len(items) == 10 and not os.path.exists(tmp_path / "p.csv.partial")
    for row, item in zip(rows, items):  # same order, same values: JSON's text of each probability
        cells = dict(zip(header, row))
        assert cells["image"] == item["image"] and cells["error"] == item.get("error", "")
        assert cells["confident"] == json.dumps(item["confident"]) if "confident" in item else cells["confident"] == ""
        preds = item.get("predictions", [])
        assert [cells[f"{c}_{n}"] for n in (1, 2) for c in ("class", "name")] == \
            ([v for p in preds for v in (p["class"], p["name"])] or [""] * 4)
        assert [cells[f"probability_{n}"] for n in (1, 2)] == ([json.dumps(p["probability"]) for p in preds] or
                                                               ["", ""])
    assert rows[-1][0] == str(broken) and "broken.jpg" in rows[-1][-1] and rows[-1][1:-1] == [""] * 7


def test_csv_of_a_folder_writes_rows_before_the_last_photo_is_read(tiny_run, tmp_path, monkeypatch):
    from flowerclf.serving import predictor as predictor_module
    data, save = tiny_run
    folder = _photo_folder(data, tmp_path / "photos", [f"{i:02d}.png" for i in range(40)])  # > one batch of 32
    last, seen = os.path.join(folder, "39.png"), {}
    real = predictor_module.load_rgb

    def reader(path, *args, **kwargs):
        if path == last:  # the rows of the first batch must be on disk already
            seen["rows"] = len(_csv_rows(tmp_path / "p.csv.partial")) - 1
            seen["final"] = os.path.exists(tmp_path / "p.csv")
        return real(path, *args, **kwargs)
    monkeypatch.setattr(predictor_module, "load_rgb", reader)
    code, _, err = _main(predict, [str(folder), str(save / "checkpoint.pth"), "--csv", str(tmp_path / "p.csv")])
    assert code == 0, err
    assert seen == {"rows": 32, "final": False}  # streamed into p.csv.partial, p.csv only once whole
    assert len(_csv_rows(tmp_path / "p.csv")) == 41 and not os.path.exists(tmp_path / "p.csv.partial")


def test_a_stopped_csv_leaves_its_rows_in_the_partial_file_and_no_half_file(tiny_run, tmp_path, monkeypatch):
    from flowerclf.serving import predictor as predictor_module
    data, save = tiny_run
    folder = _photo_folder(data, tmp_path / "photos", [f"{i:02d}.png" for i in range(40)])
    (tmp_path / "p.csv").write_text("the previous answers\n")
    real = predictor_module.load_rgb

    def interrupted(path, *args, **kwargs):
        if path.endswith("39.png"):
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)
    monkeypatch.setattr(predictor_module, "load_rgb", interrupted)
    code, _, err = _main(predict, [str(folder), str(save / "checkpoint.pth"), "--csv", str(tmp_path / "p.csv")])
    assert code == 130 and err.strip() == f"interrupted: the rows so far are in {tmp_path / 'p.csv'}.partial"
    assert (tmp_path / "p.csv").read_text() == "the previous answers\n"
    assert len(_csv_rows(tmp_path / "p.csv.partial")) == 1 + 32


def test_an_unreadable_photo_is_a_csv_row_with_its_error(tiny_run, tmp_path):
    data, save = tiny_run
    folder = _photo_folder(data, tmp_path / "photos", ["a.png", "c.png"])
    truncated_jpeg(os.path.join(folder, "b.jpg"))
    code, _, err = _main(predict, [folder, str(save / "checkpoint.pth"), "--csv", str(tmp_path / "p.csv")])
    assert code == 1 and "2 photos predicted, 1 unreadable" in err
    rows = _csv_rows(tmp_path / "p.csv")[1:]
    assert [os.path.basename(r[0]) for r in rows] == ["a.png", "b.jpg", "c.png"]
    assert rows[0][-1] == rows[2][-1] == "" and rows[0][2] and rows[1][-1].startswith(os.path.join(folder, "b.jpg"))
    _photo_folder(data, tmp_path / "bad", [])
    truncated_jpeg(tmp_path / "bad" / "x.jpg")  # nothing predicted: exit 2, the file still says why
    code, _, _ = _main(predict, [str(tmp_path / "bad"), str(save / "checkpoint.pth"), "--csv", str(tmp_path / "q.csv")])
    assert code == 2 and len(_csv_rows(tmp_path / "q.csv")) == 2


def test_csv_cells_keep_hostile_text_and_never_start_a_formula(tiny_run, tmp_path, monkeypatch):
    data, save = tiny_run
    hostile = ['=HYPERLINK("x","y").png', '+1,2.png', '-3.png', '@SUM(A1).png', '\tx.png',
               'a "quoted",\nnew line\r\x1b[2J\x07.png', 'plain.png']
    _photo_folder(data, tmp_path / "photos", hostile)
    os.mkdir(tmp_path / "photos" / "odd")
    with open(os.path.join(os.fsencode(tmp_path / "photos" / "odd"), b"\xff\xfe.png"), "wb") as f:
        f.write(open(an_image(data), "rb").read())  # a name that is not UTF-8
    (tmp_path / "names.json").write_text(json.dumps({"1": "=cmd|' /C calc'!A0", "2": "-2", "3": "x\ny"}))
    monkeypatch.chdir(tmp_path / "photos")  # relative paths: the path cell itself can start with =
    code, _, err = _main(predict, ["--top_k", "3", "--category_names", str(tmp_path / "names.json"), "--csv", "p.csv",
                                   "--", *hostile, "odd", str(save / "checkpoint.pth")])
    assert code == 0, err
    rows = _csv_rows("p.csv")[1:]
    assert [r[0] for r in rows] == [("'" + h if h[0] in "=+-@\t" else h) for h in hostile] + ["odd/\\udcff\\udcfe.png"]
    names = {r[i] for r in rows for i in (3, 6, 9)}
    assert names == {"'=cmd|' /C calc'!A0", "'-2", "x\ny"}
    assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for r in rows for cell in r)


def test_csv_refuses_a_folder_the_checkpoint_or_json_too(tiny_run, tmp_path):
    data, save = tiny_run
    ckpt = str(save / "checkpoint.pth")
    assert "is a folder" in one_error_line(*_main(predict, [an_image(data), ckpt, "--csv", str(tmp_path)])[::2])
    line = one_error_line(*_main(predict, [an_image(data), ckpt, "--csv", f"{tmp_path}/new/"])[::2])
    assert line == f"error: --csv {tmp_path}/new/ is a folder; give a file name such as {tmp_path}/new/preds.csv"
    line = one_error_line(*_main(predict, [an_image(data), ckpt, "--csv", ckpt])[::2])
    assert line == f"error: --csv {ckpt} is {ckpt}, one of the inputs; give another file name"
    assert "not allowed with argument" in _main(predict, [an_image(data), ckpt, "--csv", "x.csv", "--json"])[2]
    names = tmp_path / "names.json"
    names.write_text('{"1": "one"}')
    line = one_error_line(*_main(predict, [an_image(data), ckpt, "--category_names", str(names), "--csv", str(names)])
                          [::2])
    assert line == f"error: --csv {names} is {names}, one of the inputs; give another file name"
    assert names.read_text() == '{"1": "one"}'
    out = str(tmp_path / "p.png")
    assert one_error_line(*_main(predict, [an_image(data), ckpt, "--csv", out, "--plot", out])[::2]) == \
        f"error: --csv and --plot both name {out}; give each its own file"


def test_csv_never_replaces_a_device_or_a_partial_file_it_did_not_write(tiny_run, tmp_path):
    data, save = tiny_run
    ckpt, out = str(save / "checkpoint.pth"), str(tmp_path / "p.csv")
    assert "would write a file named '-'" in one_error_line(*_main(predict, [an_image(data), ckpt, "--csv", "-"])[::2])
    os.mkfifo(tmp_path / "fifo")  # what /dev/stdout is under a pipe: the rename would have replaced it
    line = one_error_line(*_main(predict, [an_image(data), ckpt, "--csv", str(tmp_path / "fifo")])[::2])
    assert "is not a regular file" in line and (tmp_path / "fifo").is_fifo()
    (tmp_path / "mine.txt").write_text("someone's notes\n")
    for foreign in ("copy", "link"):
        if foreign == "copy":
            (tmp_path / "p.csv.partial").write_text("someone's notes\n")
        else:
            os.unlink(tmp_path / "p.csv.partial")
            os.symlink(tmp_path / "mine.txt", tmp_path / "p.csv.partial")
        line = one_error_line(*_main(predict, [an_image(data), ckpt, "--csv", out])[::2])
        assert "p.csv.partial exists and is not the rows of a stopped predict.py --csv" in line
        assert (tmp_path / "p.csv.partial").read_text() == "someone's notes\n" and not os.path.exists(out)
    os.unlink(tmp_path / "p.csv.partial")
    (tmp_path / "p.csv.partial").write_text(",".join(csv_header(5)) + "\nhalf a row")  # a stopped run's
    code, _, err = _main(predict, [an_image(data), ckpt, "--csv", out])
    assert code == 0, err
    assert len(_csv_rows(out)) == 2 and not os.path.exists(tmp_path / "p.csv.partial")
    assert (tmp_path / "mine.txt").read_text() == "someone's notes\n"


def test_csv_stopped_before_its_first_row_points_at_no_partial_file(tiny_run, tmp_path, monkeypatch):
    from flowerclf.serving.predictor import Predictor
    data, save = tiny_run

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the model loads
    monkeypatch.setattr(Predictor, "load", stopped)
    code, _, err = _main(predict, [an_image(data), str(save / "checkpoint.pth"), "--csv", str(tmp_path / "p.csv")])
    assert code == 130 and err.strip() == "interrupted" and not os.listdir(tmp_path)
