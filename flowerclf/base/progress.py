"""Progress of long passes: a bar on rank 0's terminal, a line every ~10 s in a log, nothing on other ranks.

Torch-free: the rank comes from torchrun's environment (RANK), which is set before any process group.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator

from tqdm import tqdm

LOG_EVERY_S = 10.0


def progress(iterable: Iterable, desc: str, unit: str = "batch") -> Iterable:
    """`iterable`, reporting how far it got: tqdm's bar on a terminal, plain lines when stderr is a file."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return iterable
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, unit=unit, leave=False)
    return _log_lines(iterable, desc, unit)


def _log_lines(iterable: Iterable, desc: str, unit: str) -> Iterator:
    """tqdm in a log is one growing line of carriage returns; this writes a readable line now and then."""
    total = len(iterable) if hasattr(iterable, "__len__") else None
    start = last = time.monotonic()
    for done, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if now - last >= LOG_EVERY_S:
            last = now
            print(f"{desc}: {unit} {done}{f'/{total}' if total else ''}, {now - start:.0f}s", file=sys.stderr,
                  flush=True)
