"""Bad input, crashes and hostile files: each failure is one clear line, nothing is lost."""
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import checkpoints
import data_utils as du
import predict
import schema
import train
import training
from errors import FlowerclfError
from conftest import ROOT, TINY, make_image_folder, run_script as _main


def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


# ------------------------------------------------------------------ data checks

def test_bad_files_stop_training_with_one_line_each(image_folder, tmp_path):
    bad = os.path.join(image_folder, "train", "1")
    open(os.path.join(bad, "zero.jpg"), "wb").close()
    with open(os.path.join(bad, "garbage.png"), "wb") as f:
        f.write(b"this is not a png")
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "s")] + TINY)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: 2 bad image file(s)") and "--skip_bad_images" in lines[0]
    assert any(line.endswith("zero.jpg is empty (0 bytes)") for line in lines)
    assert any("garbage.png is not an image" in line for line in lines)


def test_skip_bad_images_reports_and_trains(image_folder, tmp_path):
    _truncated_jpeg(tmp_path / "cut.jpg")
    os.rename(tmp_path / "cut.jpg", os.path.join(image_folder, "train", "2", "cut.jpg"))
    code, out, _ = _main(train, [image_folder, "--save_dir", str(tmp_path / "s"), "--epochs", "1",
                                 "--skip_bad_images"] + TINY)
    assert code == 0
    assert "warning: skipped" in out and "cut.jpg cannot be decoded" in out
    assert "18 train" in out  # the 6 x 3 good ones


def test_truncated_image_without_skip_names_the_file(image_folder, tmp_path):
    _truncated_jpeg(tmp_path / "cut.jpg")
    os.rename(tmp_path / "cut.jpg", os.path.join(image_folder, "valid", "3", "cut.jpg"))
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "s"), "--epochs", "1"] + TINY)
    assert code == 2 and err.count("\n") == 1 and "cut.jpg cannot be read" in err
    code, _, err = _main(train, [image_folder, "--check"])
    assert code == 2 and "cut.jpg cannot be decoded" in err


def test_decompression_bomb_is_refused(image_folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # our 16x16 images now count as bombs
    path = os.path.join(image_folder, "train", "1", "1_0.png")
    assert du.check_image(path, full=False) == "is too large to decode safely (over 100 pixels)"
    with pytest.raises(FlowerclfError, match="too large"):
        du.load_rgb(path)


def test_check_reports_structure_problems(tmp_path):
    root = make_image_folder(tmp_path / "d")
    code, out, _ = _main(train, [root, "--check"])
    assert code == 0 and out.strip() == f"{root}: 18 train, 9 valid, 9 test images, 3 classes, all readable"
    for f in os.listdir(os.path.join(root, "valid", "3")):
        os.remove(os.path.join(root, "valid", "3", f))
    code, out, _ = _main(train, [root, "--check"])
    assert code == 0 and "warning: valid/ has no images of classes ['3'] that train/ has" in out
    os.makedirs(os.path.join(root, "train", "4"))
    code, _, err = _main(train, [root, "--check"])
    assert code == 2 and "train/ class folders ['4'] have no images" in err


def test_valid_split_is_stratified_and_seeded(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"train": 10})
    code, _, err = _main(train, [root, "--check"])
    assert code == 2 and "--valid_split 0.2" in err
    sets = du.scan_data_dir(root, valid_split=0.2, seed=3)
    assert sorted(sets["valid"].labels) == [0, 0, 1, 1, 2, 2]
    assert len(sets["train"]) == 24 and not set(sets["train"].files) & set(sets["valid"].files)
    assert du.scan_data_dir(root, valid_split=0.2, seed=3)["valid"].files == sets["valid"].files
    assert du.scan_data_dir(root, valid_split=0.2, seed=4)["valid"].files != sets["valid"].files


# ------------------------------------------------------------------ every image mode, training and prediction

