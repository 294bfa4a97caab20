"""Export a train.py checkpoint to ONNX, for torch-free prediction with predict.py.

usage: python export.py CHECKPOINT [--out model.onnx]
"""
from __future__ import annotations

import argparse
import sys

from flowerclf.base import cli


def build_parser() -> cli.ArgumentParser:
    """The command-line interface of export.py."""
    p = cli.ArgumentParser("export.py", __doc__, "example:\n  python export.py runs/lite0/checkpoint.pth && "
                           "python predict.py rose.jpg runs/lite0/model.onnx\n")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pth made by train.py")
    p.add_argument("--out", metavar="FILE.onnx", help="output path (default: model.onnx beside the checkpoint)")
    return p


def run(args: argparse.Namespace) -> None:
    """Export the checkpoint and say where the file went."""
    from flowerclf.models.onnx import export_checkpoint

    print(f"wrote {export_checkpoint(args.checkpoint, args.out)}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, export; return the exit code."""
    return cli.run_main(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
