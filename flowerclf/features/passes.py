"""Feature passes: the frozen backbone's features of whole splits, looked up in the store, only the misses computed."""
from __future__ import annotations

import sqlite3
from typing import Callable

import numpy as np
import PIL
import torch
import torchvision
from torch import nn

from flowerclf.base.progress import progress
from flowerclf.data.folders import ImageSet
from flowerclf.data.loaders import input_batches
from flowerclf.data.transforms import Preprocess, create_transform
from flowerclf.features.engines import Forward, feature_forward, state_fingerprint
from flowerclf.features.store import open_store
from flowerclf.runtime import ddp
from flowerclf.runtime.devices import amp_dtype


@torch.inference_mode()
def extract_features(forward: Forward, loader, desc: str = "features",
                     on_batch: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen backbone once over `loader`; return (features, labels) on the CPU.

    Each batch is copied into one array made at the first batch (rows for len(loader) batches of its
    size) and dropped: a list of per-batch tensors, interleaved on the heap with the batches' large
    short-lived buffers, kept glibc from reusing them and grew the pass's memory by about a batch of
    images per batch (1.9 GB at 2,100 images with torch). `on_batch(start, features)` sees each
    batch as it is done (the store commits it there).
    """
    feats = labels = None
    done = 0
    for x, y in progress(loader, desc):
        batch = forward(x)
        n = len(batch)
        if feats is None:
            rows = len(loader) * n  # every batch but the last is as large as the first
            feats = torch.empty((rows,) + tuple(batch.shape[1:]), dtype=batch.dtype)
            labels = torch.empty(rows, dtype=torch.int64)
        feats[done:done + n] = batch
        labels[done:done + n] = torch.as_tensor(y)
        del x, y, batch  # no batch outlives its step
        if on_batch:
            on_batch(done, feats[done:done + n])
        done += n
    if feats is None:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return feats[:done], labels[:done]


def shard_of(images: ImageSet) -> tuple[ImageSet, list[int], bool]:
    """This rank's part of `images` under torchrun, its indices, and whether it is a shard (with fewer images
    than processes each takes them all)."""
    sharded = len(images) >= ddp.world()
    mine = ddp.shard(len(images)) if sharded else list(range(len(images)))
    return ImageSet(images.root, [images.files[i] for i in mine], [images.labels[i] for i in mine]), mine, sharded


def sharded_features(forward: Forward, images: ImageSet, transform, batch_size: int, num_workers: int,
                     device: torch.device, desc: str,
                     on_batch: Callable[[list[int], torch.Tensor], None] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image, in order; under torchrun each rank computes its shard and they swap.

    Fewer images than processes: each computes them all. `on_batch(indices, features)` sees
    this process's batches as they are done.
    """
    part, mine, sharded = shard_of(images)
    report = (lambda start, feats: on_batch(mine[start:start + len(feats)], feats)) if on_batch else None
    feats, _ = extract_features(forward, input_batches(part, transform, batch_size, num_workers, device), desc,
                                report)
    return ddp.gather_rows(feats, len(images), device) if sharded else feats, torch.as_tensor(images.labels)


def setup_key(arch: str, weights: str, fingerprint: str, preprocess: Preprocess, engine: str,
              device: torch.device, amp: bool) -> dict:
    """Everything but the image and the view that changes a feature vector (the store's key), and names to show."""
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
                "numpy": np.__version__}
    if engine == "onnxruntime":  # the exporter's output and the runtime's kernels
        import onnx
        import onnxruntime
        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    precision = str(amp_dtype(device)).removeprefix("torch.") if amp else "float32"
    # preprocess holds the decode rule too: vectors of full-size and of draft decodes are never mixed
    return {"arch": arch, "weights": weights, "backbone": fingerprint, "preprocess": preprocess.to_dict(),
            "engine": engine, "device": device.type, "precision": precision, "versions": versions}


