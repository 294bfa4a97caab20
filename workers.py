"""DataLoaders of the input path, with the worker settings that keep the device fed.

A bad file in a worker still ends as one line: errors.FlowerclfError drops the traceback
that DataLoader wraps around it.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, default_collate


def loader(dataset, batch_size: int, num_workers: int, device: torch.device, collate_fn=default_collate,
           **kwargs) -> DataLoader:
    """Batches of `dataset`; with workers they persist across epochs and prefetch, and CUDA gets pinned memory."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers else None, **kwargs)
