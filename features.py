"""Backbone features: the input path, the feature runtimes (torch, ONNX Runtime) and the passes through the store."""
from __future__ import annotations

import copy
import hashlib
import os
import sqlite3
from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL
import torch
import torchvision
from torch import nn

import data_utils as du
import ddp
import decode
import workers
from checkpoints import export_onnx
from devices import amp_dtype, autocast, to_channels_last
from errors import FlowerclfError, brief
from progress import progress
from store import FeatureStore, cache_dir

Forward = Callable[[torch.Tensor], torch.Tensor]  # a CPU batch of images -> CPU float32 features


# ---------------------------------------------------------------- input

def make_loader(images: du.ImageSet, transform, batch_size: int, num_workers: int, device: torch.device,
                shuffle: bool = False, generator: torch.Generator | None = None, sampler=None,
                drop_last: bool = False) -> torch.utils.data.DataLoader:
    """The PIL path: batches of `images` through `transform` (PIL RGB -> CHW float32 array), in workers."""
    return workers.loader(du.ImageDataset(images.files, images.labels, transform), batch_size, num_workers, device,
                          shuffle=shuffle, generator=generator, sampler=sampler, drop_last=drop_last)


@dataclass(frozen=True)
class EvalTransform:
    """The deterministic resize + center-crop + normalize of `preprocess`, which the tensor path can do too."""

    preprocess: du.Preprocess

    def __call__(self, img) -> np.ndarray:
        return du.preprocess_image(img, self.preprocess)


def eval_transform(preprocess: du.Preprocess) -> EvalTransform:
    """The deterministic resize + center-crop + normalize transform."""
    return EvalTransform(preprocess)


def input_batches(images: du.ImageSet, transform, batch_size: int, num_workers: int, device: torch.device):
    """The one choice of input path: (normalized images, labels) batches of `images`, in order.

    On CUDA the eval transform runs on the GPU: JPEGs decoded by nvjpeg in batches (decode.py), the
    PIL path for the rest. Elsewhere, and for augmentation, PIL in worker processes: on a CPU the
    backbone is the bottleneck, not decoding.
    """
    if device.type == "cuda" and isinstance(transform, EvalTransform):
        return decode.JpegBatches(images, transform.preprocess, batch_size, num_workers, device)
    return make_loader(images, transform, batch_size, num_workers, device)


# ---------------------------------------------------------------- runtimes

def torch_forward(backbone: nn.Module, device: torch.device, amp: bool = False) -> Forward:
    """The backbone in eval mode and channels-last, on `device`.

    On CUDA a batch smaller than the first (a split's last) is padded to its size, so cuDNN
    autotunes one shape per pass instead of one per split.
    """
    to_channels_last(backbone.eval())
    fixed = 0

    def forward(x: torch.Tensor) -> torch.Tensor:
        nonlocal fixed
        n = len(x)
        fixed = fixed or n
        x = x.to(device, non_blocking=True)
        if device.type == "cuda" and n < fixed:
            x = torch.cat([x, x.new_zeros((fixed - n,) + tuple(x.shape[1:]))])
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            return backbone(x)[:n].float().cpu()
    return forward


