"""Train a flower classifier: a new head on a pretrained torchvision backbone.

usage: python train.py DATA_DIR [--arch densenet121] [--epochs 10] [--save_dir DIR] ...
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys

from flowerclf.base import cli

EXAMPLES = """examples:
  python train.py flowers --arch efficientnet_lite0 --epochs 5 --save_dir runs/lite0
  python train.py flowers --arch resnet50 --hidden_units 1024 256 --learning_rate 0.003 --gpu
  python train.py flowers --arch vgg16 --weights ~/vgg16-397923af.pth   # offline, local weights
  python train.py flowers --arch resnet50 --unfreeze 2 --amp --gpu        # fine-tune the last 2 stages
  python train.py --list_stages --arch efficientnet_lite0                 # what --unfreeze N would train
  torchrun --nproc_per_node=4 train.py flowers --arch resnet50 --unfreeze 2 --amp   # 4 GPUs, one node

DATA_DIR holds train/ and a validation folder (valid/, val/ or validation/; without one, --valid_split of
train/ validates), and optionally test/, each with one folder per class; or only class folders
(DATA_DIR/roses/*.jpg), split 70/15/15 into train, valid and test. Nothing is copied; a split made here is
seeded, stratified, the same on a rerun, and recorded in the checkpoint.
"""


class ListArchs(argparse.Action):
    """--list_archs: the names, one a line, without DATA_DIR (like --help)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from flowerclf.models.names import arch_names
        print("\n".join(arch_names()))
        parser.exit()


def build_parser() -> cli.ArgumentParser:
    """The command-line interface of train.py."""
    p = cli.ArgumentParser("train.py", __doc__, EXAMPLES)
    p.add_argument("data_dir", metavar="DATA_DIR", nargs="?",
                   help="folder with train/, valid/ (or val/, validation/) and optionally test/, or only class "
                        "folders (not needed with --list_stages)")
    p.add_argument("--save_dir", "--save-dir", default=".",
                   help="where checkpoint.pth is written (default: current directory)")
    p.add_argument("--list_archs", "--list-archs", action=ListArchs,
                   help="print every name --arch accepts, then exit")
    p.add_argument("--list_stages", "--list-stages", action="store_true",
                   help="print the backbone stages of --arch, numbered as --unfreeze counts them, then exit")
    p.add_argument("--arch", default="densenet121",
                   help="any torchvision classification model (e.g. resnet50, vit_b_16), efficientnet_lite0 or "
                        "efficientnet_lite2, whose weights install with pip and work offline (default: %(default)s)")
    p.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT (the arch's best ImageNet weights), a torchvision weight name such as "
                        "IMAGENET1K_V1, a path to a local .pth state dict, or none for random init "
                        "(default: %(default)s)")
    p.add_argument("--learning_rate", "--learning-rate", type=float, default=0.001,
                   help="Adam learning rate for the head (default: %(default)s)")
    p.add_argument("--hidden_units", "--hidden-units", type=cli.whole_number, nargs="+", default=[512],
                   help="hidden layer widths of the head, one number per layer; 0 gives a single linear "
                        "layer (default: 512)")
    p.add_argument("--dropout", type=float, default=0.2,
                   help="dropout probability in the head (default: %(default)s)")
    p.add_argument("--epochs", type=cli.positive_int, default=10, help="training epochs (default: %(default)s)")
    p.add_argument("--patience", type=cli.whole_number, default=5, metavar="K",
                   help="stop after K epochs without a better validation accuracy (checkpoint.pth keeps the best "
                        "epoch); 0 runs every epoch. 5: in three 30-epoch frozen runs on flowers5-dev a better epoch "
                        "never came more than 4 epochs after the last, see docs/finetune.md (default: %(default)s)")
    p.add_argument("--batch_size", "--batch-size", type=cli.positive_int, default=64,
                   help="images per training step, in total: under torchrun each of the N processes takes "
                        "batch_size / N, so the learning rate needs no change (default: %(default)s)")
    p.add_argument("--category_names", "--category-names", metavar="JSON",
                   help="JSON mapping class folders to names (e.g. cat_to_name.json), used in the test "
                        "report and confusion matrix")
    cli.add_device_flags(p)
    p.add_argument("--seed", type=cli.whole_number, default=0, help="random seed (default: %(default)s)")
    cli.add_workers_flag(p)
    d = p.add_argument_group("data checks and recovery")
    d.add_argument("--check", action="store_true",
                   help="only check DATA_DIR (folders, classes, every image decoded) and report; train nothing")
    d.add_argument("--skip_bad_images", "--skip-bad-images", action="store_true",
                   help="decode every image first; report unreadable, empty, truncated or oversized ones and "
                        "leave them out instead of stopping")
    d.add_argument("--valid_split", "--valid-split", type=float, metavar="FRACTION",
                   help="no validation folder: validate on this fraction of each class of train/ (seeded by --seed, "
                        "nothing copied); 0 refuses to train without a validation folder (default: 0.2; 0.15 "
                        "for a DATA_DIR of class folders)")
    d.add_argument("--balance", choices=("off", "on", "auto"), default="auto",
                   help="weight the training loss by inverse class frequency, weight_c = N / (C * n_c) (N training "
                        "photos, C classes, n_c of class c), in the frozen and the fine-tuning plans alike; auto: on "
                        "when the largest class has more than 3x the photos of the smallest (default: %(default)s)")
    d.add_argument("--no_audit", "--no-audit", dest="audit", action="store_false",
                   help="skip the data audit that ends a frozen run (SAVE_DIR/audit.json and report.html#audit: "
                        "photos that look mislabeled, copies across classes, test photos also in train)")
    d.add_argument("--overwrite", action="store_true",
                   help="replace the model another run left in SAVE_DIR: its checkpoints, reports and model.onnx "
                        "are set aside, removed once this run saved its first checkpoint, and put back if it "
                        "fails; without it train.py refuses to overwrite a checkpoint.pth")
    d.add_argument("--resume", action="store_true",
                   help="continue from SAVE_DIR/checkpoint_last.pth (written after every epoch) with the "
                        "same optimizer state, epoch and history; pass the same model and training flags "
                        "(--epochs, paths, devices and workers may change)")
    g = p.add_argument_group("speed and fine-tuning")
    g.add_argument("--no_store", "--no-store", "--no_cache", "--no-cache", dest="store", action="store_false",
                   help="neither read nor write the per-user feature store ($FLOWERCLF_STORE/features.sqlite, "
                        "see python cache.py info): every image goes through the backbone once in this run; by "
                        "default only images the store lacks do (--no_cache is the old name); with --unfreeze, "
                        "no working copies either: by default the first epoch keeps each photo larger than the "
                        "augmentation needs (915 px a side for a 224 crop) as a smaller JPEG beside the store "
                        "($FLOWERCLF_STORE/copies/), which later epochs and runs read instead")
    g.add_argument("--augment_views", "--augment-views", type=cli.whole_number, default=0, metavar="K",
                   help="store K random-crop+flip views of each training image and train on all of them; "
                        "each view costs one backbone pass over train/ (default: 0, center crop only)")
    g.add_argument("--unfreeze", type=cli.unfreeze, default=0, metavar="N|all",
                   help="also train the last N backbone stages (or all): a stage is a block of convolutions or "
                        "attention, with the lone layers beside it, so 1 is always the last block (--list_stages "
                        "shows them); the head first trains on stored features (seconds) and epoch 0 is its validation "
                        "score, then every epoch trains on images, a full pass each (default: 0, frozen backbone)")
    g.add_argument("--init_from", "--init-from", metavar="CHECKPOINT",
                   help="start from the head of an earlier run's checkpoint.pth (or a classic project's checkpoint) "
                        "made with the same --arch, --weights, --hidden_units and classes: epoch 0 is its validation "
                        "score here, so the run keeps it unless an epoch beats it; with --unfreeze it replaces the "
                        "head trained on stored features")
    g.add_argument("--backbone_lr_ratio", "--backbone-lr-ratio", type=float, default=0.1,
                   help="with --unfreeze: backbone learning rate = learning_rate x this (default: %(default)s)")
    g.add_argument("--warmup_epochs", "--warmup-epochs", type=float, default=1.0,
                   help="with --unfreeze: linear warm-up before the cosine decay (default: %(default)s)")
    g.add_argument("--label_smoothing", "--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the cross-entropy loss (default: %(default)s)")
    g.add_argument("--feature_batch_size", "--feature-batch-size", type=cli.whole_number, default=0, metavar="N",
                   help="batch size of backbone inference passes (default: 0 = auto: 8 on a CPU, where small "
                        "batches are fastest, 128 on a GPU)")
    g.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="runtime of the frozen backbone's feature pass, and with --unfreeze of its frozen stages: "
                        "auto uses ONNX Runtime on a CPU (exported once and kept in ~/.cache/flowerclf or "
                        "$FLOWERCLF_STORE) and torch elsewhere; a failed export falls back to torch "
                        "(default: %(default)s)")
    g.add_argument("--export", choices=("onnx",),
                   help="also write SAVE_DIR/model.onnx, which predict.py runs without torch")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 (fp16 on GPUs without bf16) for backbone passes")
    g.add_argument("--compile", action="store_true", help="with --unfreeze: torch.compile the model")
    return p


def stages_text(arch: str) -> str:
    """--list_stages: what --unfreeze N trains on `arch` (the model is built without weights, on no device)."""
    from flowerclf.models.names import check_arch
    check_arch(arch)
    import torch

    from flowerclf.models.registry import ModelSpec, build_model
    from flowerclf.models.stages import describe_stages
    with torch.device("meta"):
        model, _ = build_model(ModelSpec(arch, "none", [], 0.0, 2), load_pretrained=False)
    return "\n".join([f"{arch}: --unfreeze N trains stages N..1 (1 = the last block); 'all' trains every weight",
                      "  N   params  modules"] + describe_stages(model.backbone))


def run(args: argparse.Namespace) -> None:
    """Check the settings, then check the data (--check) or train."""
    from flowerclf.base.errors import FlowerclfError
    from flowerclf.training.config import TrainConfig
    from flowerclf.training.preflight import check_data, preflight

    if args.list_stages:
        print(stages_text(args.arch))
        return
    if args.data_dir is None:
        raise FlowerclfError("give DATA_DIR, the folder holding train/ (see train.py --help)")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if args.check:
        print(cli.printable(check_data(cfg)))  # paths and file names are anyone's text
        return
    splits = preflight(cfg)  # a typo or a wrong folder fails here, before torch's seconds of imports
    # a frozen run's audit (rank 0's): its cleanlab imports in another process while this one imports torch
    audits = cfg.audit and not cfg.unfreeze and os.environ.get("RANK", "0") == "0"
    from flowerclf.evaluation.ranker import Ranker
    with Ranker() if audits else contextlib.nullcontext() as ranker:
        _train(cfg, splits, ranker)


def _train(cfg, splits: dict, ranker) -> None:
    """trainer.train(), its CUDA out-of-memory error as one line."""
    from flowerclf.base.errors import FlowerclfError
    import torch

    from flowerclf.training.trainer import train
    try:
        train(cfg, log=lambda line: print(cli.printable(line), flush=True), splits=splits, ranker=ranker)
    except torch.cuda.OutOfMemoryError:
        raise FlowerclfError(
            f"CUDA out of memory at --batch_size {cfg.batch_size} (feature batch {cfg.feature_batch_size or 'auto'}); "
            f"python gpumemcheck.py --arch {cfg.arch}{' --unfreeze ' + str(cfg.unfreeze) if cfg.unfreeze else ''}"
            f"{' --amp' if cfg.amp else ''} --find_batch_size finds one that fits", exit_code=1) from None


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, save; return the exit code."""
    return cli.run_main(build_parser(), argv, run, interrupted=interrupted)


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves behind, and how to go on."""
    if not os.path.exists(os.path.join(args.save_dir, "checkpoint_last.pth")):
        return "no epoch had finished, so no checkpoint was saved"
    return (f"{args.save_dir}/checkpoint.pth holds the best epoch so far and checkpoint_last.pth the last finished "
            f"one; continue with the same command and --resume")


if __name__ == "__main__":
    sys.exit(main())