class FeaturePass:
    """The frozen backbone's features on one engine, through the user's store (`use_store`) or without it.

    A context manager: the store and the engine's session close when the pass ends. Training and
    evaluate.py both use it, so a checkpoint's features are computed (and keyed) the same way wherever
    they are asked for.
    """

    def __init__(self, backbone: nn.Module, arch: str, weights: str, preprocess: Preprocess, engine: str,
                 device: torch.device, amp: bool, batch_size: int, num_workers: int, use_store: bool,
                 log: Callable[[str], None]):
        fingerprint = state_fingerprint(backbone)
        self.forward, self.engine = feature_forward(backbone, arch, preprocess.crop_size, engine, device, amp,
                                                    fingerprint, log, batch_size)
        self.setup_key = dict(setup_key(arch, weights, fingerprint, preprocess, self.engine, device, amp),
                              batch_size=batch_size)  # kernels differ by batch size: so do vectors, by ~1e-9
        self.store = open_store(log) if use_store else None
        self.preprocess, self.batch_size, self.num_workers = preprocess, batch_size, num_workers
        self.device, self.log = device, log

    def __enter__(self) -> "FeaturePass":
        return self

    def __exit__(self, *exc) -> None:
        # the backbone's session (ONNX Runtime: model, arena, threads) ends with the pass
        getattr(self.forward, "close", lambda: None)()
        self.forward = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def features(self, images: ImageSet, desc: str, view: int | None = None,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of `images` in order; prints `features DESC: N cached, M computed`."""
        content, found, setup_id = self._lookup(images, view, seed)
        if not ddp.all_true(setup_id is not None, self.device):  # every rank keys the images the same way
            content, found, setup_id = list(range(len(images))), {}, None
        hit = ddp.all_and(torch.tensor([c in found for c in content], dtype=torch.bool), self.device).tolist()
        missing = [i for i, h in enumerate(hit) if not h]
        first = {}
        for i in missing:
            first.setdefault(content[i], i)
        todo = list(first.values())  # one backbone pass per distinct content
        out = None
        if hits := [i for i, h in enumerate(hit) if h]:
            out = np.empty((len(images), len(found[content[hits[0]]]) // 4), np.float32)
            for i in hits:  # row by row: no joined copy of all the stored vectors
                out[i] = np.frombuffer(found[content[i]], np.float32)
        found.clear()
        if todo:
            part = ImageSet(images.root, [images.files[i] for i in todo], [images.labels[i] for i in todo])
            store = (lambda idx, feats: self._put(setup_id, [content[todo[i]] for i in idx], feats)) \
                if setup_id is not None else None
            computed = sharded_features(self.forward, part, create_transform(self.preprocess, view=view, seed=seed),
                                        self.batch_size, self.num_workers, self.device, f"features {desc}",
                                        store)[0].numpy()
            if len(todo) == len(images):  # a cold pass over distinct images: that array is the answer
                out = computed
            else:
                out = np.empty((len(images), computed.shape[1]), np.float32) if out is None else out
                row = {content[i]: j for j, i in enumerate(todo)}
                out[missing] = computed[[row[content[i]] for i in missing]]
        self.log(f"features {desc}: {len(images) - len(missing):,} cached, {len(missing):,} computed")
        return torch.from_numpy(out), torch.as_tensor(images.labels)

    def _lookup(self, images: ImageSet, view: int | None, seed: int) -> tuple[list, dict, int | None]:
        """(each image's content id, the stored vectors among them, the setup id).

        With a store the content id is the file's sha256 digest; without one (or when it fails) it is
        the image's index, nothing is found and the setup id is None.
        """
        if self.store is not None:
            key = dict(self.setup_key, view=view, seed=seed if view is not None else None)
            try:
                digests, setup_id, found = self.store.lookup(images.files, key, key.pop("arch"), key.pop("weights"))
                return digests, found, setup_id
            except sqlite3.Error as e:
                self._lose_store(e)
        return list(range(len(images))), {}, None

    def _put(self, setup_id: int, digests: list, feats: torch.Tensor) -> None:
        """Commit one computed batch, so a killed run keeps all but the batch it was on."""
        if self.store is None:
            return
        try:
            self.store.put(setup_id, zip(digests, (row.numpy().tobytes() for row in feats)))
        except sqlite3.Error as e:
            self._lose_store(e)

    def _lose_store(self, error: sqlite3.Error) -> None:
        """A store that fails (locked for minutes, a full disk) is left for this run; features still come."""
        self.log(f"warning: feature store {self.store.path}: {error}; going on without it for this run")
        self.store.close()
        self.store = None


@torch.inference_mode()
def head_logits(head: nn.Module, feats: torch.Tensor, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Logits of `head` on stored features, on the CPU."""
    head.eval()
    return torch.cat([head(feats[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(feats), batch_size)])
