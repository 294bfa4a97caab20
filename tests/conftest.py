"""Shared fixtures: tiny synthetic ImageFolder trees made on the fly."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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


@pytest.fixture
def image_folder(tmp_path):
    """A 3-class ImageFolder with train/valid/test splits of 16-pixel images."""
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def _onnx_exports(tmp_path_factory):
    """One folder of exported backbones for the whole session (an export takes seconds)."""
    return tmp_path_factory.mktemp("onnx-exports")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, _onnx_exports, monkeypatch):
    """Each test starts with an empty feature store and the session's exported backbones, never ~/.cache."""
    cache = tmp_path_factory.mktemp("flowerclf-cache")
    os.symlink(_onnx_exports, cache / "onnx")
    monkeypatch.setenv("FLOWERCLF_CACHE", str(cache))
    return cache
