"""Report GPU and CPU memory, and find the batch size that fits, before training runs out of memory.

usage: python gpumemcheck.py [--arch NAME [--batch_size N | --find_batch_size]] [--json] [--watch SECONDS]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from flowerclf.base import cli
from flowerclf.base.errors import FlowerclfError

EXAMPLES = """examples:
  python gpumemcheck.py                                   # devices, this process, live tensors
  python gpumemcheck.py --arch resnet50 --batch_size 64   # peak memory of one training step
  python gpumemcheck.py --arch densenet121 --unfreeze 2 --amp --find_batch_size
  python gpumemcheck.py --json --watch 5

Without CUDA the step estimate and --find_batch_size are for this machine's RAM instead.
"""


def build_parser() -> cli.ArgumentParser:
    """The command-line interface of gpumemcheck.py."""
    p = cli.ArgumentParser("gpumemcheck.py", __doc__, EXAMPLES)
    p.add_argument("--arch", help="estimate a training step of this model (any train.py --arch)")
    p.add_argument("--batch_size", "--batch-size", type=cli.positive_int, default=32,
                   help="with --arch: batch size of the step to measure (default: %(default)s)")
    p.add_argument("--find_batch_size", "--find-batch-size", action="store_true",
                   help="with --arch: find the largest batch size that fits, minus a 10%% safety margin")
    p.add_argument("--unfreeze", type=cli.unfreeze, default=0, metavar="N|all",
                   help="with --arch: as train.py --unfreeze (default: 0, frozen backbone)")
    p.add_argument("--amp", action="store_true", help="with --arch: as train.py --amp")
    p.add_argument("--num_classes", "--num-classes", type=cli.positive_int, default=102,
                   help="with --arch: classes of the head (default: %(default)s)")
    cli.add_device_flags(p, ("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="print the report again every SECONDS")
    return p


def mib(n: float) -> str:
    return f"{n / 2 ** 20:,.0f} MiB"


def format_text(r: dict) -> str:
    """The human-readable report."""
    lines = []
    if not r["cuda"]:
        lines.append("no CUDA device: torch.cuda.is_available() is False (CPU figures only)")
    for d in r["cuda"]:
        lines.append(f"cuda:{d['index']} {d['name']}: total {mib(d['total'])}, free {mib(d['free'])}, "
                     f"used by others {mib(d['used_by_others'])}; this process: reserved {mib(d['reserved'])}, "
                     f"allocated {mib(d['allocated'])}, peak {mib(d['peak_allocated'])}")
    h = r["host"]
    lines.append(f"cpu: this process {mib(h['process_rss'])} resident; machine {mib(h['available'])} available "
                 f"of {mib(h['total'])}")
    est = r.get("estimate")
    if est:
        where = "GPU memory" if est["device"] == "cuda" else "RAM"
        lines.append(f"{est['arch']}, {est['step']}{', amp' if est['amp'] else ''} on {est['device']}:")
        if est.get("peak_bytes") is not None:
            above = " above the weights and optimizer state" if est["device"] == "cuda" else ""
            lines.append(f"  batch {est['batch_size']}: peak {mib(est['peak_bytes'])} of {where}{above}")
        elif "recommended_batch_size" not in est:
            lines.append(f"  batch {est['batch_size']}: does not fit ({where})")
        if "recommended_batch_size" in est:
            lines.append(f"  largest batch that fits: {est['largest_batch_size']}; "
                         f"use --batch_size {est['recommended_batch_size']} (10% margin)")
        if "per_image_seconds" in est:
            sizes = " and ".join(str(b) for b in est["measured_batch_sizes"])
            lines.append(f"  RAM figures are extrapolated from real steps of {sizes} images, not run at "
                         f"batch {est['batch_size']}; one such step would take about "
                         f"{est['per_image_seconds'] * est['batch_size']:,.1f} s on this CPU")
    lines.append("live tensors (device, dtype, shape: count, size):" if r["tensors"] else "live tensors: none")
    for t in r["tensors"][:15]:
        shape = str(tuple(t["shape"]))
        lines.append(f"  {t['device']:7s} {t['dtype']:9s} {shape:22s} x{t['count']:<5d} {mib(t['bytes'])}")
    if len(r["tensors"]) > 15:
        lines.append(f"  ... {len(r['tensors']) - 15} more groups (--json lists all)")
    return "\n".join(lines)


def estimate(args, step, what: str, device) -> dict:
    """Peak memory of `step`: measured on CUDA, modelled from two small real steps on the CPU."""
    from flowerclf.training import memory

    out = {"arch": args.arch, "device": device.type, "step": what, "amp": args.amp}
    if device.type == "cuda":
        peak = memory.cuda_step_peak(step, device)  # above weights + optimizer state (None: out of memory)
    else:
        model = memory.cpu_memory_model(step)
        available = memory.host_report()["available"]
        out.update(model)
        fixed, per_image = model["fixed_bytes"], model["per_image_bytes"]
        peak = lambda b: fixed + per_image * b if fixed + per_image * b <= available else None  # noqa: E731
    if args.find_batch_size:
        best = memory.largest_fitting(lambda b: peak(b) is not None)
        out.update(largest_batch_size=best, recommended_batch_size=memory.with_margin(best), batch_size=best,
                   peak_bytes=peak(best) if best else None)
    else:
        out.update(batch_size=args.batch_size, peak_bytes=peak(args.batch_size))
    return out


def report(args) -> dict:
    """Everything gpumemcheck prints, as plain data."""
    import torch

    from flowerclf.runtime.devices import resolve_device
    from flowerclf.training import memory

    r = {"cuda": [], "host": memory.host_report()}
    step = None
    if args.arch:
        device = resolve_device(args.device, args.gpu)
        step, what = memory.training_step(args.arch, args.num_classes, args.unfreeze, args.amp, device)
        r["estimate"] = estimate(args, step, what, device)
    if torch.cuda.is_available():  # after the step, so "this process: peak" includes it
        r["cuda"] = memory.cuda_report()
    r["tensors"] = memory.tensor_census()  # while `step` lives: the measured model and optimizer are counted
    del step
    return r


def watch(args: argparse.Namespace) -> None:
    """Print the report, again every --watch seconds until Ctrl-C."""
    if (args.find_batch_size or args.unfreeze or args.amp) and not args.arch:
        raise FlowerclfError("--find_batch_size, --unfreeze and --amp need --arch")
    if args.watch is not None and not args.watch > 0:
        raise FlowerclfError("--watch needs a positive number of seconds")
    if args.arch:
        from flowerclf.models.registry import resolve_weights
        resolve_weights(args.arch, "none")  # unknown arch: one line, before any work
    try:
        while True:
            r = report(args)
            print(json.dumps(r) if args.json else format_text(r), flush=True)
            if args.watch is None:
                return
            time.sleep(args.watch)
    except KeyboardInterrupt:  # how --watch is meant to end
        return


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, report (repeatedly with --watch); return the exit code."""
    return cli.run_main(build_parser(), argv, watch)


if __name__ == "__main__":
    sys.exit(main())
