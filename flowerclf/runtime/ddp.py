"""Distributed training under torchrun: process group, shards and the few collectives we need.

Outside torchrun (no WORLD_SIZE > 1 in the environment) every function is a cheap no-op,
so the single-process path runs the same code.
"""
from __future__ import annotations

import datetime
import os
import re
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from flowerclf.base.errors import FlowerclfError, brief

# gloo and NCCL report a peer that went away as a plain RuntimeError
_PEER_LOST = re.compile(r"gloo|nccl|connection (reset|closed)|broken pipe", re.IGNORECASE)


def launched() -> bool:
    """True when torchrun started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group torchrun describes (NCCL on CUDA, gloo otherwise); return this rank's device."""
    if not launched():
        return device
    if device.type == "cuda":
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= gpus:  # each rank without a GPU of its own says so; torchrun then stops the others
            per_node = os.environ.get("LOCAL_WORLD_SIZE", str(local + 1))
            raise FlowerclfError(f"torchrun started {per_node} processes on this node but it has {gpus} CUDA "
                                 f"device(s); pass --nproc_per_node={gpus} (or --device cpu to use gloo on the CPU)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # the timeout bounds every collective: a rank that dies or hangs ends the job instead of stalling it
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:  # a bad MASTER_PORT, an address in use, a rank that never came
            raise FlowerclfError(f"torchrun: this process could not join the job ({brief(e, 120)}); check "
                                 f"MASTER_ADDR, MASTER_PORT and that every process started") from None
    return device


@contextmanager
def peers_watched() -> Iterator[None]:
    """Under torchrun, a collective that fails because another rank ended (its own error line says why) ends
    this rank with one line too, not the backend's traceback."""
    try:
        yield
    except RuntimeError as e:
        if not launched() or not (isinstance(e, dist.DistError) or _PEER_LOST.search(str(e))):
            raise
        raise FlowerclfError(f"another process of this torchrun job failed or stopped (its error line says why), "
                             f"so this one stops too ({brief(e, 100)})", exit_code=1) from None


def cleanup() -> None:
    """Leave the process group."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 prints progress and writes files."""
    return rank() == 0


def warnings_only(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` for a rank other than 0: its warnings and errors, as `[rank N] warning: ...`; progress is rank 0's."""
    prefix = f"[rank {rank()}] "
    return lambda line: log(prefix + line) if line.startswith(("warning", "error")) else None


@contextmanager
def main_first():
    """Rank 0 runs the block before the other ranks start it (it creates what they then open, such as the
    feature store); outside torchrun a no-op."""
    if world() > 1 and not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if world() > 1 and is_main():
            dist.barrier()


def shard(n: int) -> list[int]:
    """This rank's indices of n items: rank, rank + world, ... (no padding, nothing repeated)."""
    return list(range(rank(), n, world()))


def gather_rows(local: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Reassemble rows that each rank computed for its shard(n) into all n rows, in order, on every rank."""
    if world() == 1:
        return local
    size = -(-n // world())
    padded = torch.zeros((size,) + tuple(local.shape[1:]), dtype=local.dtype, device=device)
    padded[:len(local)] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    out = torch.empty((n,) + tuple(local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        rows = len(range(r, n, world()))
        out[r::world()] = part[:rows].cpu()
    return out


def all_and(flags: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Element-wise AND of a bool vector over ranks: true where it is true on every rank."""
    if world() == 1:
        return flags
    t = flags.to(device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.cpu().bool()


def all_true(flag: bool, device: torch.device) -> bool:
    """True only when `flag` is true on every rank (so all ranks take the same branch)."""
    return bool(all_and(torch.tensor([flag]), device)[0])


def all_sum(value: float, device: torch.device) -> float:
    """Sum of a number over ranks."""
    if world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()

