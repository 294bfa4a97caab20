"""Export a train.py checkpoint to ONNX, for torch-free prediction with predict.py.

usage: python export.py CHECKPOINT [--out model.onnx]
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of export.py."""
    p = argparse.ArgumentParser(
        prog="export.py", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python export.py runs/lite0/checkpoint.pth && "
               "python predict.py rose.jpg runs/lite0/model.onnx\n")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pth made by train.py")
    p.add_argument("--out", metavar="FILE.onnx", help="output path (default: model.onnx beside the checkpoint)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, export; return the exit code."""
    args = build_parser().parse_args(argv)
    from data_utils import FlowerclfError
    import model_utils as mu

    try:
        out = mu.export_checkpoint_onnx(args.checkpoint, args.out)
    except (FlowerclfError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
