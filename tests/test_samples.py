"""`python data_utils.py flowers102 DIR` and `python data_utils.py demo DIR`."""
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image
from scipy.io import savemat

from flowerclf.data import samples
from flowerclf.data.folders import scan_data_dir

N_CLASSES = 102


def fake_flowers102(folder, per_class=4, seed=0):
    """jpg/image_XXXXX.jpg, imagelabels.mat and setid.mat shaped like the real files, tiny."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(1, N_CLASSES + 1), per_class)
    rng.shuffle(labels)
    os.makedirs(folder / "jpg")
    for i in range(1, len(labels) + 1):
        Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(folder / "jpg" / f"image_{i:05d}.jpg")
    savemat(folder / "imagelabels.mat", {"labels": labels[None, :].astype(np.uint8)})
    # official-style split: per class one train, one valid, the rest test
    setid = {"trnid": [], "valid": [], "tstid": []}
    for c in range(1, N_CLASSES + 1):
        ids = (np.flatnonzero(labels == c) + 1).tolist()
        setid["trnid"].append(ids[0])
        setid["valid"].append(ids[1])
        setid["tstid"] += ids[2:]
    savemat(folder / "setid.mat", {k: np.array(v, dtype=np.uint16)[None, :] for k, v in setid.items()})
    return labels


def _layout(dest):
    out = {}
    for split in ("train", "valid", "test"):
        out[split] = {os.path.join(c, f): c for c in os.listdir(dest / split) for f in os.listdir(dest / split / c)}
    return out


def test_official_layout(tmp_path):
    labels = fake_flowers102(tmp_path / "src")
    assert samples.main(["flowers102", str(tmp_path / "out"), "--source", str(tmp_path / "src")]) == 0
    layout = _layout(tmp_path / "out")
    names = json.load(open(os.path.join(ROOT, "cat_to_name.json")))
    for split, expected in (("train", 102), ("valid", 102), ("test", 2 * 102)):
        assert len(layout[split]) == expected
        assert set(layout[split].values()) == set(names)  # folders "1".."102", the keys of cat_to_name.json
    for split in layout:
        for path, cls in layout[split].items():
            image_id = int(os.path.basename(path)[6:11])
            assert labels[image_id - 1] == int(cls)
    files = [os.path.basename(p) for split in layout.values() for p in split]
    assert len(files) == len(set(files)) == len(labels)  # every image once, none in two splits
    first = next(iter(layout["train"]))  # linked, not copied, on a file system that allows it
    assert os.path.samefile(tmp_path / "out" / "train" / first, tmp_path / "src" / "jpg" / os.path.basename(first))


def test_percentage_split_is_stratified_and_seeded(tmp_path):
    fake_flowers102(tmp_path / "src", per_class=10)
    assert samples.main(["flowers102", str(tmp_path / "a"), "--source", str(tmp_path / "src"),
                    "--split", "80-10-10"]) == 0
    layout = _layout(tmp_path / "a")
    assert Counter(layout["train"].values()) == {str(c): 8 for c in range(1, 103)}
    assert Counter(layout["valid"].values()) == {str(c): 1 for c in range(1, 103)}
    assert Counter(layout["test"].values()) == {str(c): 1 for c in range(1, 103)}
    assert samples.main(["flowers102", str(tmp_path / "b"), "--source", str(tmp_path / "src"),
                    "--split", "80-10-10"]) == 0
    assert _layout(tmp_path / "b") == layout


def test_bad_split_is_a_usage_error(tmp_path, capsys):
    fake_flowers102(tmp_path / "src", per_class=2)
    assert samples.main(["flowers102", str(tmp_path / "o"), "--source", str(tmp_path / "src"),
                             "--split", "90-20"]) == 2
    assert "three percentages" in capsys.readouterr().err


def test_offline_without_files_fails_in_one_line(tmp_path, monkeypatch, capsys):
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", offline)  # what torchvision's downloader calls
    assert samples.main(["flowers102", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not download Oxford Flowers-102")
    assert "imagelabels.mat" in err[0] and "setid.mat" in err[0]


@pytest.mark.slow
def test_offline_subprocess_has_no_traceback(tmp_path):
    """On this network-less machine the real download fails: one line, exit 2."""
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "data_utils.py"), "flowers102", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: could not download Oxford Flowers-102")


def test_demo_set_trains_end_to_end(tmp_path):
    assert samples.main(["demo", str(tmp_path / "demo")]) == 0
    sets = scan_data_dir(tmp_path / "demo")
    assert {n: len(s) for n, s in sets.items()} == {"train": 80, "valid": 32, "test": 32}
    assert sorted(sets["train"].class_to_idx) == sorted(samples.DEMO_SHAPES)
    again = tmp_path / "again"
    samples.make_demo(again)
    a = np.asarray(Image.open(tmp_path / "demo" / "train" / "circle" / "circle_000.png"))
    b = np.asarray(Image.open(again / "train" / "circle" / "circle_000.png"))
    assert np.array_equal(a, b)  # seeded


@pytest.mark.parametrize("command", ["flowers102", "demo"])
@pytest.mark.slow
def test_data_help(command):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "data_utils.py"), command, "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "DIR" in out