def _odd_images(folder):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("LA").save(folder / "la.png")
    base.convert("P").save(folder / "palette.png")
    base.convert("L").save(folder / "gray.jpg")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257).save(folder / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    base.save(folder / "exif.jpg", exif=exif)


def test_every_mode_trains_and_predicts(image_folder, tmp_path):
    _odd_images(tmp_path)
    for name in os.listdir(tmp_path):
        if name.endswith((".png", ".jpg")):
            os.link(tmp_path / name, os.path.join(image_folder, "train", "1", name))
    code, out, _ = _main(train, [image_folder, "--save_dir", str(tmp_path / "s"), "--epochs", "1"] + TINY)
    assert code == 0 and "25 train" in out
    odd = sorted(str(tmp_path / n) for n in os.listdir(tmp_path) if n.endswith((".png", ".jpg")))
    code, out, err = _main(predict, odd + [str(tmp_path / "s" / "checkpoint.pth"), "--json"])
    assert code == 0, err
    assert [r["image"] for r in json.loads(out)] == odd


# ------------------------------------------------------------------ checkpoints: kills, resume, Ctrl-C, NaN

def _wait_for(proc, text: bytes) -> None:
    """Read the process's output until `text`; fail (not hang) if it ends first."""
    for line in iter(proc.stdout.readline, b""):
        if text in line:
            return
    pytest.fail(f"the process ended (exit {proc.wait()}) before printing {text!r}")


def _train_cmd(data, save, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), data, "--save_dir", str(save)] + TINY + list(extra)


