"""What TensorBoard's event files cost a frozen run: train.py with and without them, in one process.

usage: python benchmarks/bench_tensorboard.py [DATA_DIR] [--arch efficientnet_lite0] [--epochs 20] [--repeats 3]

One warm-up run fills the feature store (the user's own, as train.py uses it); then runs with
and without TensorBoard alternate, each into a fresh save dir, and the medians are compared.
"Without" swaps the trainer's Board for one that writes nothing. The time spent inside Board
itself (scalars, images, flushes, SummaryWriter's start and close) is also summed, as a share of
the runs with it: the ratio of medians on a loaded machine is noisier than that share. In one
process torch.utils.tensorboard is imported once, while every train.py process pays for the
import: a fresh process measures it (after `import torch`, as in train.py), and it is added.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from flowerclf.training import tensorboard, trainer  # noqa: E402


class NoBoard(tensorboard.Board):
    """A Board that writes nothing."""

    def epoch(self, row: dict) -> None:
        pass

    def finish(self, *args) -> bool:
        return False


class TimedBoard(tensorboard.Board):
    """The real Board, its time summed in `spent`."""

    spent = [0.0]

    def epoch(self, row: dict) -> None:
        start = time.perf_counter()
        super().epoch(row)
        self.spent[0] += time.perf_counter() - start

    def finish(self, *args) -> bool:
        start = time.perf_counter()
        try:
            return super().finish(*args)
        finally:
            self.spent[0] += time.perf_counter() - start


def one_run(argv: list[str], board: type) -> float:
    """Seconds of one train.py run (its output swallowed) with this Board."""
    with tempfile.TemporaryDirectory() as save, mock.patch.object(trainer, "Board", board), \
            contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        code = train.main([*argv, "--save_dir", save])
        seconds = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"train.py failed with {code}")
        if board is TimedBoard and not os.listdir(os.path.join(save, "tensorboard")):
            raise SystemExit("no event files written")
    return seconds


IMPORT = ("import time, torch; start = time.perf_counter(); import torch.utils.tensorboard; "
          "print(time.perf_counter() - start)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", nargs="?", default="/work/shared/data/flowers5-dev",
                   help="an ImageFolder tree (default: %(default)s)")
    p.add_argument("--arch", default="efficientnet_lite0", help="backbone (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs with and without, each (default: %(default)s)")
    args = p.parse_args(argv)
    argv = [args.data_dir, "--arch", args.arch, "--epochs", str(args.epochs)]
    print(f"warm-up (fills the feature store): {one_run(argv, NoBoard):.1f}s", flush=True)
    times = {"with": [], "without": []}
    for i in range(args.repeats):
        for name, board in (("with", TimedBoard), ("without", NoBoard)) if i % 2 == 0 else \
                (("without", NoBoard), ("with", TimedBoard)):
            times[name].append(one_run(argv, board))
            print(f"  {name:<7} TensorBoard: {times[name][-1]:.2f}s", flush=True)
    with_, without = statistics.median(times["with"]), statistics.median(times["without"])
    imported = statistics.median(float(subprocess.run([sys.executable, "-c", IMPORT], capture_output=True,
                                                      text=True, check=True).stdout) for _ in range(3))
    inside = TimedBoard.spent[0] / args.repeats + imported
    print(f"median with {with_:.2f}s, without {without:.2f}s: {with_ / without:.3f}x; inside Board "
          f"{TimedBoard.spent[0] / args.repeats:.3f}s a run + importing torch.utils.tensorboard {imported:.3f}s "
          f"= {100 * inside / with_:.2f}% of a run with it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
