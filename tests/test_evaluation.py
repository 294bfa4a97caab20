"""Evaluation: metrics by hand, the confusion matrix figure, training's outputs, evaluate.py."""
import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, make_image_folder, one_error_line
from conftest import run_script as _main
from PIL import Image

import audit as audit_script
import evaluate
import train
from flowerclf.base.runfiles import RunFiles
from flowerclf.evaluation import evaluate as evaluation_module
from flowerclf.evaluation import evaluate as library
from flowerclf.features.passes import FeaturePass
from flowerclf.models.checkpoints import load_model
from flowerclf.evaluation import audit, calibration, duplicates
from flowerclf.evaluation.html import write_html_report
from flowerclf.evaluation.metrics import classification_report
from flowerclf.evaluation.plots import plot_confusion_matrix
from flowerclf.evaluation.reports import write_report
from flowerclf.training.loops import metrics_from_logits


def test_report_on_a_fixed_example_matches_a_hand_count():
    classes = ["a", "b", "c"]
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    logits = np.eye(3)[predicted] * 5.0
    r = classification_report(logits, labels, classes, {"a": "alpha"})
    # rows are the true class, columns the prediction, counted by hand
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["top1"] == pytest.approx(4 / 6)
    a, b, c = r["per_class"]
    assert a == {"class": "a", "name": "alpha", "precision": 1.0, "recall": pytest.approx(2 / 3),
                 "f1": pytest.approx(0.8), "support": 3}
    assert (b["precision"], b["recall"], b["support"]) == (0.5, 0.5, 2)
    assert (c["precision"], c["recall"], c["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert r["most_confused"] == [{"true": "alpha", "predicted": "b", "count": 1},
                                  {"true": "b", "predicted": "c", "count": 1}]


def test_the_report_shows_balanced_accuracy_next_to_top1_and_each_class_support(tmp_path):
    labels = np.array([0, 0, 0, 1, 1, 2])
    logits = np.eye(3)[[0, 0, 1, 1, 2, 2]] * 5.0
    r = classification_report(logits, labels, ["a", "b", "c"])
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)  # the mean of the recalls
    m = metrics_from_logits(torch.tensor(logits), torch.tensor(labels))
    assert m["balanced"] == pytest.approx(r["balanced_accuracy"]) and m["acc"] == pytest.approx(4 / 6)
    # classes the split lacks do not count: 3 of class 0, all right, and none of 1 or 2
    assert classification_report(np.eye(3)[[0, 0, 0]], np.array([0, 0, 0]), ["a", "b", "c"])[
        "balanced_accuracy"] == 1.0
    page = open(write_html_report(str(tmp_path), "test", r, {}, {}, {})).read()
    stats = page[page.index('<div class="stats">'):page.index("</header>")]
    assert stats.index("top-1 <b>66.67%</b>") < stats.index("balanced accuracy <b>72.22%</b>") < stats.index("top-3")
    assert '<th>support</th>' in page and '<td class="num" data-value="3">3</td>' in page


def test_a_report_over_100000_classes_counts_only_what_the_split_holds(tmp_path):
    n, rng = 100_000, np.random.default_rng(0)
    labels = np.array([5, 5, 70_000, 99_999, 12])
    logits = rng.normal(0, 1, (len(labels), n)).astype(np.float32)
    logits[np.arange(5), [5, 70_000, 70_000, 99_999, 3]] = 50.0  # one 5 taken for 70000, the 12 for 3
    classes = [str(i) for i in range(n)]
    r = classification_report(logits, labels, classes)  # a dense matrix would be 74.5 GiB
    assert r["confusion_classes"] == ["3", "5", "12", "70000", "99999"]
    assert r["confusion_matrix"] == [[0, 0, 0, 0, 0], [0, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 1, 0],
                                     [0, 0, 0, 0, 1]]
    assert r["most_confused"] == [{"true": "5", "predicted": "70000", "count": 1},
                                  {"true": "12", "predicted": "3", "count": 1}]
    assert r["per_class"][5]["recall"] == 0.5 and r["per_class"][70_000]["precision"] == 0.5
    assert write_report(r, RunFiles(str(tmp_path))) == [str(tmp_path / "test_report.json"),
                                                        str(tmp_path / "confusion_matrix.png")]
    wide = np.eye(400, dtype=np.float32) * 5  # 400 classes in the split: no matrix at all
    r = classification_report(np.pad(wide, ((0, 0), (0, 600))), np.arange(400), classes[:1000])
    assert r["confusion_matrix"] is None and r["top1"] == 1.0
    assert write_report(r, RunFiles(str(tmp_path / "wide"))) == [str(tmp_path / "wide" / "test_report.json")]


