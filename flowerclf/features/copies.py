"""Working-size copies of large photos beside the feature store: fine-tuning decodes each full-size photo once.

A photo whose shorter side is above the augmentation's decode size (transforms.decode_size with
augment: 915 px for a 224 crop, every random crop still at least the crop size) is decoded once, at
that size, and kept as STORE/copies/SIZE/ab/<sha256 of the file>.jpg, the content hash the feature
store keys vectors by (so a moved photo keeps its copy, an edited one gets a new one). Fine-tuning
epochs after the first, and reruns, read the copy instead of the photo, each at the DCT scale its random
crop allows (transforms.AugmentTransform.from_jpeg: 1/2 or less for most crops). Photos at or below that
size get no copy. A copy that does not read back whole (truncated, damaged, the wrong size) is
replaced from the photo. The copies feed only the fine-tuning augmentation, which is random and
feeds no stored vector; the feature passes, validation, evaluate.py and predict.py decode the photos
themselves (their eval decode is already the DCT's 1/8 scale), so no stored feature changes.

The format was chosen by measurement (benchmarks/bench_photos.py, 1220x915 copies of its phone-size photos,
on the idle 2-core CPU): JPEG q95 takes 108 KiB and 2.6 ms to decode, raw uint8 (Ultralytics' cache=disk
.npy, FFCV's raw mode) 3,271 KiB and 0.6 ms to read. A fine-tuning step costs ~18 ms an image there, so
raw would save a few percent of an epoch for 30x the disk (330 GB per 100,000 photos). (Those photos are
upscaled thumbnails, smoother than a camera's: real ones make larger JPEG copies, never larger raw ones.)
Torch-free to import: cache.py counts and clears the copies (features/upkeep.py) without torch.
"""
from __future__ import annotations

import os
import sqlite3
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from flowerclf.base.files import atomic_write
from flowerclf.data.images import load_rgb, open_image, size_problem
from flowerclf.data.transforms import Preprocess, decode_size
from flowerclf.features.store import file_digest, open_store, store_dir

COPIES_NAME = "copies"
QUALITY = 95


def copies_dir() -> str:
    """The folder of working-size copies, beside the feature store."""
    return os.path.join(store_dir(), COPIES_NAME)


def _working_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    """`size` scaled so that its shorter side is `short`."""
    w, h = size
    scale = short / min(w, h)
    return (short, max(short, round(h * scale))) if w <= h else (max(short, round(w * scale)), short)


class WorkingCopies:
    """Each image's working-size copy, by index: read when whole, else made from the photo (picklable for workers).

    `digests` are the files' sha256 digests, in order; `short` is the copies' shorter side.
    """

    def __init__(self, files: Sequence[str], digests: Sequence[bytes], short: int, folder: str):
        self.files, self.names, self.short = list(files), [d.hex() for d in digests], short
        self.folder = os.path.join(folder, str(short))

    def path(self, i: int) -> str:
        """Where image i's copy is (or would be)."""
        return os.path.join(self.folder, self.names[i][:2], self.names[i] + ".jpg")

    def _fits(self, img: Image.Image) -> bool:
        """Whether an opened copy's header is a copy's: an RGB JPEG at the working size."""
        return img.format == "JPEG" and img.mode == "RGB" and min(img.size) == self.short \
            and not size_problem(*img.size)

    @staticmethod
    def _open(path: str) -> Image.Image:
        """The copy at `path` opened lazily; anything but a regular file counts as missing (opening a FIFO to read
        blocks until something writes to it: an epoch would wait forever)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        return open_image(path)

    def _read(self, path: str) -> Image.Image | None:
        """The copy at `path` as RGB, or None when it is missing or does not read back whole at the working size."""
        try:  # written by us, but a cache file can be anything by now: any failure means "make it again"
            with self._open(path) as img:
                if not self._fits(img):
                    return None
                img.load()  # a truncated file raises here
                return img.copy()
        except Exception:  # missing (OSError) included
            return None

    def augmented(self, i: int, transform) -> np.ndarray:
        """Image i through the augmentation `transform` (data.transforms.AugmentTransform): its copy through
        transform.from_jpeg, decoded at the DCT scale the drawn crop allows; else what `load` gives, through transform.

        (A copy that turns out truncated only as it decodes has drawn its crop already: that image gets another one.)
        """
        try:  # as in _read: any failure means "make it again"
            with self._open(self.path(i)) as img:
                if self._fits(img):
                    return transform.from_jpeg(img)  # a truncated file raises as it decodes
        except Exception:  # missing (OSError) included
            pass
        return transform(self.load(i))

    def load(self, i: int) -> Image.Image:
        """Image i as RGB at the working size: its copy, or the photo decoded (and its copy written when large)."""
        path = self.path(i)
        img = self._read(path)
        if img is not None:
            return img
        img = load_rgb(self.files[i], draft=self.short)
        if min(img.size) <= self.short:  # at or below the working size: the photo itself is as cheap
            return img
        img = img.resize(_working_size(img.size, self.short), Image.BICUBIC)
        try:  # temp file + rename: concurrent ranks writing the same copy each rename a whole file
            atomic_write(path, lambda f: img.save(f, "JPEG", quality=QUALITY), durable=False)
        except OSError:
            pass  # a full or read-only disk: this epoch goes on from the photo, the next one tries again
        return img


def working_copies(files: Sequence[str], preprocess: Preprocess, use_store: bool,
                   log: Callable[[str], None]) -> WorkingCopies | None:
    """The working copies of `files` for fine-tuning's augmentation, or None: no store (--no_store), or the full
    decode rule (an older model's). The digests come from the feature store (remembered per path), else are computed.
    """
    short = decode_size(preprocess, augment=True)
    if not use_store or short is None:
        return None
    from flowerclf.runtime import ddp  # torch: only where training asks for copies

    with ddp.main_first():  # rank 0 creates the store before the other ranks open it
        store = open_store(log)
    digests = None
    if store is not None:
        try:
            digests = store.digests(files)
        except sqlite3.Error as e:  # a store that fails leaves the digests to compute, as a feature pass does
            log(f"warning: feature store {store.path}: {e}; working copies go on without it for this run")
        finally:
            store.close()
    if digests is None:
        digests = [file_digest(p) for p in files]
    return WorkingCopies(files, digests, short, copies_dir())

