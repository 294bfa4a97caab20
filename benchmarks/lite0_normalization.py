"""Which input scaling do the efficientnet_lite0 weights want? Measured from their BatchNorm.

usage: python benchmarks/lite0_normalization.py DATA_DIR [--images 200]

The first BatchNorm stores the running mean/variance of the stem convolution's output
over the inputs the weights were trained on. Feed real photos scaled each way and
compare: the right scaling gives a variance ratio near 1.
"""
import argparse
import os
import random
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowerclf.data.folders import scan_split  # noqa: E402
from flowerclf.data.images import load_rgb  # noqa: E402
from flowerclf.data.transforms import Preprocess, preprocess_image  # noqa: E402
from flowerclf.models.registry import (
    build_imagenet_model,
    pretrained_state,
    resolve_weights,
)

SCALINGS = {"mean=std=0.5 (TF-Lite)": ((0.5,) * 3, (0.5,) * 3),
            "ImageNet mean/std": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", help="an ImageFolder tree with train/")
    p.add_argument("--images", type=int, default=200, help="photos to use (default: %(default)s)")
    args = p.parse_args(argv)
    files = scan_split(os.path.join(args.data_dir, "train")).files
    random.Random(0).shuffle(files)
    weights = resolve_weights("efficientnet_lite0", "DEFAULT")
    model = build_imagenet_model("efficientnet_lite0", weights)
    model.load_state_dict(pretrained_state("efficientnet_lite0", weights, model))
    model.eval()
    images = [load_rgb(f) for f in files[:args.images]]
    for name, (mean, std) in SCALINGS.items():
        pp = Preprocess(256, 224, mean, std, "bicubic")
        x = torch.stack([torch.from_numpy(preprocess_image(img, pp)) for img in images])
        with torch.inference_mode():
            var = model.conv_stem(x).var(dim=(0, 2, 3))
        ratio = (var / model.bn1.running_var).median().item()
        print(f"{name:24s} median(batch var / running var) = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
