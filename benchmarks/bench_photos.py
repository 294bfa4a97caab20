"""Real photos at the backbone's speed: decode floors, the backbone floor and the cold feature pass, old way and new.

usage: python benchmarks/bench_photos.py DATA_DIR [--limit 130] [--arch efficientnet_lite0] [--num_workers auto]
                                                  [--rule draft2]
       python benchmarks/bench_photos.py DATA_DIR --agreement [--checkpoint CKPT] [--limit 130] [--rule draft2]

First it makes phone-size copies of N photos of DATA_DIR (spread over its splits and classes):
each centre-cropped to 4:3, upscaled to 4032x3024 and saved as JPEG q90, every fourth one stored
turned with EXIF orientation 6 and every fourth+2 with 8 (as phones do), in a temp folder.
Then, in one run, side by side in img/s, the old way (full decode: Preprocess.decode "full", with the
--num_workers the old auto rule gave: 0 on a CPU below 8 cores) and the new (`--rule`, new models'
"draft2" unless told, data.transforms.decode_size, with today's auto, a worker a core for photos this
large), and the full-decode pass at the new worker count, for reference:
- decode floor: PIL open + exif_transpose + decode + resize and crop, one process;
- backbone floor: the backbone's forward alone on ONNX Runtime, on tensors decoded beforehand;
- cold feature pass: a FeaturePass (ONNX Runtime, a fresh store) over the copies;
- fine-tuning epochs 1 and 2 with --unfreeze 1 (training/plans.finetune_plan, a fresh store): the old way
  decodes every photo in full every epoch; the new one draft-decodes each photo once, in epoch 1, which
  writes its working-size copy (features/copies.py), and epoch 2 reads the copies; then epoch 2's input
  alone (the same loader without the model), since on a CPU the training step bounds the epoch.
Each function of ROWS measures one or more rows.
--agreement instead compares the eval transform's features of both decodes on the copies
(cosine of the backbone's features, ImageNet top-1 and a checkpoint's top-1), the issue's acceptance 2.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowerclf.data.folders import ImageSet, scan_data_dir  # noqa: E402
from flowerclf.data.images import load_rgb, typical_pixels  # noqa: E402
from flowerclf.data.loaders import make_loader  # noqa: E402
from flowerclf.data.transforms import (Preprocess, create_transform, decode_size, preprocess_image,  # noqa: E402
                                       resize_center_crop)
from flowerclf.features import store, upkeep  # noqa: E402
from flowerclf.features.copies import working_copies  # noqa: E402
from flowerclf.features.engines import onnx_forward, state_fingerprint, torch_forward  # noqa: E402
from flowerclf.features.passes import FeaturePass  # noqa: E402
from flowerclf.models.checkpoints import load_model  # noqa: E402
from flowerclf.models.registry import (ModelSpec, _final_layer, build_imagenet_model, build_model,  # noqa: E402
                                       pretrained_state, resolve_weights)
from flowerclf.runtime.devices import resolve_feature_batch_size, resolve_num_workers  # noqa: E402
from flowerclf.training.config import TrainConfig  # noqa: E402
from flowerclf.training.plans import finetune_plan  # noqa: E402

PHONE = (4032, 3024)
CPU = torch.device("cpu")


def phone_copy(job: tuple[str, str, int]) -> int:
    """Write one phone-size copy (source, destination, index); return its size in bytes."""
    source, dest, i = job
    img = load_rgb(source)
    w, h = img.size
    cw, ch = (w, w * 3 // 4) if w * 3 <= h * 4 else (h * 4 // 3, h)  # the largest centred 4:3 box
    box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    img = img.crop(box).resize(PHONE, Image.BICUBIC)
    exif = Image.Exif()
    orientation = {1: 6, 3: 8}.get(i % 4)
    if orientation:  # stored turned, so that applying the tag shows it upright again
        img = img.transpose(Image.ROTATE_90 if orientation == 6 else Image.ROTATE_270)
        exif[0x0112] = orientation
    img.save(dest, quality=90, exif=exif)
    return os.path.getsize(dest)


def phone_copies(data_dir: str, limit: int, folder: str) -> ImageSet:
    """Phone-size copies of `limit` photos of data_dir, taken evenly from all its splits, labelled as there."""
    splits = scan_data_dir(data_dir)
    files = sum((s.files for s in splits.values()), [])
    labels = sum((s.labels for s in splits.values()), [])
    picked = np.linspace(0, len(files) - 1, min(limit, len(files))).round().astype(int)
    jobs = [(files[k], os.path.join(folder, f"{i:04d}.jpg"), i) for i, k in enumerate(picked)]
    start = time.perf_counter()
    with multiprocessing.Pool() as pool:
        sizes = pool.map(phone_copy, jobs)
    print(f"{len(jobs)} phone-size copies ({PHONE[0]}x{PHONE[1]}, q90, {sum(i % 4 in (1, 3) for i in range(len(jobs)))}"
          f" EXIF-turned), {np.mean(sizes) / 2 ** 20:.2f} MiB each, made in {time.perf_counter() - start:.0f}s",
          flush=True)
    return ImageSet(folder, [j[1] for j in jobs], [labels[k] for k in picked])


def rate(n: int, work) -> float:
    """img/s of `work()` over n images."""
    start = time.perf_counter()
    work()
    return n / (time.perf_counter() - start)


def decode_floor(images: ImageSet, pp: Preprocess, ctx: dict) -> tuple[float]:
    """PIL open + exif_transpose + decode (at decode_size) + resize and crop, one image after another."""
    draft = decode_size(pp)
    return rate(len(images), lambda: [resize_center_crop(load_rgb(f, draft=draft), pp) for f in images.files]),


def backbone_floor(images: ImageSet, pp: Preprocess, ctx: dict) -> tuple[float]:
    """The backbone's forward alone (ONNX Runtime, the exported file the passes use), on inputs decoded beforehand."""
    if "forward" not in ctx:
        ctx["forward"] = onnx_forward(ctx["backbone"], ctx["arch"], pp.crop_size, state_fingerprint(ctx["backbone"]))
        ctx["inputs"] = torch.from_numpy(np.stack([preprocess_image(load_rgb(f, draft=decode_size(pp)), pp)
                                                   for f in images.files]))
    forward, batch, x = ctx["forward"], ctx["batch_size"], ctx["inputs"]
    forward(x[:batch])  # warm-up: ONNX Runtime plans its first run
    return rate(len(x), lambda: [forward(x[i:i + batch]) for i in range(0, len(x), batch)]),


