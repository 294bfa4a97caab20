"""CPU inference speed of candidate backbones: the feature pass train.py runs, per architecture.

usage: python benchmarks/bench_archs.py [--archs mobilenet_v3_large,resnet50,...] [--seconds 4]

Random weights (speed does not depend on their values, and nothing is downloaded);
torch in channels-last at batch 8 under inference mode, as torch_forward runs it.
Size and ImageNet accuracy are torchvision's published figures (weights.meta).
"""
import argparse
import os
import sys
import time

import torch
import torchvision


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowerclf.features.engines import torch_forward  # noqa: E402
from flowerclf.models.lite import EXTRA_ARCHS  # noqa: E402
from flowerclf.models.registry import ModelSpec, build_model  # noqa: E402

DEFAULT = "efficientnet_lite0,mobilenet_v3_large,efficientnet_b0,resnet18,densenet121,resnet50,convnext_tiny,vit_b_16"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=DEFAULT, help="comma-separated (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=4.0, help="timing per arch (default: %(default)s)")
    args = p.parse_args(argv)
    print(f"{'arch':20s} {'params M':>9s} {'ImageNet top-1':>15s} {'crop':>5s} {'img/s (CPU)':>12s}")
    for arch in args.archs.split(","):
        torch.manual_seed(0)
        model, pp = build_model(ModelSpec(arch, "none", [], 0.0, 2), load_pretrained=False)
        forward = torch_forward(model.backbone, torch.device("cpu"))
        x = torch.randn(8, 3, pp.crop_size, pp.crop_size)
        with torch.inference_mode():
            forward(x)
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < args.seconds:
                forward(x)
                n += len(x)
        rate = n / (time.perf_counter() - start)
        if arch in EXTRA_ARCHS:
            params, top1 = sum(p.numel() for p in model.backbone.parameters()) + 1000 * 1281, "75.1 (a)"
        else:
            meta = torchvision.models.get_model_weights(arch).DEFAULT.meta
            params, top1 = meta["num_params"], f"{meta['_metrics']['ImageNet-1K']['acc@1']:.1f}"
        print(f"{arch:20s} {params / 1e6:9.1f} {top1:>15s} {pp.crop_size:5d} {rate:12.1f}", flush=True)
    print("(a) EfficientNet-Lite0 as reported by its TensorFlow release (tensorflow/tpu, efficientnet/lite)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