def test_sigkill_never_leaves_a_broken_checkpoint(image_folder, tmp_path):
    save = tmp_path / "s"
    subprocess.run(_train_cmd(image_folder, save, "--epochs", "2"), check=True, capture_output=True)
    rng = random.Random(0)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for _ in range(2):
        # a high learning rate keeps valid accuracy moving, so checkpoint.pth is rewritten now and then too
        proc = subprocess.Popen(_train_cmd(image_folder, save, "--epochs", "400", "--learning_rate", "0.05",
                                           "--resume"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        _wait_for(proc, b"epoch ")  # the epochs, and their saves, have begun
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        code, out, err = _main(predict, [os.path.join(image_folder, "test", "1", "1_0.png"),
                                         str(save / "checkpoint.pth"), "--json"])
        assert code == 0, err
        assert len(json.loads(out)[0]["predictions"]) == 3
        assert torch.load(save / "checkpoint_last.pth", weights_only=True)["epoch"] >= 1


def test_resume_after_a_kill_matches_an_uninterrupted_run(image_folder, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_train_cmd(image_folder, full, "--epochs", "40"), check=True, capture_output=True)
    proc = subprocess.Popen(_train_cmd(image_folder, cut, "--epochs", "40"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    _wait_for(proc, b"epoch 5/")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped = torch.load(cut / "checkpoint_last.pth", weights_only=True)["epoch"]
    assert 4 <= stopped < 40  # the kill may land before epoch 5 was saved
    run = subprocess.run(_train_cmd(image_folder, cut, "--epochs", "40", "--resume"), capture_output=True,
                         text=True, check=True)
    assert f"resuming after epoch {stopped}" in run.stdout
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(cut / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] and a["history"][-1]["valid_loss"] == b["history"][-1]["valid_loss"]
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def test_finetune_resume_restores_optimizer_schedule_and_random_streams(image_folder, tmp_path, monkeypatch):
    base = training.TrainConfig(data_dir=image_folder, arch="mobilenet_v3_small", weights="none", hidden_units=[8],
                              batch_size=6, epochs=3, unfreeze=1)
    training.train(replace_cfg(base, save_dir=str(tmp_path / "full")), log=lambda s: None)

    real = training.format_epoch

    def interrupt_at_2(epoch, *a):
        if epoch == 2:
            raise KeyboardInterrupt  # after epoch 2's training, before its checkpoints
        return real(epoch, *a)
    monkeypatch.setattr(training, "format_epoch", interrupt_at_2)
    with pytest.raises(KeyboardInterrupt):
        training.train(replace_cfg(base, save_dir=str(tmp_path / "cut")), log=lambda s: None)
    monkeypatch.setattr(training, "format_epoch", real)
    training.train(replace_cfg(base, save_dir=str(tmp_path / "cut"), resume=True), log=lambda s: None)
    a = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def replace_cfg(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_resume_refuses_other_classes(image_folder, tmp_path):
    save = tmp_path / "s"
    assert _main(train, [image_folder, "--save_dir", str(save), "--epochs", "1"] + TINY)[0] == 0
    other = make_image_folder(tmp_path / "other", classes=("a", "b", "c"))
    code, _, err = _main(train, [other, "--save_dir", str(save), "--epochs", "2", "--resume"] + TINY)
    assert code == 2 and "was made for classes ['1', '2', '3']" in err
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "none"), "--resume"] + TINY)
    assert code == 2 and "checkpoint_last.pth does not exist" in err
    code, _, err = _main(predict, [os.path.join(image_folder, "test", "1", "1_0.png"),
                                   str(save / "checkpoint_last.pth")])
    assert code == 2 and "use checkpoint.pth" in err


def test_ctrl_c_exits_cleanly_and_keeps_checkpoints(image_folder, tmp_path):
    save = tmp_path / "s"
    proc = subprocess.Popen(_train_cmd(image_folder, save, "--epochs", "100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    _wait_for(proc, b"epoch 3/")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert b"Traceback" not in err and b"--resume" in err
    checkpoints.load_model(str(save / "checkpoint.pth"))
    assert torch.load(save / "checkpoint_last.pth", weights_only=True)["epoch"] >= 2


def test_nan_loss_stops_and_keeps_the_best_checkpoint(image_folder, tmp_path, monkeypatch):
    real = training.train_head_epoch
    calls = []

    def poisoned(head, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                head[-1].weight.fill_(float("nan"))
        return real(head, *a, **k)
    monkeypatch.setattr(training, "train_head_epoch", poisoned)
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path), "--epochs", "5", "--dropout", "0"]
                         + TINY)
    assert code == 2 and err.count("\n") == 1
    assert "the training loss became nan" in err and "(epoch 3)" in err and "keeps epoch" in err
    model, ckpt = checkpoints.load_model(str(tmp_path / "checkpoint.pth"))
    assert ckpt["epoch"] in (1, 2)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# ------------------------------------------------------------------ loading

def test_other_version_is_refused(tmp_path):
    path = tmp_path / "future.pth"
    torch.save({"format": schema.CHECKPOINT_FORMAT, "version": 99}, path)
    with pytest.raises(FlowerclfError, match="version 99"):
        checkpoints.read_checkpoint(str(path))


def test_classic_checkpoint_predicts(image_folder, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None)
    model.fc = nn.Sequential(OrderedDict([("fc1", nn.Linear(512, 32)), ("relu", nn.ReLU()),
                                          ("drop", nn.Dropout(0.2)), ("fc2", nn.Linear(32, 3)),
                                          ("output", nn.LogSoftmax(dim=1))]))
    path = tmp_path / "classic.pth"
    torch.save({"arch": "resnet18", "hidden_units": 32, "state_dict": model.state_dict(),
                "class_to_idx": {"1": 0, "2": 1, "3": 2}}, path)
    image = os.path.join(image_folder, "test", "2", "2_0.png")
    code, out, err = _main(predict, [image, str(path), "--json"])
    assert code == 0, err
    probs = {p["class"]: p["probability"] for p in json.loads(out)[0]["predictions"]}
    x = torch.from_numpy(du.preprocess_image(du.load_rgb(image), du.Preprocess()))[None]
    with torch.inference_mode():
        expected = model.eval()(x).exp()[0]
    for cls, i in {"1": 0, "2": 1, "3": 2}.items():
        assert probs[cls] == pytest.approx(expected[i].item(), abs=1e-5)


# ------------------------------------------------------------------ prediction streams

_PEAK_RSS = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import data_utils as du
from inference import Predictor
predictor = Predictor(lambda batch: np.full((len(batch), 3), 1 / 3), ["1", "2", "3"], du.Preprocess())
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
    from inference import Predictor

    colours = {"red": (220, 40, 40), "green": (40, 200, 60)}
    batches, decoded = [], []

    def probabilities(batch):
        batches.append(len(batch))
        red = (batch[:, 0].mean(axis=(1, 2)) > batch[:, 1].mean(axis=(1, 2))).astype(np.float64)
        return np.stack([red, 1 - red], axis=1)

    def load(name):
        decoded.append(name)
        if name.startswith("bad"):
            return du.load_rgb(io.BytesIO(b"not an image"), name)
        return Image.new("RGB", (20, 20), colours[name.rstrip("0123456789")])

    names = ["red0", "bad1", "green2", "red3", "bad4", "green5", "red6"]
    predictor = Predictor(probabilities, ["r", "g"], du.Preprocess(resize_size=16, crop_size=16), batch_size=2)
    stream = predictor.iter_predict(((n, lambda n=n: load(n)) for n in names), 1)
    first = next(stream)  # the first batch is answered before the later images are even decoded
    assert first["image"] == "red0" and first["predictions"][0]["class"] == "r"
    assert batches == [2] and decoded == names[:3]
    items = [first, *stream]
    assert [item["image"] for item in items] == names and batches == [2, 2, 1]
    assert [item.get("error", item.get("predictions", [{}])[0].get("class")) for item in items] == \
        ["r", "bad1 is not an image PIL can read", "g", "r", "bad4 is not an image PIL can read", "g", "r"]
    results, errors = predictor.predict_bytes([], 1)
    assert results == [] and errors == []
