"""Where tensors run and how: the device decision, mixed precision, channels-last, batch sizes, input workers."""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch import nn

from flowerclf.base.errors import FlowerclfError


def resolve_device(name: str = "auto", gpu: bool = False) -> torch.device:
    """The one device decision: --gpu means CUDA; auto prefers CUDA, then MPS, then CPU."""
    if gpu and name not in ("auto", "cuda"):
        raise FlowerclfError(f"--gpu asks for CUDA but --device is {name}; pass one of them")
    if gpu:
        name = "cuda"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FlowerclfError("CUDA was requested (--gpu / --device cuda) but no CUDA device is available; "
                             "drop --gpu to run on the CPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FlowerclfError("--device mps was requested but MPS is not available on this machine")
    return torch.device(name)


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (CPU, ROCm, NVIDIA sm_80 and later), else fp16 (train.py adds a GradScaler).

    Not torch.cuda.is_bf16_supported(): by default it counts emulation too (a T4 or RTX 20xx, sm_75,
    can make bf16 tensors, so it says True there, yet cuDNN has no bf16 convolutions for it and the
    emulation is slow), and it asks about the current device rather than `device`. Its
    including_emulation=False is the same compute-capability test as this one.
    """
    if device.type == "cuda" and not torch.version.hip and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16
    return torch.bfloat16


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` says the device ran out of memory: torch's OutOfMemoryError, or the plain RuntimeError of
    an allocation outside torch's allocator (cuBLAS / cuDNN workspaces: CUBLAS_STATUS_ALLOC_FAILED,
    CUDNN_STATUS_ALLOC_FAILED; "CUDA error: out of memory"). Any other error is a real one."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    message = str(e)
    return isinstance(e, RuntimeError) and ("_STATUS_ALLOC_FAILED" in message or "out of memory" in message.lower())


def autocast(device: torch.device, enabled: bool):
    """The one mixed-precision context: bf16 where supported (CPU, recent GPUs), else fp16."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(device))


def to_channels_last(model: nn.Module) -> nn.Module:
    """Channels-last lets oneDNN/cuDNN pick faster conv kernels (1.6x for efficientnet_lite0, 2 CPU cores)."""
    return model.to(memory_format=torch.channels_last)


def resolve_feature_batch_size(requested: int, device: torch.device) -> int:
    """Batch size of inference passes. On a CPU small batches stay in cache: efficientnet_lite0 on 2 cores
    ran 67 img/s at 8, 57 at 16, 45 at 64, 31 at 128 (benchmarks/bench_train.py probes this too)."""
    return requested or (8 if device.type == "cpu" else 128)


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# Photos of at least this many pixels (the median of a sample, data.images.typical_pixels) are decoded in a worker per
# core on a CPU: there decoding, not the backbone, bounds the pass
LARGE_PHOTO_PIXELS = 2_000_000


def resolve_num_workers(requested: int | str, device: torch.device, pixels: float = 0.0) -> int:
    """--num_workers: a number as given; auto by device, the cores each process of this node gets, and `pixels`,
    the photos' typical size.

    CUDA: every core but one (the main process feeds the GPU), at most 16: PIL decoding of 500x667
    JPEGs ran 292 / 1,568 / 2,567 img/s with 0 / 8 / 16 workers on a 16-core H100 machine.
    CPU: the backbone (ONNX Runtime or torch) already uses every core, so for small photos 0 below 8 cores
    and a quarter of them from 8 on: on 2 idle cores the feature pass over 256 of flowers5-dev's 128-px
    photos ran 256.5 / 211.1 / 203.0 img/s with 0 / 1 / 2 workers (benchmarks/bench_workers.py). From
    LARGE_PHOTO_PIXELS up, a worker a core: a 4032x3024 photo's draft decode takes 12-17 ms of a core
    against the backbone's 2.8 ms of both, and on 80 such photos the pass ran 62.2 / 56.4 / 76.5 img/s
    (`bench_workers.py --phone`; bench_photos.py's pass: 58.9 with 0, 82.6-83.8 with 2).
    """
    if requested != "auto":
        return int(requested)
    cores = max(1, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device.type == "cuda":
        return max(1, min(16, cores - 1))
    if pixels >= LARGE_PHOTO_PIXELS:
        return cores
    return cores // 4 if cores >= 8 else 0


def enable_cudnn_autotune(device: torch.device) -> None:
    """cuDNN benchmarks its kernels once per input shape; with fixed batch shapes that happens once per run."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
