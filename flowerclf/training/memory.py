"""Memory accounting for gpumemcheck.py: device and host figures, a tensor census, batch-size search."""
from __future__ import annotations

import gc
import math
import resource
import time
import warnings
from collections import defaultdict
from typing import Callable

import psutil
import torch
from torch import nn

from flowerclf.models.registry import ModelSpec, build_model, freeze
from flowerclf.models.stages import unfreeze_last
from flowerclf.runtime.devices import autocast, out_of_memory

MIB = 1024 ** 2


def host_report() -> dict:
    """This process's resident memory and the machine's available RAM, in bytes."""
    vm = psutil.virtual_memory()
    return {"process_rss": psutil.Process().memory_info().rss, "available": vm.available, "total": vm.total}


def cuda_report() -> list[dict]:
    """Per CUDA device: total, free, used by other processes, reserved / allocated / peak by this one."""
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        reserved = torch.cuda.memory_reserved(i)
        out.append({
            "index": i, "name": torch.cuda.get_device_name(i), "total": total, "free": free,
            # what is used but not ours: other processes, plus this process's CUDA context
            "used_by_others": max(0, total - free - reserved),
            "reserved": reserved, "allocated": torch.cuda.memory_allocated(i),
            "peak_allocated": torch.cuda.max_memory_allocated(i),
        })
    return out


def tensor_census() -> list[dict]:
    """Live tensors grouped by (device, dtype, shape): count and bytes, largest first."""
    groups: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    with warnings.catch_warnings():  # isinstance() on some objects trips deprecation shims
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type == "meta":
                continue
            key = (str(obj.device), str(obj.dtype).replace("torch.", ""), tuple(obj.shape))
            groups[key][0] += 1
            groups[key][1] += obj.numel() * obj.element_size()
        except Exception:  # objects that die or misbehave while we look are not ours to count
            continue
    rows = [{"device": d, "dtype": t, "shape": list(s), "count": c, "bytes": b} for (d, t, s), (c, b) in groups.items()]
    return sorted(rows, key=lambda r: (-r["bytes"], r["device"], r["dtype"], r["shape"]))


def largest_fitting(fits: Callable[[int], bool], limit: int = 4096) -> int:
    """The largest batch size b <= limit with fits(b), assuming fits is monotone; 0 if even 1 fails.

    Doubles until a failure, then bisects between the last success and the first failure.
    """
    if not fits(1):
        return 0
    good, bad = 1, None
    while bad is None:
        trial = min(good * 2, limit)
        if trial == good:
            return good
        if fits(trial):
            good = trial
        else:
            bad = trial
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def with_margin(batch_size: int, margin: float = 0.1) -> int:
    """The batch size to recommend: a safety margin below the largest that fitted."""
    return max(1, math.floor(batch_size * (1 - margin))) if batch_size else 0


def training_step(arch: str, num_classes: int, unfreeze, amp: bool, device: torch.device
                  ) -> tuple[Callable[[int], None], str]:
    """A function running one real training step at a batch size, as train.py would, and what it covers."""
    spec = ModelSpec(arch, "none", [512], 0.2, num_classes)
    model, pp = build_model(spec, load_pretrained=False)  # memory does not depend on the weights' values
    model.to(device)
    if unfreeze:
        unfreeze_last(model.backbone, unfreeze)
    else:
        freeze(model.backbone)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    model.to(memory_format=torch.channels_last)

    def step(batch_size: int) -> None:
        x = torch.randn(batch_size, 3, pp.crop_size, pp.crop_size, device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, num_classes, (batch_size,), device=device)
        with autocast(device, amp):
            if unfreeze:
                model.train()
                loss = nn.functional.cross_entropy(model(x), y)
            else:  # the frozen path: a feature pass, then the head trains on features
                with torch.no_grad():
                    feats = model.backbone.eval()(x)
                loss = nn.functional.cross_entropy(model.head(feats.float()), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    what = (f"fine-tuning step (--unfreeze {unfreeze})" if unfreeze else "frozen-backbone feature pass + head step")
    return step, what


def cuda_peak(step: Callable[[int], None], batch_size: int, device: torch.device) -> int | None:
    """Peak bytes one step on CUDA allocates above what was allocated before it, or None when it does not fit.

    Not fitting is any out-of-memory error (devices.out_of_memory: cuBLAS and cuDNN workspaces too);
    any other error propagates.
    """
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    try:
        step(batch_size)
        torch.cuda.synchronize(device)
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        return None
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    return torch.cuda.max_memory_allocated(device) - base


def cuda_step_peak(step: Callable[[int], None], device: torch.device) -> Callable[[int], int | None]:
    """batch size -> cuda_peak of a step there, after one warm-up step at batch 1 (None if even that fails).

    The first step makes what then stays: AdamW's state (two tensors per trainable parameter),
    cuBLAS / cuDNN handles. After the warm-up every figure is the same thing whichever batch size comes
    first (--batch_size or --find_batch_size's search): what one step adds on top of the weights and the
    optimizer state (its activations, gradients and workspaces).
    """
    warm = cuda_peak(step, 1, device) is not None
    return lambda batch_size: cuda_peak(step, batch_size, device) if warm else None


def cpu_peak(step: Callable[[int], None], batch_size: int) -> tuple[int, float]:
    """Bytes one step at `batch_size` adds to this process's resident memory at its peak, and its seconds.

    Call with growing batch sizes: the peak-RSS counter only rises, so a smaller step would read high.
    """
    before, start = psutil.Process().memory_info().rss, time.perf_counter()
    step(batch_size)
    seconds = time.perf_counter() - start
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before), seconds


def cpu_memory_model(step: Callable[[int], None], sizes=(4, 16)) -> dict:
    """Peak RSS ~ fixed + per_image * batch and seconds ~ per_image_s * batch, fitted from two small real steps.

    Extrapolated, never run at the large size, so it cannot wake the OOM killer.
    """
    step(1)  # first-call allocations (gradients, optimizer state, kernel caches) out of the way
    (b0, (m0, t0)), (b1, (m1, t1)) = [(b, cpu_peak(step, b)) for b in sizes]
    per_image = max((m1 - m0) / (b1 - b0), 1.0)
    return {"fixed_bytes": max(0.0, m1 - per_image * b1), "per_image_bytes": per_image,
            "per_image_seconds": max(t1 / b1, (t1 - t0) / (b1 - b0)), "measured_batch_sizes": list(sizes)}
