"""Backbone features: the input path, the feature runtimes (torch, ONNX Runtime) and the feature cache."""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torchvision
from torch import nn

import data_utils as du
import ddp
import decode
import workers
from checkpoints import atomic_save, export_onnx
from devices import autocast, to_channels_last
from errors import FlowerclfError, brief
from progress import progress

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


def onnx_cache_dir() -> str:
    """Where exported backbones are kept across runs and projects: $FLOWERCLF_CACHE or ~/.cache/flowerclf."""
    return os.environ.get("FLOWERCLF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowerclf")


def onnx_forward(backbone: nn.Module, arch: str, crop_size: int, fingerprint: str) -> Forward:
    """The backbone through ONNX Runtime's CPU provider, exported once per weights and library versions."""
    import onnx
    import onnxruntime as ort

    versions = f"{torch.__version__}|{onnx.__version__}|{ort.__version__}|{crop_size}"
    key = hashlib.sha256(f"{fingerprint}|{versions}".encode()).hexdigest()[:24]
    path = os.path.join(onnx_cache_dir(), "onnx", f"{arch}-{key}.onnx")
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


# ---------------------------------------------------------------- passes and cache

def state_fingerprint(module: nn.Module) -> str:
    """Hash of a module's weights: identifies the network a cache entry came from, whatever its origin."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


@torch.inference_mode()
def extract_features(forward: Forward, loader, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen backbone once over `loader`; return (features, labels) on the CPU."""
    feats, labels = [], []
    for x, y in progress(loader, desc):
        feats.append(forward(x))
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def feature_key(images: du.ImageSet, fingerprint: str, preprocess: du.Preprocess, view: int | None,
                seed: int, amp: bool, engine: str) -> str:
    """Hash of everything that changes the features; nothing about the head or the optimizer."""
    files = [(f, st.st_size, st.st_mtime_ns) for f in images.files for st in (os.stat(f),)]
    blob = json.dumps({"files": files, "labels": images.labels, "backbone": fingerprint,
                       "preprocess": preprocess.to_dict(), "view": view, "seed": seed if view is not None else None,
                       "amp": amp, "engine": engine, "torch": torch.__version__,
                       "torchvision": torchvision.__version__})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def sharded_features(forward: Forward, images: du.ImageSet, transform, batch_size: int, num_workers: int,
                     device: torch.device, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image, in order; under torchrun each rank computes its shard and they swap."""
    mine = ddp.shard(len(images))
    if not mine:
        raise FlowerclfError(f"{images.root} has {len(images)} images, fewer than the {ddp.world()} processes")
    part = du.ImageSet(images.root, [images.files[i] for i in mine], [images.labels[i] for i in mine])
    feats, _ = extract_features(forward, input_batches(part, transform, batch_size, num_workers, device), desc)
    return ddp.gather_rows(feats, len(images), device), torch.as_tensor(images.labels)


def cached_features(forward: Forward, images: du.ImageSet, transform, key: str | None, cache_dir: str,
                    batch_size: int, num_workers: int, device: torch.device, desc: str,
                    log: Callable[[str], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of `images` from the disk cache when `key` is there, else computed (and stored)."""
    path = os.path.join(cache_dir, f"{key}.pt") if key else None
    if path and ddp.all_true(os.path.isfile(path), device):  # every rank takes the same branch
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return data["features"], data["labels"]
        except Exception:  # a damaged cache file is only a miss
            log(f"warning: ignoring unreadable feature cache {path}")
    feats = sharded_features(forward, images, transform, batch_size, num_workers, device, desc)
    if path and ddp.is_main():
        atomic_save({"features": feats[0], "labels": feats[1]}, path)
    return feats
