"""Train a flower classifier: a new head on a pretrained torchvision backbone.

usage: python train.py DATA_DIR [--arch densenet121] [--epochs 10] [--save_dir DIR] ...
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

EXAMPLES = """examples:
  python train.py flowers --arch efficientnet_lite0 --epochs 5 --save_dir runs/lite0
  python train.py flowers --arch resnet50 --hidden_units 1024 256 --learning_rate 0.003 --gpu
  python train.py flowers --arch vgg16 --weights ~/vgg16-397923af.pth   # offline, local weights
  python train.py flowers --arch resnet50 --unfreeze 2 --amp --gpu        # fine-tune the last 2 stages
  torchrun --nproc_per_node=4 train.py flowers --arch resnet50 --unfreeze 2 --amp   # 4 GPUs, one node

DATA_DIR holds train/ and valid/ (and optionally test/), each with one folder per class.
"""


def hidden_units(value: str) -> int:
    """argparse type: a whole number, 0 or more (for --hidden_units, 0 means no hidden layer)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of train.py."""
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__.splitlines()[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder with train/, valid/ and optionally test/")
    p.add_argument("--save_dir", "--save-dir", default=".",
                   help="where checkpoint.pth is written (default: current directory)")
    p.add_argument("--arch", default="densenet121",
                   help="any torchvision classification model (e.g. resnet50, vit_b_16) or efficientnet_lite0, "
                        "whose weights install with pip and work offline (default: %(default)s)")
    p.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT (the arch's best ImageNet weights), a torchvision weight name such as "
                        "IMAGENET1K_V1, a path to a local .pth state dict, or none for random init "
                        "(default: %(default)s)")
    p.add_argument("--learning_rate", "--learning-rate", type=float, default=0.001,
                   help="Adam learning rate for the head (default: %(default)s)")
    p.add_argument("--hidden_units", "--hidden-units", type=hidden_units, nargs="+", default=[512],
                   help="hidden layer widths of the head, one number per layer; 0 gives a single linear "
                        "layer (default: 512)")
    p.add_argument("--dropout", type=float, default=0.2,
                   help="dropout probability in the head (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default: %(default)s)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=64,
                   help="images per training step, in total: under torchrun each of the N processes takes "
                        "batch_size / N, so the learning rate needs no change (default: %(default)s)")
    p.add_argument("--category_names", "--category-names", metavar="JSON",
                   help="JSON mapping class folders to names (e.g. cat_to_name.json), used in the test "
                        "report and confusion matrix")
    p.add_argument("--gpu", action="store_true", help="train on CUDA; fails if there is no CUDA device")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="device to train on; auto picks CUDA, then MPS, then CPU (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--num_workers", "--num-workers", type=int, default=0,
                   help="image-decoding worker processes (default: %(default)s, decode in the main process)")
    d = p.add_argument_group("data checks and recovery")
    d.add_argument("--check", action="store_true",
                   help="only check DATA_DIR (folders, classes, every image decoded) and report; train nothing")
    d.add_argument("--skip_bad_images", "--skip-bad-images", action="store_true",
                   help="decode every image first; report unreadable, empty, truncated or oversized ones and "
                        "leave them out instead of stopping")
    d.add_argument("--valid_split", "--valid-split", type=float, default=0.0, metavar="FRACTION",
                   help="no valid/ folder? set aside this fraction of train/ (stratified, seeded), e.g. 0.2")
    d.add_argument("--resume", action="store_true",
                   help="continue from SAVE_DIR/checkpoint_last.pth (written after every epoch) with the "
                        "same optimizer state, epoch and history; pass the same model flags")
    g = p.add_argument_group("speed and fine-tuning")
    g.add_argument("--no_cache", "--no-cache", dest="cache", action="store_false",
                   help="do not keep backbone features on disk under SAVE_DIR/.feature_cache (they are "
                        "still computed once per run); by default a rerun with other head settings skips "
                        "the backbone entirely")
    g.add_argument("--augment_views", "--augment-views", type=int, default=0, metavar="K",
                   help="store K random-crop+flip views of each training image and train on all of them; "
                        "each view costs one backbone pass over train/ (default: 0, center crop only)")
    g.add_argument("--unfreeze", type=unfreeze, default=0, metavar="N|all",
                   help="also train the last N backbone stages (or all); trains on images instead of "
                        "cached features, so each epoch costs a full pass (default: 0, frozen backbone)")
    g.add_argument("--backbone_lr_ratio", "--backbone-lr-ratio", type=float, default=0.1,
                   help="with --unfreeze: backbone learning rate = learning_rate x this (default: %(default)s)")
    g.add_argument("--warmup_epochs", "--warmup-epochs", type=float, default=1.0,
                   help="with --unfreeze: linear warm-up before the cosine decay (default: %(default)s)")
    g.add_argument("--label_smoothing", "--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the cross-entropy loss (default: %(default)s)")
    g.add_argument("--feature_batch_size", "--feature-batch-size", type=int, default=0, metavar="N",
                   help="batch size of backbone inference passes (default: 0 = auto: 8 on a CPU, where small "
                        "batches are fastest, 128 on a GPU)")
    g.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="runtime of the frozen backbone's feature pass: auto uses ONNX Runtime on a CPU (the "
                        "backbone is exported once and cached in ~/.cache/flowerclf or $FLOWERCLF_CACHE) and "
                        "torch elsewhere; a failed export falls back to torch (default: %(default)s)")
    g.add_argument("--export", choices=("onnx",),
                   help="also write SAVE_DIR/model.onnx, which predict.py runs without torch")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 (fp16 on GPUs without bf16) for backbone passes")
    g.add_argument("--compile", action="store_true", help="with --unfreeze: torch.compile the model")
    return p


def unfreeze(value: str) -> int | str:
    """argparse type: a number of stages, or 'all'."""
    return value if value == "all" else hidden_units(value)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, save; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    if args.learning_rate <= 0:
        parser.error("--learning_rate must be positive")
    if args.num_workers < 0:
        parser.error("--num_workers must be 0 or more")
    if args.gpu and args.device not in ("auto", "cuda"):
        parser.error(f"--gpu asks for CUDA but --device is {args.device}; pass one of them")
    if not 0 <= args.valid_split < 1:
        parser.error("--valid_split must be in [0, 1)")
    if args.feature_batch_size < 0:
        parser.error("--feature_batch_size must be 0 (auto) or more")
    if args.augment_views < 0:
        parser.error("--augment_views must be 0 or more")
    if args.augment_views and args.unfreeze:
        parser.error("--augment_views is for the frozen, cached path; --unfreeze augments every epoch already")
    if args.compile and not args.unfreeze:
        parser.error("--compile applies to --unfreeze training (the frozen path trains a small head)")

    import torch  # imported here so --help stays instant

    from data_utils import FlowerclfError
    import engine

    args.hidden_units = [h for h in args.hidden_units if h > 0]  # "0" means no hidden layer
    cfg = engine.TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(engine.TrainConfig)
                                if f.name != "check"})
    try:
        if args.check:
            print(engine.check_data(cfg))
        else:
            engine.train(cfg)
    except FlowerclfError as e:
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{rank}error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an unwritable --save_dir; checkpoints already written stay intact
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print(f"error: CUDA out of memory at --batch_size {args.batch_size} (feature batch "
              f"{args.feature_batch_size or 'auto'}); python gpumemcheck.py --arch {args.arch}"
              f"{' --unfreeze ' + str(args.unfreeze) if args.unfreeze else ''}{' --amp' if args.amp else ''} "
              f"--find_batch_size finds one that fits", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {args.save_dir}/checkpoint.pth holds the best epoch so far and checkpoint_last.pth "
              f"the last finished one; continue with the same command and --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
