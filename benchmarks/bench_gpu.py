"""The CUDA path against the machine's floors, in one run: decoding, the backbone, and what train.py achieves.

usage: python benchmarks/bench_gpu.py DATA_DIR [--big] [--arch efficientnet_lite0]

--big re-encodes every photo at 500x667 (the size of Flowers-102's JPEGs) into a temporary
folder first. Floors: PIL decode + resize + crop with 0 and N workers (N = --num_workers
auto), nvjpeg batch decode + resize + crop + normalize on the GPU (bytes already in memory),
the backbone's forward at batch 256 in fp32 and bf16, forward + backward in fp32 and bf16.
Ours: the frozen feature pass as train.py runs it (fp32), fine-tuning --unfreeze all (fp32
and --amp) epoch 1 and the steady epochs (train + valid images per second), peak GPU memory.
Each of ours is also given as a fraction of the floor that binds it (the slower of its
input and its compute). Without CUDA it says so in one line and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowerclf.data.folders import ImageSet, scan_data_dir  # noqa: E402
from flowerclf.data.images import load_rgb  # noqa: E402
from flowerclf.data.loaders import (
    decode_batch,
    input_batches,
    jpeg_orientation,
    make_loader,
)
from flowerclf.data.transforms import create_transform  # noqa: E402
from flowerclf.features.engines import torch_forward  # noqa: E402
from flowerclf.features.passes import extract_features, sharded_features  # noqa: E402
from flowerclf.models.registry import ModelSpec, build_model  # noqa: E402
from flowerclf.runtime import devices  # noqa: E402
from flowerclf.training.config import TrainConfig  # noqa: E402
from flowerclf.training.trainer import train  # noqa: E402

BIG = (500, 667)  # width, height


def reencode(data_dir: str, out: str) -> str:
    """A copy of DATA_DIR's tree with every photo resized to 500x667 and saved as a JPEG."""
    jobs = []
    for split, images in scan_data_dir(data_dir).items():
        for f in images.files:
            jobs.append((f, os.path.join(out, split, os.path.relpath(f, images.root))))

    def one(job):
        src, dst = job
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        load_rgb(src).resize(BIG, Image.BICUBIC).save(os.path.splitext(dst)[0] + ".jpg", quality=90)
    with ThreadPoolExecutor(devices.cpu_cores()) as pool:
        list(pool.map(one, jobs))
    return out


def timed(work, images: int, device: torch.device) -> float:
    """img/s of `work()` over `images` images, the device's queue drained at both ends."""
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)


def floors(everything: ImageSet, arch: str, workers: int, device: torch.device) -> dict[str, float]:
    """img/s the machine allows: input (PIL with 0 / N workers, nvjpeg) and compute (forward, forward + backward)."""
    model, pp = build_model(ModelSpec(arch, "DEFAULT", [], 0.0, 5))
    out = {}
    for w in (0, workers):
        loader = make_loader(everything, create_transform(pp), 128, w, torch.device("cpu"))
        out[f"PIL decode, {w} workers"] = timed(lambda: sum(1 for _ in loader), len(everything), device)
    items = [(f, torch.frombuffer(bytearray(open(f, "rb").read()), dtype=torch.uint8), 1, 0)
             for f in everything.files]
    items = [item for item in items if jpeg_orientation(item[1].numpy().tobytes()) is not None]
    batches = [items[i:i + 128] for i in range(0, len(items), 128)]
    decode_batch(batches[0], pp, device)  # nvjpeg's handles and buffers are made on first use
    out["nvjpeg decode"] = timed(lambda: [decode_batch(b, pp, device) for b in batches], len(items), device)
    backbone = devices.to_channels_last(model.backbone.to(device))
    x = torch.randn(256, 3, pp.crop_size, pp.crop_size, device=device).contiguous(memory_format=torch.channels_last)
    for amp, name in ((False, "fp32"), (True, "bf16")):
        def forward():
            with torch.inference_mode(), devices.autocast(device, amp):
                backbone(x)

        def step():
            with devices.autocast(device, amp):
                backbone(x).float().sum().backward()
        for work, what in ((forward, "forward"), (step, "forward+backward")):
            work()  # cuDNN autotuning
            out[f"{what} {name}"] = timed(lambda: [work() for _ in range(10)], 10 * len(x), device)
    return out