@contextlib.contextmanager
def fresh_store(ctx: dict):
    """FLOWERCLF_STORE set to a new empty folder (with the exported backbones, not timed) for the block."""
    user = os.environ.get("FLOWERCLF_STORE")
    with tempfile.TemporaryDirectory() as fresh:
        os.symlink(ctx["exports"], os.path.join(fresh, "onnx"))
        os.environ["FLOWERCLF_STORE"] = fresh
        try:
            yield fresh
        finally:
            os.environ.pop("FLOWERCLF_STORE")
            if user is not None:
                os.environ["FLOWERCLF_STORE"] = user


def cold_pass(images: ImageSet, pp: Preprocess, ctx: dict) -> tuple[float]:
    """A FeaturePass over the copies on a fresh store: hash, decode, forward, store."""
    with fresh_store(ctx), FeaturePass(ctx["backbone"], ctx["arch"], "DEFAULT", pp, "onnxruntime", CPU, False,
                                       ctx["batch_size"], ctx["num_workers"], True, lambda line: None) as passes:
        if passes.engine != "onnxruntime":
            raise SystemExit(f"{ctx['arch']} did not export to ONNX Runtime")
        return rate(len(images), lambda: passes.features(images, "copies")),


def finetune_epochs(images: ImageSet, pp: Preprocess, ctx: dict) -> tuple[float, float, float]:
    """Fine-tuning epochs 1 and 2 (--unfreeze 1, train.py's defaults otherwise) over the copies, on a fresh store,
    and epoch 2's input alone."""
    torch.manual_seed(0)
    model, _ = build_model(ModelSpec(ctx["arch"], "DEFAULT", [512], 0.2, len(set(images.labels))))
    cfg = TrainConfig(images.root, arch=ctx["arch"], unfreeze=1, epochs=2, num_workers=ctx["num_workers"],
                      feature_batch_size=ctx["batch_size"])
    with fresh_store(ctx) as folder:
        plan = finetune_plan(model, pp, {"train": images, "valid": images}, cfg, CPU, lambda line: None)
        epochs = tuple(rate(len(images), lambda: plan.train_epoch(epoch)) for epoch in (1, 2))
        # the same epoch's input alone (decode or copy, random crop, flip, normalize): what the copies change
        inputs = make_loader(images, create_transform(pp, augment=True), cfg.batch_size, cfg.num_workers, CPU,
                             copies=working_copies(images.files, pp, True, lambda line: None))
        epochs += rate(len(images), lambda: [batch for batch in inputs]),
        copies, size = upkeep.copies_summary()
        if copies:
            ctx["copies"] = f"{copies} working copies, {size / copies / 2 ** 10:,.0f} KiB each on disk; " \
                            + copy_formats(upkeep.copies_dir(), folder)
    return epochs


