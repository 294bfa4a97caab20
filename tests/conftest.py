"""Shared fixtures: tiny synthetic ImageFolder trees made on the fly."""
from __future__ import annotations

import contextlib
import io
import os
import sys

# One intra-op thread for every test and every process a test starts (read when numpy and torch load): the tiny
# models gain nothing from more, and extra threads waiting on each other tripled the suite's CPU time.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a tiny untrained backbone on the torch engine: train.py flags for tests that only need a model
TINY = ["--arch", "mobilenet_v3_small", "--weights", "none", "--hidden_units", "8", "--batch_size", "6",
        "--engine", "torch"]

# One clearly different colour per class, so even a random backbone separates them.
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 220, 40), (200, 60, 220)]


def make_image_folder(root, classes=("1", "2", "3"), per_class=None, size=16, seed=0):
    """Write root/{train,valid,test}/CLASS/*.png with noisy solid colours; return root."""
    per_class = per_class or {"train": 6, "valid": 3, "test": 3}
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c, cls in enumerate(classes):
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                base = np.array(COLOURS[c % len(COLOURS)], dtype=np.float64)
                pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(os.path.join(folder, f"{cls}_{i}.png"))
    return str(root)


def one_error_line(code, err, expected_code=2) -> str:
    """The single `error: ...` line a failing script printed (asserted), with its exit code."""
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


def an_image(data) -> str:
    """One test photo of a make_image_folder tree."""
    return os.path.join(data, "test", "1", "1_0.png")


def truncated_jpeg(path) -> None:
    """Write a JPEG cut in half at `path`: its header reads, its pixels do not."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with open(path, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])


def tiny_config(data, save, **kw):
    """The TrainConfig of in-process runs: a tiny untrained backbone, 2 epochs; `kw` overrides."""
    from flowerclf.training.config import TrainConfig
    base = dict(data_dir=str(data), save_dir=str(save), arch="mobilenet_v3_small", weights="none", hidden_units=[8],
                epochs=2, batch_size=8)
    return TrainConfig(**{**base, **kw})


def mutate(ckpt, dotted, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        ckpt = ckpt[p]
    if value is KeyError:
        del ckpt[leaf]
    else:
        ckpt[leaf] = value


def tiny_spec(arch="mobilenet_v3_small", hidden=(8,), classes=3, weights="none"):
    """A ModelSpec of a small backbone and head, untrained unless `weights` says otherwise."""
    from flowerclf.models.registry import ModelSpec
    return ModelSpec(arch, weights, list(hidden), 0.1, classes)


# A PostScript file: Pillow identifies it as EPS whatever its name, and loading it runs Ghostscript
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n"


@pytest.fixture
def fake_gs(tmp_path, monkeypatch):
    """A `gs` first on PATH that only touches a marker file; returns the marker's path (absent until gs runs)."""
    from PIL import EpsImagePlugin
    bin_dir, marker = tmp_path / "fake-bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None, raising=False)  # Pillow caches where gs is
    return marker


def exif_jpeg() -> bytes:
    """A small JPEG with an EXIF block (orientation, text, a sub-IFD), for fuzzing Pillow's EXIF reader."""
    exif = Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x0132] = 6, "flowerclf", "2026:12:01 10:00:00"
    exif.get_ifd(0x8769)[0x9003] = "2026:12:01 10:00:00"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(
        buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def small_tiff() -> bytes:
    """A small uncompressed TIFF with an orientation and a few other tags, its tags first, for fuzzing."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(
        buf, "TIFF", tiffinfo={274: 6, 270: "flowerclf", 305: "flowerclf", 282: 72.0})
    return buf.getvalue()


FUZZ_VALUES = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 0x7F, 0x80, 0xFE, 0xFF)  # types, counts, edges


def fuzzed(data: bytes, n: int, seed: int, start: int = 0, end: int = 200):
    """`n` copies of `data` with 1 to 3 bytes in [start, end) (its headers) set at random or to FUZZ_VALUES."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        out = bytearray(data)
        for i in rng.integers(start, min(end, len(data)), rng.integers(1, 4)):
            out[i] = int(rng.choice(FUZZ_VALUES)) if rng.random() < 0.5 else int(rng.integers(0, 256))
        yield bytes(out)


def run_script(module, argv):
    """Run a script's main in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    """A 3-class ImageFolder with train/valid/test splits of 16-pixel images."""
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny model trained once for the session: (data folder, save folder). Tests must not change it."""
    import train
    tmp = tmp_path_factory.mktemp("tiny-run")
    data = make_image_folder(tmp / "data")
    code, _, err = run_script(train, [data, "--save_dir", str(tmp / "s"), "--epochs", "2"] + TINY)
    assert code == 0, err
    return data, tmp / "s"


@pytest.fixture(scope="session")
def _onnx_exports(tmp_path_factory):
    """One folder of exported backbones for the whole session (an export takes seconds)."""
    return tmp_path_factory.mktemp("onnx-exports")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, _onnx_exports, monkeypatch):
    """Each test starts with an empty feature store and the session's exported backbones, never ~/.cache."""
    cache = tmp_path_factory.mktemp("flowerclf-cache")
    os.symlink(_onnx_exports, cache / "onnx")
    monkeypatch.setenv("FLOWERCLF_STORE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def _no_progress_lines(monkeypatch):
    """A loaded machine must not add "features: batch 3/9, 10s" lines to the stderr tests count."""
    from flowerclf.base import progress
    monkeypatch.setattr(progress, "LOG_EVERY_S", float("inf"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """efficientnet_lite0 trained 2 epochs with --export onnx; one test photo of class 2 is filed under 1.

    The mislabelled photo makes a real mistake: the highest loss and a confused pair (1 taken for 2).
    """
    import json
    import shutil

    import train

    tmp = tmp_path_factory.mktemp("trained")
    data = make_image_folder(tmp / "data")
    mislabelled = os.path.join(data, "test", "1", "2_0.png")
    shutil.move(os.path.join(data, "test", "2", "2_0.png"), mislabelled)
    names = tmp / "names.json"
    names.write_text(json.dumps({"1": "pink primrose", "2": "globe thistle", "3": "blanket flower"}))
    save = tmp / "save"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main([data, "--arch", "efficientnet_lite0", "--epochs", "2", "--save_dir", str(save),
                           "--category_names", str(names), "--batch_size", "8", "--export", "onnx"]) == 0
    return {"data": data, "save": save, "names": str(names), "stdout": out.getvalue(), "mislabelled": mislabelled}


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium through Selenium, or a skip saying what is missing."""
    import shutil
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install -r requirements.txt")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("no headless browser: apt-get install chromium chromium-driver (bash .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary  # given, like the driver, so Selenium never tries to download either
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1000", "--disable-background-networking", "--no-first-run"):
        options.add_argument(flag)
    try:
        session = webdriver.Chrome(options=options, service=Service(driver))
    except WebDriverException as e:
        pytest.skip(f"headless Chromium did not start: {str(e.msg).splitlines()[0]}")
    yield session
    session.quit()