def ours(data_dir: str, everything: ImageSet, arch: str, workers: int, device: torch.device) -> dict:
    """img/s of the frozen pass and of fine-tuning epochs as train.py runs them, and peak GPU memory."""
    model, pp = build_model(ModelSpec(arch, "DEFAULT", [], 0.0, 5))
    batch = devices.resolve_feature_batch_size(0, device)
    forward = torch_forward(model.backbone.to(device), device, batch_size=batch)
    warm = ImageSet(everything.root, everything.files[:2 * batch], everything.labels[:2 * batch])
    extract_features(forward, input_batches(warm, create_transform(pp), batch, workers,
                                                                device))  # cuDNN autotuning, as a run's first batch
    out = {"frozen feature pass": timed(lambda: sharded_features(
        forward, everything, create_transform(pp), batch, workers, device, "frozen"), len(everything), device)}
    for amp in (False, True):
        torch.cuda.reset_peak_memory_stats(device)
        with tempfile.TemporaryDirectory() as save:
            result = train(TrainConfig(data_dir=data_dir, save_dir=save, arch=arch, epochs=3,
                                                         unfreeze="all", amp=amp, device=device.type),
                                    log=lambda line: None)
        splits = scan_data_dir(data_dir)
        n = len(splits["train"]) + len(splits["valid"])
        seconds = [h["seconds"] for h in result["history"]]
        name = "fine-tune" + (" --amp" if amp else " fp32")
        out[f"{name}, epoch 1"] = n / seconds[0]
        out[f"{name}, steady"] = n / (sum(seconds[1:]) / len(seconds[1:]))
        out[f"{name}, peak GPU GiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def binding(name: str, fl: dict, workers: int) -> tuple[str, float]:
    """The floor that limits `name`: the slower of its input path and its compute."""
    if name.startswith("frozen"):
        options = ("nvjpeg decode", "forward fp32")
    else:
        options = (f"PIL decode, {workers} workers", "forward+backward " + ("bf16" if "--amp" in name else "fp32"))
    floor = min(options, key=fl.get)
    return floor, fl[floor]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", help="ImageFolder tree with train/, valid/ (and test/)")
    p.add_argument("--big", action="store_true", help="re-encode the photos at 500x667 first (Flowers-102's size)")
    p.add_argument("--arch", default="efficientnet_lite0", help="backbone (default: %(default)s)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here, nothing measured")
        return 0
    device = torch.device("cuda")
    devices.enable_cudnn_autotune(device)
    workers = devices.resolve_num_workers("auto", device)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = reencode(args.data_dir, tmp) if args.big else args.data_dir
        splits = scan_data_dir(data_dir)
        everything = ImageSet(data_dir, sum((s.files for s in splits.values()), []),
                                 sum((s.labels for s in splits.values()), []))
        print(f"{torch.cuda.get_device_name(device)}, {devices.cpu_cores()} cores, torch {torch.__version__}, "
              f"{args.arch}, {len(everything)} images{' at 500x667' if args.big else ''}, {workers} workers",
              flush=True)
        fl = floors(everything, args.arch, workers, device)
        mine = ours(data_dir, everything, args.arch, workers, device)
    print(f"\n{'floor':36s} {'img/s':>9s}")
    for name, rate in fl.items():
        print(f"{name:36s} {rate:9.0f}")
    print(f"\n{'ours':36s} {'img/s':>9s}  fraction of the floor that binds it")
    for name, rate in mine.items():
        if name.endswith("GiB"):
            print(f"{name:36s} {rate:9.2f}")
            continue
        floor, limit = binding(name, fl, workers)
        print(f"{name:36s} {rate:9.0f}  {rate / limit:5.0%} of {floor} ({limit:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