def test_confusion_matrix_stays_readable_with_102_classes(tmp_path):
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 5, (102, 102))
    path = tmp_path / "cm.png"
    plot_confusion_matrix(cm, [f"flower {i}" for i in range(102)], str(path))
    w, h = Image.open(path).size
    assert 2000 <= w <= 4000 and 2000 <= h <= 4000


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    data = make_image_folder(tmp / "data")
    names = tmp / "names.json"
    names.write_text(json.dumps({"1": "pink primrose", "2": "globe thistle", "3": "blanket flower"}))
    save = tmp / "save"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main([data, "--arch", "mobilenet_v3_small", "--weights", "none", "--epochs", "2",
                           "--save_dir", str(save), "--category_names", str(names), "--batch_size", "8"]) == 0
    return data, save, names, out.getvalue()


def test_training_writes_every_output(run):
    _, save, _, printed = run
    for name in ("history.json", "history.csv", "training_curves.png", "test_report.json", "confusion_matrix.png"):
        assert (save / name).is_file(), name
    history = json.loads((save / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert set(history[0]) == {"epoch", "train_loss", "valid_loss", "valid_acc", "seconds", "lr"}
    assert (save / "history.csv").read_text().splitlines()[0] == "epoch,train_loss,valid_loss,valid_acc,seconds,lr"
    assert Image.open(save / "training_curves.png").size == (1000, 400)
    w, h = Image.open(save / "confusion_matrix.png").size
    assert 300 <= w <= 1000 and 300 <= h <= 1000
    rep = json.loads((save / "test_report.json").read_text())
    assert f"top-1 {100 * rep['top1']:.2f}%" in printed  # the file and the printed line agree
    assert [c["name"] for c in rep["per_class"]] == ["pink primrose", "globe thistle", "blanket flower"]
    assert sum(c["support"] for c in rep["per_class"]) == rep["images"] == 9
    assert np.array(rep["confusion_matrix"]).sum() == 9
    assert "calibration on valid: temperature" in printed and "calibration on test: temperature" in printed
    assert Image.open(save / "reliability.png").size == (1000, 450)
    page = (save / "report.html").read_text()
    assert "Reliability diagram" in page and "reliability.png" in page and "calibration (test)" in page


def test_evaluate_agrees_with_training(run, tmp_path, capsys):
    data, save, names, printed = run
    trained = json.loads((save / "test_report.json").read_text())
    assert evaluate.main([str(save / "checkpoint.pth"), os.path.join(data, "test"), "--out", str(tmp_path),
                          "--category_names", str(names), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["top1"] == trained["top1"] and again["confusion_matrix"] == trained["confusion_matrix"]
    assert (tmp_path / "eval_test_report.json").is_file() and (tmp_path / "eval_test_confusion_matrix.png").is_file()
    assert evaluate.main([str(save / "checkpoint.pth"), os.path.join(data, "valid"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "eval_valid_report.json").is_file()
    assert (tmp_path / "eval_test_reliability.png").is_file() and (tmp_path / "eval_valid_reliability.png").is_file()
    assert "calibration (valid)" in (tmp_path / "eval_valid_report.html").read_text()


def test_evaluate_bad_split_is_one_line(run, tmp_path, capsys):
    _, save, _, _ = run
    assert evaluate.main([str(save / "checkpoint.pth"), str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_metrics_from_logits():
    logits = torch.tensor([[3.0, 2, 1, 0, -1, -2], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    m = metrics_from_logits(logits, torch.tensor([0, 0, 5]))
    assert m["acc"] == pytest.approx(1 / 3)
    assert m["top5"] == pytest.approx(1 / 3)  # only the first is in its top 5


@pytest.mark.parametrize("inside", ["out", "1/out"])
def test_evaluate_refuses_an_out_inside_the_split_it_reads(run, inside, monkeypatch):
    data, save, _, _ = run
    split = os.path.join(data, "test")
    monkeypatch.setattr(evaluation_module, "FeaturePass", None)  # refused before any work
    code, _, err = _main(evaluate, [str(save / "checkpoint.pth"), split, "--out", os.path.join(split, inside)])
    assert "is inside" in one_error_line(code, err) and "read back as photos" in err
    assert not os.path.exists(os.path.join(split, inside))


def test_evaluate_on_a_gpu_picks_its_own_engine_and_batch_size_for_a_cpu_trained_checkpoint(run, tmp_path,
                                                                                          monkeypatch):
    data, save, _, _ = run
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    ckpt["args"].update(engine="onnxruntime", feature_batch_size=8)  # what a CPU's run records
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    save = tmp_path
    # a CUDA machine, as far as evaluate can tell: the device decision says cuda, the model stays on the CPU
    monkeypatch.setattr(library, "resolve_device", lambda name, gpu: torch.device("cuda"))
    monkeypatch.setattr(library, "load_model", lambda path, dev: load_model(path, torch.device("cpu")))
    monkeypatch.setattr(library, "enable_cudnn_autotune", lambda dev: None)
    seen = {}

    def stop(self, images, desc, *a):
        seen.update(engine=self.engine, key=self.setup_key, batch=self.batch_size)
        raise KeyboardInterrupt  # the pass itself would need the GPU
    monkeypatch.setattr(FeaturePass, "features", stop)
    with pytest.raises(KeyboardInterrupt):
        library.evaluate_split(str(save / "checkpoint.pth"), os.path.join(data, "test"), log=print)
    assert seen["engine"] == "torch" and seen["batch"] == 128  # not "onnxruntime runs on the CPU", nor 8
    assert seen["key"]["engine"] == "torch" and seen["key"]["device"] == "cuda"  # stored as a GPU run's
    with pytest.raises(KeyboardInterrupt):
        library.evaluate_split(str(save / "checkpoint.pth"), os.path.join(data, "test"), batch_size=32)
    assert seen["batch"] == 32


def _overconfident(seed, n=4000, classes=5):
    """Logits of a head 10x too sure of itself: labels drawn from softmax(true logits), the head shows 10x them."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0, 1.5, (n, classes))
    p = calibration.softmax(true)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return 10 * true, labels


def test_temperature_scaling_lowers_nll_of_an_overconfident_head_on_held_out_data():
    fit_logits, fit_labels = _overconfident(0)
    held_logits, held_labels = _overconfident(1)
    t = calibration.fit_temperature(fit_logits, fit_labels)
    assert 8 < t < 12  # it finds the factor the head is over-confident by
    summary = calibration.calibration_summary(held_logits, held_labels, t)
    assert summary["nll_after"] < 0.5 * summary["nll_before"]
    assert summary["ece_after"] < 0.03 < 0.2 < summary["ece_before"]
    assert calibration.fit_temperature(held_logits / t, held_labels) == pytest.approx(1, abs=0.15)


def test_a_calibrated_head_keeps_temperature_one():
    logits, labels = _overconfident(2)
    logits = logits / 10  # calibrated by construction
    assert calibration.fit_temperature(logits, labels) == pytest.approx(1, abs=0.1)


@pytest.mark.parametrize("keep", [0.95, 0.8, 0.5])
def test_the_threshold_keeps_the_stated_share_of_the_right_answers(keep):
    logits, labels = _overconfident(3, n=997)
    probs = calibration.softmax(logits, 10)
    threshold = calibration.confidence_threshold(probs, labels, keep)
    conf, right = probs.max(axis=1), probs.argmax(axis=1) == labels
    kept = (conf[right] >= threshold).mean()
    assert keep <= kept < keep + 2 / right.sum()  # the stated share, not more than one answer over
    assert calibration.confidence_threshold(probs[~right], labels[~right], keep) == 0.0  # no right answer: no mark


def test_ece_of_a_hand_made_example():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bin 0.9: confidence 0.9, accuracy 0.5; bin 0.6: confidence 0.6, accuracy 1.0; each half the photos
    assert calibration.expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    bins = calibration.reliability_bins(probs, labels)
    assert [(b["count"], b["accuracy"]) for b in bins] == [(2, 1.0), (2, 0.5)]


def _planted(seed=0, classes=5, per_class=60, flipped=15):
    """Synthetic features of well-separated classes with `flipped` labels moved to another class, seeded."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    x = rng.normal(0, 1, (classes, 64))[labels] + rng.normal(0, 0.5, (len(labels), 64))
    moved = rng.choice(len(labels), flipped, replace=False)
    given = labels.copy()
    given[moved] = (labels[moved] + rng.integers(1, classes, flipped)) % classes
    return x, given, set(moved.tolist())


def test_the_audit_finds_planted_label_errors():
    x, given, moved = _planted()
    probs, _, _ = audit.chosen_probabilities(x, given, 5)
    suspects = audit.label_suspects(probs, given)
    top = set(suspects[:2 * len(moved)])
    assert len(top & moved) >= 0.8 * len(moved)  # nearly all, within the top 2x planted
    assert len(set(suspects) & moved) >= 0.8 * len(suspects)  # and few others
    assert audit.label_suspects(probs, np.zeros(len(given), int)) == []  # one class: nothing to say


def test_the_heads_weight_decay_is_the_one_with_the_least_held_out_log_loss(monkeypatch):
    raw, given, _ = _planted()
    probs, wd, loss = audit.chosen_probabilities(raw, given, 5, weight_decays=(100.0, 0.1))
    assert wd == 0.1  # 100 flattens every head towards 1/5 on each class, a log loss near log 5
    x = audit.head_inputs(raw)  # what the heads see: the signed square roots
    np.testing.assert_allclose(x ** 2 * np.sign(x), raw)
    np.testing.assert_allclose(probs, audit.out_of_fold_probabilities(x, given, 5, weight_decay=0.1))
    flat = audit.out_of_fold_probabilities(x, given, 5, weight_decay=100.0)
    assert loss == audit.log_loss(probs, given) < audit.log_loss(flat, given) < np.log(5) + 1e-6
    tried, fit = [], audit.held_out_probabilities
    monkeypatch.setattr(audit, "held_out_probabilities", lambda *a: tried.append(a[-1]) or fit(*a))
    assert audit.chosen_probabilities(raw, given, 5, weight_decays=(0.1, 100.0, 0.3))[1] == 0.1
    assert tried == [0.1, 100.0] + [0.1] * 4  # the first fold chooses, and stops where the loss rose
    monkeypatch.undo()
    entries = [{"path": f"p{i}.png", "split": "train", "class": str(c)} for i, c in enumerate(given)]
    result = audit.audit(entries, raw, given, [str(c) for c in range(5)], store=_FakeStore())
    assert result["weight_decay"] in audit.WEIGHT_DECAYS and result["log_loss"] == pytest.approx(audit.log_loss(
        audit.out_of_fold_probabilities(x, given, 5, weight_decay=result["weight_decay"]), given), abs=1e-4)


def test_the_heads_leave_torchs_random_stream_as_it_was():
    x, given, _ = _planted()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    audit.chosen_probabilities(x, given, 5)  # after a run's epochs: an audit or not, the run draws the same
    assert torch.equal(torch.rand(3), expected)


class _FakeStore:
    """A store whose every photo has its own content hash."""

    def digests(self, paths):
        return [p.encode() for p in paths]


def test_audit_py_audits_a_folder_alone_and_its_bad_flags_are_one_line(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class={"train": 10, "valid": 4, "test": 3})
    moved = os.path.join(data, "train", "2", "1_moved.png")  # a photo of class 1 filed under 2
    shutil.move(os.path.join(data, "train", "1", "1_9.png"), moved)
    shutil.copy(os.path.join(data, "train", "2", "2_0.png"), os.path.join(data, "test", "2", "2_leak.png"))
    save = tmp_path / "out"
    lite0 = ["--arch", "efficientnet_lite0"]  # offline pretrained: features worth auditing
    code, out, err = _main(audit_script, [data, "--save_dir", str(save)] + lite0)
    assert code == 0, err
    result = json.loads((save / "audit.json").read_text())
    suspects = [os.path.basename(s["path"]) for s in result["suspects"]]
    assert "1_moved.png" in suspects[:4] and result["audited"] == 42
    assert result["duplicates"]["counts"]["test_in_train"] == 1
    lines = out.strip().splitlines()
    assert "features train: 0 cached, 30 computed" in lines
    assert lines[-1] == (f"audit: {len(suspects)} train/valid photos look mislabeled, "
                         f"{result['duplicates']['counts']['across_classes']} duplicates across classes, 1 test "
                         f"photos also in train; see {save / 'audit.json'}")
    code, out, err = _main(audit_script, [data, "--save_dir", str(save)] + lite0)  # the store has them all now
    assert code == 0 and "features train: 30 cached, 0 computed" in out.splitlines(), err
    again = json.loads((save / "audit.json").read_text())
    assert again["suspects"] == result["suspects"] and again["reused"] and not result["reused"]

    for argv, says in [([data, "--arch", "resnet5"], "unknown --arch 'resnet5'"),
                       ([data, "--arch", "efficientnet_lite0", "resnet5"], "unknown --arch 'resnet5'"),
                       ([data, "--arch", "efficientnet_lite0", "efficientnet_lite0"], "names efficientnet_lite0 twice"),
                       ([data, "--arch", "efficientnet_lite0", "efficientnet_lite2", "--weights", "DEFAULT",
                         "DEFAULT", "none"], "--weights: give one for every --arch (2) or one for all, not 3"),
                       ([str(tmp_path / "none")], "does not exist"),
                       ([data, "--save_dir", os.path.join(data, "train", "x")], "is inside"),
                       ([data, "--valid_split", "2"], "--valid_split must be in [0, 1)"),
                       ([data, "--num_workers", "many"], "--num_workers")]:
        code, out, err = _main(audit_script, argv)
        assert says in one_error_line(code, err), argv
    assert not (tmp_path / "data" / "train" / "x").exists()


@pytest.mark.slow
def test_audit_py_averages_two_backbones_heads(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class={"train": 10, "valid": 4, "test": 3})
    shutil.move(os.path.join(data, "train", "1", "1_9.png"), os.path.join(data, "train", "2", "1_moved.png"))
    save, lite0 = tmp_path / "out", ["--arch", "efficientnet_lite0"]
    assert _main(audit_script, [data, "--save_dir", str(save)] + lite0)[0] == 0
    one = json.loads((save / "audit.json").read_text())
    # lite0's features from the store, lite2's computed; their heads averaged, copies looked for by lite0's
    code, out, err = _main(audit_script, [data, "--save_dir", str(save), "--arch", "efficientnet_lite0",
                                          "efficientnet_lite2", "--weights", "DEFAULT"])
    assert code == 0, err
    both = json.loads((save / "audit.json").read_text())
    assert not both["reused"] and len(both["weight_decay"]) == 2 and both["duplicates"] == one["duplicates"]
    assert both["log_loss"] != one["log_loss"]
    assert "1_moved.png" in [os.path.basename(s["path"]) for s in both["suspects"]][:4]
    assert "features train: 30 cached, 0 computed" in out.splitlines()
    assert "features train: 0 cached, 30 computed" in out.splitlines()


@pytest.mark.slow
def test_predict_never_imports_the_audit(tiny_run):
    import subprocess
    import sys

    data, save = tiny_run
    argv = [os.path.join(data, "test", "1", "1_0.png"), str(save / "checkpoint.pth")]
    code = (f"import sys, predict\nassert predict.main({argv!r}) == 0\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('cleanlab', 'faiss', 'sklearn')\n"
            "             or m in ('flowerclf.evaluation.audit', 'flowerclf.evaluation.duplicates'))\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def _photo(path, pixels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return str(path)


def test_exact_copies_across_classes_and_splits_and_a_resized_reencoded_copy_are_reported(tmp_path):
    from flowerclf.features.store import file_digest, open_store

    rng = np.random.default_rng(0)
    noise = lambda: rng.integers(0, 256, (32, 32, 3))  # noqa: E731
    ramp = np.linspace(0, 255, 64)[None, :, None] * np.ones((64, 1, 3))
    a, b, c = (_photo(tmp_path / "train" / "1" / f"{n}.png", noise()) for n in "abc")
    os.makedirs(tmp_path / "train" / "2")
    shutil.copy(a, tmp_path / "train" / "2" / "a_copy.png")
    os.makedirs(tmp_path / "test" / "1")
    shutil.copy(b, tmp_path / "test" / "1" / "b_leak.png")
    ramp_path = _photo(tmp_path / "train" / "2" / "ramp.png", ramp)
    small = tmp_path / "valid" / "2" / "ramp_small.jpg"
    os.makedirs(small.parent)
    Image.open(ramp_path).resize((40, 40)).save(small, quality=70)
    paths = [a, b, c, str(tmp_path / "train" / "2" / "a_copy.png"), str(tmp_path / "test" / "1" / "b_leak.png"),
             ramp_path, str(small)]
    entries = [{"path": p, "split": p.split(os.sep)[-3], "class": p.split(os.sep)[-2]} for p in paths]
    vectors = rng.normal(0, 1, (7, 16))
    vectors[3], vectors[4], vectors[6] = vectors[0], vectors[1], vectors[5] + 0.1 * rng.normal(0, 1, 16)

    store = open_store(print, str(tmp_path / "store.sqlite"))  # a store that holds no hash of these files yet
    digests = duplicates.content_digests(paths, store)
    store.close()
    assert digests == [file_digest(p) for p in paths] == duplicates.content_digests(paths)
    report = duplicates.duplicates_report(entries, digests, vectors)
    kinds = {tuple(sorted(os.path.basename(p["path"]) for p in g["photos"])): g["kind"] for g in report["exact"]}
    assert kinds == {("a.png", "a_copy.png"): "conflict", ("b.png", "b_leak.png"): "leak"}
    assert [sorted(os.path.basename(p["path"]) for p in g["photos"]) for g in report["near"]] == \
        [["ramp.png", "ramp_small.jpg"]]
    assert report["near"][0]["kind"] == "leak" and report["near"][0]["thumbnail"] >= duplicates.SAME_PICTURE
    assert report["counts"] == {"exact_groups": 2, "near_pairs": 1, "within_class": 0, "across_classes": 1,
                                "valid_in_train": 1, "test_in_train": 1}
    # a distinct picture near in features is not a copy: its thumbnail tells them apart
    vectors[2] = vectors[0] + 0.01
    assert len(duplicates.duplicates_report(entries, digests, vectors)["near"]) == 1


def test_a_mirrored_copy_is_a_near_duplicate_and_a_different_picture_is_not(tmp_path):
    rng = np.random.default_rng(1)
    scene = np.clip(np.linspace(0, 255, 48)[None, :, None] + rng.normal(0, 30, (48, 48, 3)), 0, 255)
    original = _photo(tmp_path / "train" / "1" / "scene.png", scene)
    mirrored = _photo(tmp_path / "test" / "1" / "scene_mirrored.png", scene[:, ::-1])
    other = _photo(tmp_path / "train" / "2" / "other.png", rng.integers(0, 256, (48, 48, 3)))
    entries = [{"path": p, "split": p.split(os.sep)[-3], "class": p.split(os.sep)[-2]}
               for p in (original, mirrored, other)]
    vectors = np.array([[1.0, 0.0], [0.99, 0.1], [0.98, -0.1]])  # all three near in features: thumbnails decide
    groups = duplicates.near_groups(entries, vectors, [b"a", b"b", b"c"])
    assert [sorted(os.path.basename(p["path"]) for p in g["photos"]) for g in groups] == \
        [["scene.png", "scene_mirrored.png"]]
    assert groups[0]["kind"] == "leak" and groups[0]["thumbnail"] >= duplicates.SAME_PICTURE


def test_nearest_pairs_on_inverted_lists_find_planted_copies(monkeypatch):
    monkeypatch.setattr(duplicates, "EXACT_UP_TO", 200)  # the index 100,000 photos get, on 2,000
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (2000, 32)).astype(np.float32)
    x[-20:] = x[:20] + 0.05 * rng.normal(0, 1, (20, 32))
    pairs = {(i, j) for i, j, _ in duplicates.nearest_pairs(x, 0.95)}
    assert {(i, 1980 + i) for i in range(20)} <= pairs


def test_a_run_without_test_reports_on_valid_and_says_so(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class={"train": 6, "valid": 3})
    code, out, err = _main(train, [data, "--save_dir", str(tmp_path / "s"), "--epochs", "1", "--no_audit"] + TINY)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-1] == f"report: {tmp_path / 's' / 'valid_report.html'}"
    assert any(line.startswith(f"no {os.path.join(data, 'test')}/ folder: the report is on valid/") for line in lines)
    page = (tmp_path / "s" / "valid_report.html").read_text()
    assert "no test/ folder, so this report is on valid/" in page
    assert json.loads((tmp_path / "s" / "valid_report.json").read_text())["images"] == 9
    assert (tmp_path / "s" / "valid_confusion_matrix.png").is_file()