def onnx_forward(backbone: nn.Module, arch: str, crop_size: int, fingerprint: str) -> Forward:
    """The backbone through ONNX Runtime's CPU provider, exported once per weights and library versions."""
    import onnx
    import onnxruntime as ort

    versions = f"{torch.__version__}|{onnx.__version__}|{ort.__version__}|{crop_size}"
    key = hashlib.sha256(f"{fingerprint}|{versions}".encode()).hexdigest()[:24]
    path = os.path.join(cache_dir(), "onnx", f"{arch}-{key}.onnx")
    if not os.path.isfile(path):  # a copy: the export moves the module to contiguous format
        export_onnx(copy.deepcopy(backbone), path, crop_size)
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception:  # a damaged cached file (or one of an older flowerclf that kept its weights aside)
        export_onnx(copy.deepcopy(backbone), path, crop_size)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def feature_forward(backbone: nn.Module, arch: str, crop_size: int, engine: str, device: torch.device,
                    amp: bool, fingerprint: str, log: Callable[[str], None]) -> tuple[Forward, str]:
    """The frozen backbone's forward on the chosen engine, and the engine actually used.

    auto: ONNX Runtime on a CPU (3.2x torch for efficientnet_lite0 on 2 cores), torch elsewhere and
    under torchrun (where the processes already share the cores).
    A failed export falls back to torch with one line.
    """
    use_ort = engine == "onnxruntime" or (engine == "auto" and device.type == "cpu" and not amp
                                          and not ddp.launched())
    if use_ort and ddp.launched():
        raise FlowerclfError("--engine onnxruntime is for single-process runs; under torchrun use --engine torch")
    if use_ort and device.type != "cpu":
        raise FlowerclfError(f"--engine onnxruntime runs on the CPU, but the device is {device}; "
                             f"pass --device cpu or --engine torch")
    if use_ort:
        try:
            return onnx_forward(backbone, arch, crop_size, fingerprint), "onnxruntime"
        except Exception as e:  # exporter and runtime failures are many; every one means "use torch"
            log(f"ONNX Runtime unavailable for {arch} ({brief(e, 150)}); using torch")
    return torch_forward(backbone, device, amp), "torch"


# ---------------------------------------------------------------- passes and the store

def state_fingerprint(module: nn.Module) -> str:
    """Hash of a module's weights: identifies the network a stored vector came from, whatever its origin."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


@torch.inference_mode()
def extract_features(forward: Forward, loader, desc: str = "features",
                     on_batch: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen backbone once over `loader`; return (features, labels) on the CPU.

    `on_batch(start, features)` sees each batch as it is done (the store commits it there).
    """
    feats, labels, done = [], [], 0
    for x, y in progress(loader, desc):
        feats.append(forward(x))
        labels.append(torch.as_tensor(y))
        if on_batch:
            on_batch(done, feats[-1])
        done += len(feats[-1])
    return torch.cat(feats), torch.cat(labels)


