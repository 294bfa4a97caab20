"""Side by side in one process: the classic training loop, our default train.py, and the floor.

usage: python benchmarks/bench_train.py DATA_DIR [--arch efficientnet_lite0] [--epochs 5]

classic: the frozen backbone runs again on every image in every epoch (MLP head of 500
         hidden units + dropout 0.2, Adam lr 0.003, batch 64, RandomRotation(30) +
         RandomResizedCrop + flip, validation once per epoch), then the test split.
ours:    train with train.py's defaults (--engine auto: ONNX Runtime on a CPU), in an empty
         save dir with an empty feature store (every image goes through the backbone and into
         the store; the exported backbone is cached per user, so the first run ever on a machine
         also pays for the export, which this prints separately).
torch:   the same with --engine torch.
floor:   one inference pass over train + valid + test at the best batch size, on the faster engine
         (ONNX Runtime is only tried on a CPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from unittest import mock

import torch
from torch import nn
from torchvision import transforms as T


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowerclf.data.folders import ImageSet, scan_data_dir, scan_split  # noqa: E402
from flowerclf.data.loaders import ImageDataset, make_loader  # noqa: E402
from flowerclf.data.transforms import create_transform  # noqa: E402
from flowerclf.features import store  # noqa: E402
from flowerclf.features.engines import feature_forward, state_fingerprint  # noqa: E402
from flowerclf.features.passes import extract_features  # noqa: E402
from flowerclf.models.onnx import export_module  # noqa: E402
from flowerclf.models.registry import ModelSpec, build_model, freeze  # noqa: E402
from flowerclf.runtime import devices  # noqa: E402
from flowerclf.training.config import TrainConfig  # noqa: E402
from flowerclf.training.trainer import train  # noqa: E402


def classic(data_dir: str, arch: str, epochs: int, device: torch.device) -> dict:
    """The loop of the classic flower-classifier project, faithfully: model.train() and all."""
    torch.manual_seed(0)
    splits = scan_data_dir(data_dir)
    n_classes = len(splits["train"].class_to_idx)
    model, pp = build_model(ModelSpec(arch, "DEFAULT", [], 0.0, n_classes))
    freeze(model.backbone)
    model.head = nn.Sequential(nn.Linear(model.head[-1].in_features, 500), nn.ReLU(), nn.Dropout(0.2),
                               nn.Linear(500, n_classes), nn.LogSoftmax(dim=1))
    model.to(device)
    interp = T.InterpolationMode(pp.interpolation)
    augment = T.Compose([T.RandomRotation(30), T.RandomResizedCrop(pp.crop_size, interpolation=interp),
                         T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(pp.mean, pp.std)])
    plain = T.Compose([T.Resize(pp.resize_size, interpolation=interp), T.CenterCrop(pp.crop_size),
                       T.ToTensor(), T.Normalize(pp.mean, pp.std)])
    loader = lambda s, t, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        ImageDataset(s.files, s.labels, t), batch_size=64, shuffle=shuffle)
    train, valid = loader(splits["train"], augment, True), loader(splits["valid"], plain, False)
    criterion = nn.NLLLoss()
    optimizer = torch.optim.Adam(model.head.parameters(), lr=0.003)

    def accuracy(data):
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in data:
                correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        return correct / len(data.dataset)

    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for x, y in train:
            optimizer.zero_grad()
            loss = criterion(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
        valid_acc = accuracy(valid)
        print(f"  classic epoch {epoch + 1}: valid acc {100 * valid_acc:.2f}%", flush=True)
    test_acc = accuracy(loader(splits["test"], plain, False)) if "test" in splits else float("nan")
    return {"seconds": time.perf_counter() - start, "valid_acc": valid_acc, "test_acc": test_acc}


def ours(data_dir: str, arch: str, epochs: int, engine_name: str = "auto") -> dict:
    """train.py's defaults, an empty feature store (the user's exported backbones kept)."""
    exports = os.path.join(store.store_dir(), "onnx")
    os.makedirs(exports, exist_ok=True)
    with tempfile.TemporaryDirectory() as save, mock.patch.dict(os.environ, FLOWERCLF_STORE=save):
        os.symlink(exports, os.path.join(save, "onnx"))
        start = time.perf_counter()
        result = train(TrainConfig(data_dir=data_dir, save_dir=save, arch=arch, epochs=epochs,
                                                     engine=engine_name),
                                log=lambda line: print(f"  {engine_name}", line, flush=True))
        seconds = time.perf_counter() - start
    m = result["metrics"]
    return {"seconds": seconds, "valid_acc": m["valid_acc"], "test_acc": m.get("test_acc", float("nan"))}


def floor(data_dir: str, arch: str, device: torch.device) -> dict:
    """One inference pass over every image with the fastest engine and batch size of a quick probe."""
    splits = scan_data_dir(data_dir)
    model, pp = build_model(ModelSpec(arch, "DEFAULT", [], 0.0, 2))
    everything = ImageSet("all", sum((s.files for s in splits.values()), []),
                             sum((s.labels for s in splits.values()), []))
    probe = ImageSet("probe", everything.files[:192], everything.labels[:192])
    fingerprint = state_fingerprint(model.backbone)
    engines = ("torch", "onnxruntime") if device.type == "cpu" else ("torch",)  # ONNX Runtime runs on the CPU
    forwards = {name: feature_forward(model.backbone, arch, pp.crop_size, name, device, False, fingerprint,
                                               print)[0] for name in engines}
    rates = {}
    for name, forward in forwards.items():
        for bs in (4, 8, 16, 32, 64):
            loader = make_loader(probe, create_transform(pp), bs, 0, device)
            t = time.perf_counter()
            extract_features(forward, loader)
            rates[name, bs] = len(probe) / (time.perf_counter() - t)
    name, bs = max(rates, key=rates.get)
    loader = make_loader(everything, create_transform(pp), bs, 0, device)
    start = time.perf_counter()
    extract_features(forwards[name], loader)
    return {"seconds": time.perf_counter() - start, "batch_size": bs, "engine": name, "images": len(everything)}


def export_seconds(arch: str) -> float:
    """What the first run on a machine pays once to export the backbone to ONNX."""
    model, pp = build_model(ModelSpec(arch, "DEFAULT", [], 0.0, 2))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export_module(model.backbone, os.path.join(tmp, "backbone.onnx"), pp.crop_size)
        return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", help="ImageFolder tree with train/, valid/, test/")
    p.add_argument("--arch", default="efficientnet_lite0", help="backbone (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="epochs for both loops (default: %(default)s)")
    p.add_argument("--skip_classic", action="store_true", help="leave out the (slow) classic loop")
    args = p.parse_args(argv)
    device = devices.resolve_device("auto")
    n_train = len(scan_split(os.path.join(args.data_dir, "train")))
    print(f"{args.arch}, {args.epochs} epochs, {device}, {torch.get_num_threads()} threads", flush=True)
    results = {} if args.skip_classic else {"classic": classic(args.data_dir, args.arch, args.epochs, device)}
    ours(args.data_dir, args.arch, 1)  # warm-up: the exported backbone lands in the per-user cache
    results["ours"] = ours(args.data_dir, args.arch, args.epochs)
    results["torch"] = ours(args.data_dir, args.arch, args.epochs, "torch")
    fl = floor(args.data_dir, args.arch, device)
    export = export_seconds(args.arch)
    print(f"\n{'loop':8s} {'wall s':>8s} {'train img/s':>12s} {'valid acc':>10s} {'test acc':>9s}")
    for name, r in results.items():
        print(f"{name:8s} {r['seconds']:8.1f} {args.epochs * n_train / r['seconds']:12.1f} "
              f"{100 * r['valid_acc']:9.2f}% {100 * r['test_acc']:8.2f}%")
    print(f"floor    {fl['seconds']:8.1f}  (one pass over {fl['images']} images, {fl['engine']}, "
          f"batch {fl['batch_size']})")
    print(f"one-time ONNX export of the backbone: {export:.1f}s")
    o, t = results["ours"]["seconds"], results["torch"]["seconds"]
    if "classic" in results:
        print(f"\nours is {results['classic']['seconds'] / o:.1f}x faster than classic")
    print(f"ours (--engine auto) is {t / o:.2f}x faster than --engine torch "
          f"({t / (o + export):.2f}x counting the one-time export); ours is {o / fl['seconds']:.2f}x the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
