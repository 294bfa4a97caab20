"""DataLoaders of the input path: worker settings by device, and worker errors that arrive as one line."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, default_collate

from errors import FlowerclfError


class _ErrorsAsItems:
    """The dataset, with a FlowerclfError returned as the item (DataLoader would re-raise it as a traceback)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except FlowerclfError as e:
            return e


class _Collate:
    """`collate` of the batch, or the first error among its items."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items: list):
        return next((item for item in items if isinstance(item, FlowerclfError)), None) or self.collate(items)


class Loader(DataLoader):
    """A DataLoader that raises a bad file's FlowerclfError in the main process, with its one-line message."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, FlowerclfError):
                raise batch
            yield batch


def loader(dataset, batch_size: int, num_workers: int, device: torch.device, collate_fn=default_collate,
           **kwargs) -> Loader:
    """Batches of `dataset`; with workers they persist across epochs and prefetch, and CUDA gets pinned memory."""
    return Loader(_ErrorsAsItems(dataset), batch_size=batch_size, num_workers=num_workers,
                  collate_fn=_Collate(collate_fn), pin_memory=device.type == "cuda",
                  persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None, **kwargs)
