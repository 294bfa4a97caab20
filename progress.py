"""Progress of long passes: a bar on rank 0's terminal, nothing on other ranks."""
from __future__ import annotations

from tqdm import tqdm

import ddp


def progress(iterable, desc: str, unit: str = "batch"):
    """A progress bar on rank 0's terminal; nothing elsewhere."""
    return tqdm(iterable, desc=desc, unit=unit, leave=False, disable=None if ddp.is_main() else True)