def copy_formats(copies: str, scratch: str, n: int = 16) -> str:
    """The working copies' format against raw uint8 (Ultralytics' cache=disk .npy, FFCV's raw mode): bytes per
    photo and ms to read one back as a PIL image, on n of them."""
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(copies) for name in names)[:n]
    start = time.perf_counter()
    pixels = []
    for path in paths:
        with Image.open(path) as img:
            img.load()
            pixels.append(np.asarray(img))
    jpeg_ms = 1000 * (time.perf_counter() - start) / len(paths)
    raws = [os.path.join(scratch, f"{i}.npy") for i in range(len(paths))]
    for raw, array in zip(raws, pixels):
        np.save(raw, array)
    start = time.perf_counter()
    for raw in raws:
        Image.fromarray(np.load(raw))
    raw_ms = 1000 * (time.perf_counter() - start) / len(raws)
    kib = [sum(map(os.path.getsize, files)) / len(files) / 2 ** 10 for files in (paths, raws)]
    return (f"JPEG q95 {kib[0]:,.0f} KiB, {jpeg_ms:.1f} ms to decode; raw uint8 {kib[1]:,.0f} KiB, {raw_ms:.1f} ms "
            f"to read ({len(paths)} copies)")


# (rows, how): how() gives one figure per row, measured with the old decode rule, then the new
ROWS = [(("decode floor, one process",), decode_floor),
        (("backbone floor (ONNX Runtime)",), backbone_floor),
        (("cold feature pass",), cold_pass),
        (("fine-tuning epoch 1 (--unfreeze 1)", "fine-tuning epoch 2", "fine-tuning epoch 2, input alone"),
         finetune_epochs)]


def speeds(images: ImageSet, args) -> int:
    """Print every row of ROWS for the old path (full decode, the old --num_workers auto) and the new one (the
    rule, today's auto, which weighs the photos' size), with the issue's two ratios."""
    spec = ModelSpec(args.arch, "DEFAULT", [8], 0.0, 5)
    model, pp = build_model(spec)
    if args.num_workers == "auto":  # before, auto did not look at the photos
        workers = {"full": resolve_num_workers("auto", CPU),
                   "draft": resolve_num_workers("auto", CPU, typical_pixels(images.files))}
    else:
        workers = dict.fromkeys(("full", "draft"), int(args.num_workers))
    ctx = {"arch": args.arch, "backbone": model.backbone, "batch_size": resolve_feature_batch_size(0, CPU),
           "exports": os.path.join(store.store_dir(), "onnx")}
    os.makedirs(ctx["exports"], exist_ok=True)
    rules = {"full": dataclasses.replace(pp, decode="full"), "draft": dataclasses.replace(pp, decode=args.rule)}
    print(f"{args.arch}, {rules['draft']}, draft to {decode_size(rules['draft'])} px, batch {ctx['batch_size']}, "
          f"workers: {workers['full']} old, {workers['draft']} new", flush=True)
    ctx["num_workers"] = 0
    cold_pass(ImageSet(images.root, images.files[:1], images.labels[:1]), pp, ctx)  # export once, untimed
    print(f"{'img/s':34s} {'old: full':>12s} {'new: ' + args.rule:>12s} {'new/old':>11s}")
    figures = {}
    for rows, how in ROWS:
        measured = {}
        for rule, p in rules.items():
            ctx["num_workers"] = workers[rule]
            measured[rule] = how(images, p, ctx)
        for k, what in enumerate(rows):
            figures[what] = {rule: values[k] for rule, values in measured.items()}
            full, draft = figures[what]["full"], figures[what]["draft"]
            print(f"{what:34s} {full:12.1f} {draft:12.1f} {draft / full:10.1f}x", flush=True)
    new_pass, floor = figures["cold feature pass"]["draft"], figures["decode floor, one process"]["draft"]
    print(f"cold pass, new: {new_pass / figures['cold feature pass']['full']:.1f}x the old pass "
          f"(target >= 10x), {new_pass / figures['decode floor, one process']['full']:.1f}x the full-decode floor; "
          f"the draft floor is {floor / new_pass:.2f}x the pass (target <= 1.5x)")
    if workers["full"] != workers["draft"]:  # the full decode given the new path's workers too
        ctx["num_workers"] = workers["draft"]
        same = cold_pass(images, rules["full"], ctx)[0]
        print(f"the full-decode pass with {workers['draft']} workers: {same:.1f} img/s; the new pass is "
              f"{new_pass / same:.1f}x that")
    epoch2, alone = figures["fine-tuning epoch 2"], figures["fine-tuning epoch 2, input alone"]
    print(f"fine-tuning epoch 2: {epoch2['draft'] / epoch2['full']:.1f}x the old path (target >= 5x), its "
          f"input alone {alone['draft'] / alone['full']:.1f}x; the training step alone would run at about "
          f"{1 / (1 / epoch2['draft'] - 1 / alone['draft']):.1f} img/s")
    print(ctx.get("copies", "no working copies"))
    return 0


