"""What --num_workers auto should pick on this machine: the frozen feature pass and fine-tuning, per worker count.

usage: python benchmarks/bench_workers.py DATA_DIR [--arch efficientnet_lite0] [--workers 0 1 2] [--images 256]
                                                   [--phone]

frozen:   the feature pass over the first N training images, on the engine train.py picks
          (ONNX Runtime on a CPU) at its feature batch size, through the input path train.py uses.
finetune: one epoch of --unfreeze all over the same images (batch 32, AdamW, augmentation).
--phone: on phone-size copies of the images instead (bench_photos.py's: 4032x3024, q90, some EXIF-turned,
in a temp folder), where decoding costs more than the backbone.
The worker counts run interleaved, --repeats times, and the best of each is printed (img/s),
so a machine that others share penalizes every count alike.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from torch import nn


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowerclf.data.folders import ImageSet, scan_split  # noqa: E402
from flowerclf.data.loaders import input_batches, make_loader  # noqa: E402
from flowerclf.data.transforms import create_transform  # noqa: E402
from flowerclf.features.engines import feature_forward, state_fingerprint  # noqa: E402
from flowerclf.features.passes import extract_features  # noqa: E402
from flowerclf.models.registry import ModelSpec, build_model  # noqa: E402
from flowerclf.models.stages import unfreeze_last  # noqa: E402
from flowerclf.runtime import devices  # noqa: E402
from flowerclf.training.loops import finetune_epoch  # noqa: E402


def frozen(images: ImageSet, arch: str, workers: int, device: torch.device) -> float:
    """img/s of the feature pass."""
    model, pp = build_model(ModelSpec(arch, "DEFAULT", [], 0.0, 2))
    forward, _ = feature_forward(model.backbone, arch, pp.crop_size, "auto", device, False,
                                          state_fingerprint(model.backbone), print)
    batches = input_batches(images, create_transform(pp), devices.resolve_feature_batch_size(0, device),
                                     workers, device)
    start = time.perf_counter()
    extract_features(forward, batches)
    return len(images) / (time.perf_counter() - start)


def finetune(images: ImageSet, arch: str, workers: int, device: torch.device) -> float:
    """img/s of one fine-tuning epoch of the whole network."""
    torch.manual_seed(0)
    model, pp = build_model(ModelSpec(arch, "DEFAULT", [64], 0.0, len(set(images.labels))))
    unfreeze_last(model.backbone, "all")
    devices.to_channels_last(model.to(device))
    loader = make_loader(images, create_transform(pp, augment=True), 32, workers, device, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    start = time.perf_counter()
    finetune_epoch(model, loader, optimizer, scheduler, scaler, nn.CrossEntropyLoss(), device, False)
    return len(images) / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", help="ImageFolder tree with train/")
    p.add_argument("--arch", default="efficientnet_lite0", help="backbone (default: %(default)s)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (default: 0 1 2)")
    p.add_argument("--images", type=int, default=256, help="training images used (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best counts (default: 2)")
    p.add_argument("--phone", action="store_true", help="run on phone-size copies of the images (default: off)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        return run(args, folder)


def run(args, folder: str) -> int:
    device = devices.resolve_device("auto")
    if args.phone:
        from bench_photos import phone_copies
        images = phone_copies(args.data_dir, args.images, folder)
    else:
        train = scan_split(os.path.join(args.data_dir, "train"))
        step = max(1, len(train) // args.images)  # every class, not just the first folders
        images = ImageSet(train.root, train.files[::step][:args.images], train.labels[::step][:args.images])
    print(f"{args.arch} on {device}, {devices.cpu_cores()} cores, {len(images)} images; auto picks "
          f"{devices.resolve_num_workers('auto', device)} workers", flush=True)
    best = {}
    for _ in range(args.repeats):
        for workers in args.workers:
            for name, bench in (("frozen", frozen), ("finetune", finetune)):
                rate = bench(images, args.arch, workers, device)
                print(f"  {name} {workers} workers: {rate:.1f} img/s", flush=True)
                best[name, workers] = max(rate, best.get((name, workers), 0.0))
    for name in ("frozen", "finetune"):
        print(f"{name:9s}" + "".join(f"  {w} workers {best[name, w]:7.1f} img/s" for w in args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
