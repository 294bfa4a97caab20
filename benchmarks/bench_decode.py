"""The tensor input path (decode_jpeg + tensor resize/crop) against the PIL path, on real photos, on the CPU.

usage: python benchmarks/bench_decode.py DATA_DIR [--arch efficientnet_lite0] [--limit N]

Prints, over every image of DATA_DIR's splits (or the first N): the mean difference of the
normalized inputs, the cosine similarity of the backbone's features from each path (min,
1st percentile, median), how often the ImageNet top-1 class agrees, and each path's
decode + preprocess speed in the main process (img/s).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowerclf.data.folders import ImageSet, scan_data_dir  # noqa: E402
from flowerclf.data.loaders import JpegBatches, jpeg_orientation, make_loader  # noqa: E402
from flowerclf.data.transforms import create_transform  # noqa: E402
from flowerclf.features.engines import torch_forward  # noqa: E402
from flowerclf.models.registry import (
    _final_layer,
    build_imagenet_model,
    default_preprocess,
    pretrained_state,
    resolve_weights,
)

CPU = torch.device("cpu")


def inputs(batches) -> tuple[torch.Tensor, float]:
    """All normalized images of `batches`, and the seconds it took."""
    start = time.perf_counter()
    x = torch.cat([x for x, _ in batches])
    return x, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", help="ImageFolder tree (train/, valid/, test/)")
    p.add_argument("--arch", default="efficientnet_lite0", help="backbone with ImageNet weights (default: %(default)s)")
    p.add_argument("--limit", type=int, default=0, help="only the first N images (default: all)")
    args = p.parse_args(argv)
    splits = scan_data_dir(args.data_dir)
    files = sum((s.files for s in splits.values()), [])[:args.limit or None]
    images = ImageSet(args.data_dir, files, [0] * len(files))
    weights = resolve_weights(args.arch, "DEFAULT")
    net = build_imagenet_model(args.arch, weights)
    net.load_state_dict(pretrained_state(args.arch, weights, net))
    pp = default_preprocess(args.arch, weights)
    on_tensors = sum(jpeg_orientation(open(f, "rb").read()) is not None for f in files)
    print(f"{len(files)} images ({on_tensors} on the tensor path), {args.arch}, {pp}", flush=True)

    ours, t_ours = inputs(JpegBatches(images, pp, 32, 0, CPU))
    theirs, t_theirs = inputs(make_loader(images, create_transform(pp), 32, 0, CPU))
    pre_logits = []  # the backbone's features are the input of the ImageNet layer that build_model strips
    _final_layer(net)[1].register_forward_hook(lambda module, args, out: pre_logits.append(args[0].float()))
    classify = torch_forward(net, CPU)
    cosine, same = [], 0
    with torch.inference_mode():
        for i in range(0, len(files), 32):
            la, lb = classify(ours[i:i + 32]), classify(theirs[i:i + 32])
            cosine.append(torch.nn.functional.cosine_similarity(pre_logits[-2], pre_logits[-1]))
            same += (la.argmax(1) == lb.argmax(1)).sum().item()
    cosine = torch.cat(cosine)
    print(f"inputs: mean |difference| {(ours - theirs).abs().mean():.5f} (normalized units), "
          f"max {(ours - theirs).abs().max():.4f}")
    print(f"features: cosine min {cosine.min():.5f}, 1st percentile {cosine.quantile(0.01):.5f}, "
          f"median {cosine.median():.6f}; ImageNet top-1 agrees on {same}/{len(files)} = "
          f"{100 * same / len(files):.2f}%")
    print(f"decode + preprocess, main process: tensor path {len(files) / t_ours:.0f} img/s, "
          f"PIL path {len(files) / t_theirs:.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
