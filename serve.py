"""Serve a trained model on a local web page: drop photos, see their top-k names; POST /predict for programs.

usage: python serve.py CHECKPOINT|model.onnx [--port 8000] [--host 127.0.0.1]
"""
from __future__ import annotations

import argparse
import sys

from flowerclf.base import cli

EXAMPLES = """examples:
  python serve.py runs/lite0/model.onnx                      # then open http://127.0.0.1:8000/
  python serve.py runs/lite0/checkpoint.pth --category_names cat_to_name.json --top_k 3
  python serve.py runs/lite0/model.onnx --port 0             # any free port; the URL is printed
  curl -F file=@rose.jpg -F file=@tulip.jpg http://127.0.0.1:8000/predict

POST /predict takes a multipart/form-data upload of one or more files and answers with
predict.py --json's list; an unreadable photo gets a 4xx answer with {"error": "..."}.
Bound to 127.0.0.1 (the default), it answers only to Host 127.0.0.1, localhost or [::1], and refuses
uploads that a page of another site (an Origin other than its own) posts.
"""


def port(value: str) -> int:
    """argparse type: a TCP port, 0 for any free one."""
    n = cli.whole_number(value)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"{n} is not a port (0 to 65535)")
    return n


def build_parser() -> cli.ArgumentParser:
    """The command-line interface of serve.py."""
    p = cli.ArgumentParser("serve.py", __doc__, EXAMPLES)
    p.add_argument("model", metavar="CHECKPOINT", help="checkpoint.pth (torch) or model.onnx (ONNX Runtime, no torch)")
    p.add_argument("--port", type=port, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but 127.0.0.1, localhost or ::1 is reachable from other "
                        "machines and prints a warning (default: %(default)s)")
    cli.add_answer_flags(p)
    p.add_argument("--max_upload_mb", "--max-upload-mb", type=cli.positive_int, default=20, metavar="MB",
                   help="largest request body accepted; a bigger upload gets 413 (default: %(default)s)")
    p.add_argument("--max_files", "--max-files", type=cli.positive_int, default=64, metavar="N",
                   help="most files in one POST /predict; a request with more parts gets 413 before any is "
                        "decoded (default: %(default)s)")
    cli.add_device_flags(p)
    return p


def run(args: argparse.Namespace) -> None:
    """Load the model, then serve until Ctrl-C."""
    from flowerclf.data.folders import load_category_names
    from flowerclf.serving.app import App, serve
    from flowerclf.serving.predictor import Predictor

    predictor = Predictor.load(args.model, args.device, args.gpu)
    if args.min_confidence is not None:
        predictor.threshold = args.min_confidence
    app = App(predictor, args.model, args.top_k, load_category_names(args.category_names), args.max_upload_mb * 2 ** 20,
              args.max_files)
    serve(app, args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the model, serve; return the exit code."""
    return cli.run_main(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
