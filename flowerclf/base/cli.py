"""The command-line edge every script shares: argparse types and flags, and errors turned into one line.

Torch-free, so the inference-only install (predict.py with a model.onnx) can use it.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import math
import os
import re
import shutil
import sys
from typing import Callable

from flowerclf.base.errors import FlowerclfError
from flowerclf.base.schema import DEVICES

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with control characters (terminal escapes included) shown as \\xNN; newlines and tabs kept."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def _initials(flag: str) -> str:
    """--learning_rate -> lr: what people type for a long flag."""
    return "".join(word[0] for word in flag.lstrip("-").replace("-", "_").split("_") if word)


def suggest(typed: str, known: list[str]) -> str | None:
    """The flag someone meant by `typed` (--epoh, --batchsize, --lr), or None."""
    bare = typed.split("=", 1)[0]
    by_initials = [k for k in known if k.startswith("--") and "_" in k and _initials(k) == bare.lstrip("-")]
    if by_initials:
        return by_initials[0]
    close = difflib.get_close_matches(bare, known, n=1, cutoff=0.7)
    return close[0] if close else None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with our edge: a bad argument is one `error:` line and exit 2, like every other error.

    No abbreviations (`--epoch 1` is not `--epochs 1`), and an unknown flag gets the closest known one.
    """

    def __init__(self, prog: str, doc: str = "", epilog: str | None = None, **kwargs):
        kwargs.setdefault("description", doc.splitlines()[0] if doc else None)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(prog=prog, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            known = [s for action in self._actions for s in action.option_strings]
            hints = [f"did you mean {hint}?" for typed in message.split(": ", 1)[1].split()
                     if typed.startswith("--") and (hint := suggest(typed, known))]
            message = "; ".join([message] + hints)
        raise FlowerclfError(f"{message} (see {self.prog} --help)")


def whole_number(value: str, least: int = 0) -> int:
    """argparse type: a whole number, at least `least`."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"{n} is less than {least}")
    return n


def positive_int(value: str) -> int:
    """argparse type: a whole number, 1 or more."""
    return whole_number(value, 1)


def unfreeze(value: str) -> int | str:
    """argparse type of --unfreeze: a number of backbone stages, or 'all'."""
    return value if value == "all" else whole_number(value)


def auto_or_whole(value: str) -> int | str:
    """argparse type of --num_workers: 'auto' or a whole number."""
    return value if value == "auto" else whole_number(value)


def probability(value: str) -> float:
    """argparse type: a number from 0 to 1."""
    try:
        p = float(value)
    except ValueError:
        p = math.nan
    if not 0 <= p <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability from 0 to 1, got {value!r}")
    return p


def add_workers_flag(parser: argparse.ArgumentParser) -> None:
    """--num_workers, the same in every script that decodes images (devices.resolve_num_workers decides auto)."""
    parser.add_argument("--num_workers", "--num-workers", type=auto_or_whole, default="auto", metavar="N|auto",
                        help="image-decoding worker processes; auto: on a CPU, one a core for photos of 2 MP and up "
                             "(decoding them outweighs the backbone), else 0 with under 8 cores (the backbone uses "
                             "them all); all cores but one (up to 16) with CUDA (default: %(default)s)")


def add_device_flags(parser: argparse.ArgumentParser, choices: tuple[str, ...] = DEVICES) -> None:
    """--gpu and --device, with the same meaning in every script (resolve_device checks the pair)."""
    parser.add_argument("--gpu", action="store_true", help="run on CUDA; fails if there is no CUDA device")
    order = ", then ".join(c.upper() for c in ("cuda", "mps", "cpu") if c in choices)
    parser.add_argument("--device", choices=choices, default="auto",
                        help=f"device to run on; auto picks {order} (default: %(default)s)")


def add_answer_flags(parser: argparse.ArgumentParser) -> None:
    """--top_k, --category_names and --min_confidence, for the scripts that answer "which flower?" (predict.py,
    serve.py)."""
    parser.add_argument("--top_k", "--top-k", type=positive_int, default=5,
                        help="how many classes each answer names (default: %(default)s)")
    parser.add_argument("--category_names", "--category-names", metavar="JSON",
                        help="JSON file mapping class folder names to display names, e.g. cat_to_name.json")
    parser.add_argument("--min_confidence", "--min-confidence", type=probability, metavar="P",
                        help="mark answers whose top probability is below P (0 to 1) as 'not sure' (default: the "
                             "threshold train.py chose on the validation split, kept in the model; none for models "
                             "made before it)")


def error_line(message: str) -> str:
    """`error: message`, prefixed with the rank under torchrun so a multi-process log says who failed."""
    rank = f"[rank {os.environ.get('RANK', '?')}] " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
    return f"{rank}error: {printable(message)}"


def _os_error(e: OSError) -> str:
    """An OSError as one line naming the file; a full disk also says how much space is left."""
    where = e.filename or ""
    text = f"{where}: {e.strerror or e}" if where else str(e.strerror or e)
    if e.errno == errno.ENOSPC and where:
        folder = os.path.dirname(os.path.abspath(str(where)))
        try:
            text += f" ({shutil.disk_usage(folder).free / 2 ** 20:,.1f} MiB free in {folder}); free some space"
        except OSError:
            pass
    return text


def run_main(parser: argparse.ArgumentParser, argv: list[str] | None, work: Callable[[argparse.Namespace], int | None],
             interrupted: Callable[[argparse.Namespace], str] | None = None) -> int:
    """Parse `argv`, run `work(args)` (None for 0, or an exit code); every failure becomes one `error:` line.

    FlowerclfError (bad arguments included) -> its exit code (2 bad input, 1 failed run); OSError -> 2;
    a closed stdout (`| head`) -> 1 quietly; Ctrl-C -> 130 with `interrupted(args)` as the advice.
    """
    args = None
    try:
        args = parser.parse_args(argv)
        return work(args) or 0
    except FlowerclfError as e:
        print(error_line(str(e)), file=sys.stderr)
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            # a torchrun rank that failed: its line is out; leave now, so the process group torn down at
            # interpreter exit, with a peer still inside a collective, cannot abort the process (SIGABRT)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.exit_code)
        return e.exit_code
    except BrokenPipeError:
        # the reader went away: point stdout at nothing so the interpreter's final flush cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as e:
        print(error_line(_os_error(e)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        advice = interrupted(args) if interrupted and args is not None else ""
        print("\ninterrupted" + (f": {advice}" if advice else ""), file=sys.stderr)
        return 130