def agreement(images: ImageSet, args) -> int:
    """Features of the eval transform from both decodes: cosine, ImageNet top-1 and (--checkpoint) head top-1."""
    weights = resolve_weights(args.arch, "DEFAULT")
    net = build_imagenet_model(args.arch, weights)
    net.load_state_dict(pretrained_state(args.arch, weights, net))
    _, pp = build_model(ModelSpec(args.arch, "DEFAULT", [8], 0.0, 5), load_pretrained=False)
    head = None
    if args.checkpoint:  # with the checkpoint's own resize and crop
        model, meta = load_model(args.checkpoint)
        head, pp = torch_forward(model, CPU), Preprocess.from_dict(meta["preprocess"])
    features = []  # the backbone's features are the input of the ImageNet layer that build_model strips
    _final_layer(net)[1].register_forward_hook(lambda module, inputs, out: features.append(inputs[0].float()))
    classify = torch_forward(net, CPU)
    draft = decode_size(dataclasses.replace(pp, decode=args.rule))
    cosine, same, margins, same_head, head_margins = [], 0, [], 0, []
    with torch.inference_mode():
        for f in images.files:  # row 0 the full decode, row 1 the draft
            x = torch.from_numpy(np.stack([preprocess_image(load_rgb(f, draft=d), pp) for d in (None, draft)]))
            logits = classify(x)
            cosine.append(torch.nn.functional.cosine_similarity(features[-1][:1], features[-1][1:]).item())
            if logits[0].argmax() == logits[1].argmax():
                same += 1
            else:  # how close the full decode's own first two classes were
                top2 = logits[0].softmax(0).topk(2).values
                margins.append((top2[0] - top2[1]).item())
            if head is not None:
                answers = head(x)
                if answers.argmax(1).unique().numel() == 1:
                    same_head += 1
                else:
                    top2 = answers[0].softmax(0).topk(2).values
                    head_margins.append(round((top2[0] - top2[1]).item(), 3))
    cosine = np.array(cosine)
    print(f"{args.arch}, eval transform, {args.rule}: draft to {draft} px: features cosine min {cosine.min():.5f}, "
          f"1st percentile {np.percentile(cosine, 1):.5f}, median {np.median(cosine):.5f} (target >= 0.99)")
    print(f"ImageNet top-1 agrees on {same}/{len(images)} = {100 * same / len(images):.1f}%"
          + (f"; where it differs, the full decode's top-2 probability gap was {np.median(margins):.3f} "
             f"(median), {max(margins):.3f} at most" if margins else ""))
    if head is not None:
        print(f"{args.checkpoint}'s top-1 agrees on {same_head}/{len(images)} = "
              f"{100 * same_head / len(images):.1f}% (target >= 98%)"
              + (f"; where it differs, the full decode's top-2 gaps were {sorted(head_margins)}"
                 if head_margins else ""))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", help="ImageFolder tree (train/, valid/, test/) whose photos are copied")
    p.add_argument("--limit", type=int, default=130, help="photos to make phone-size copies of (default: %(default)s)")
    p.add_argument("--arch", default="efficientnet_lite0", help="backbone with ImageNet weights (default: %(default)s)")
    p.add_argument("--num_workers", default="auto",
                   help="workers of both paths (default: %(default)s: the old auto rule for the old path, today's "
                        "for the new)")
    p.add_argument("--agreement", action="store_true", help="compare the features of both decodes instead")
    p.add_argument("--checkpoint", help="with --agreement: also compare this checkpoint's top-1 (default: none)")
    p.add_argument("--rule", default="draft2", choices=["draft", "draft2"],
                   help="the decode rule compared with the full decode (default: %(default)s, new models'; draft "
                        "covers the resize, 1/8 of 4032x3024; draft2 twice the resize, 1/4)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        images = phone_copies(args.data_dir, args.limit, folder)
        return agreement(images, args) if args.agreement else speeds(images, args)


if __name__ == "__main__":
    sys.exit(main())