def sharded_features(forward: Forward, images: du.ImageSet, transform, batch_size: int, num_workers: int,
                     device: torch.device, desc: str,
                     on_batch: Callable[[list[int], torch.Tensor], None] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image, in order; under torchrun each rank computes its shard and they swap.

    Fewer images than processes: each computes them all. `on_batch(indices, features)` sees
    this process's batches as they are done.
    """
    sharded = len(images) >= ddp.world()
    mine = ddp.shard(len(images)) if sharded else list(range(len(images)))
    part = du.ImageSet(images.root, [images.files[i] for i in mine], [images.labels[i] for i in mine])
    report = (lambda start, feats: on_batch(mine[start:start + len(feats)], feats)) if on_batch else None
    feats, _ = extract_features(forward, input_batches(part, transform, batch_size, num_workers, device), desc,
                                report)
    return ddp.gather_rows(feats, len(images), device) if sharded else feats, torch.as_tensor(images.labels)


def feature_setup(arch: str, weights: str, fingerprint: str, preprocess: du.Preprocess, engine: str,
                  device: torch.device, amp: bool) -> dict:
    """Everything but the image and the view that changes a feature vector (the store's key), and names to show."""
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
                "numpy": np.__version__}
    if engine == "onnxruntime":  # the exporter's output and the runtime's kernels
        import onnx
        import onnxruntime
        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    precision = str(amp_dtype(device)).removeprefix("torch.") if amp else "float32"
    return {"arch": arch, "weights": weights, "backbone": fingerprint, "preprocess": preprocess.to_dict(),
            "engine": engine, "device": device.type, "precision": precision, "versions": versions}


def view_transform(preprocess: du.Preprocess, view: int | None, seed: int):
    """The center crop (view None), or augmented view `view`: a random crop + flip drawn per image.

    The draw is seeded by (seed, view, the decoded pixels), so an image gets the same view in
    any pass, whatever other images are in it: stored and recomputed views agree.
    """
    if view is None:
        return eval_transform(preprocess)
    augment = du.train_transform(preprocess)

    def transform(img):
        pixels = hashlib.sha256(f"{seed}|{view}|{img.size}|".encode() + img.tobytes()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(pixels[:8], "little"))
            return augment(img)
    return transform


@dataclass
class FeaturePass:
    """The frozen backbone's features of whole splits: looked up in the store, only the misses computed."""

    forward: Forward
    preprocess: du.Preprocess
    setup: dict                    # feature_setup(...)
    store: FeatureStore | None     # None: --no_cache, or a store that could not be opened
    batch_size: int
    num_workers: int
    device: torch.device
    log: Callable[[str], None]

    def features(self, images: du.ImageSet, desc: str, view: int | None = None,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of `images` in order; prints `features DESC: N cached, M computed`."""
        keys, found, setup = self._lookup(images, view, seed)
        if not ddp.all_true(setup is not None, self.device):  # every rank keys the images the same way
            keys, found, setup = list(range(len(images))), {}, None
        hit = ddp.agree(torch.tensor([k in found for k in keys], dtype=torch.bool), self.device).tolist()
        missing = [i for i, h in enumerate(hit) if not h]
        first = {}
        for i in missing:
            first.setdefault(keys[i], i)
        todo = list(first.values())  # one backbone pass per distinct content
        computed = None
        if todo:
            part = du.ImageSet(images.root, [images.files[i] for i in todo], [images.labels[i] for i in todo])
            store = (lambda idx, feats: self._put(setup, [keys[todo[i]] for i in idx], feats)) \
                if setup is not None else None
            computed = sharded_features(self.forward, part, view_transform(self.preprocess, view, seed),
                                        self.batch_size, self.num_workers, self.device, f"features {desc}",
                                        store)[0].numpy()
        self.log(f"features {desc}: {len(images) - len(missing):,} cached, {len(missing):,} computed")
        # one array, filled in two vectorized copies: no per-image objects outlive the pass
        hits = [i for i, h in enumerate(hit) if h]
        dim = len(found[keys[hits[0]]]) // 4 if hits else computed.shape[1]
        out = np.empty((len(images), dim), np.float32)
        if hits:
            out[hits] = np.frombuffer(b"".join(found[keys[i]] for i in hits), np.float32).reshape(len(hits), dim)
        if missing:
            row = {keys[i]: j for j, i in enumerate(todo)}
            out[missing] = computed[[row[keys[i]] for i in missing]]
        return torch.from_numpy(out), torch.as_tensor(images.labels)

    def _lookup(self, images: du.ImageSet, view: int | None, seed: int) -> tuple[list, dict, int | None]:
        """(content hashes, stored vectors among them, setup id); (indices, {}, None) without a store."""
        if self.store is not None:
            key = dict(self.setup, view=view, seed=seed if view is not None else None)
            try:
                keys, setup, found = self.store.lookup(images.files, key, key.pop("arch"), key.pop("weights"))
                return keys, found, setup
            except sqlite3.Error as e:
                self._lose_store(e)
        return list(range(len(images))), {}, None

    def _put(self, setup: int, keys: list, feats: torch.Tensor) -> None:
        """Commit one computed batch, so a killed run keeps all but the batch it was on."""
        if self.store is None:
            return
        try:
            self.store.put(setup, zip(keys, (row.numpy().tobytes() for row in feats)))
        except sqlite3.Error as e:
            self._lose_store(e)

    def _lose_store(self, error: sqlite3.Error) -> None:
        """A store that fails (locked for minutes, a full disk) is left for this run; features still come."""
        self.log(f"warning: feature store {self.store.path}: {error}; going on without it for this run")
        self.store = None
