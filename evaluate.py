"""Evaluate a checkpoint on any ImageFolder split: accuracy, per-class report, confusion matrix.

usage: python evaluate.py CHECKPOINT SPLIT_DIR [--out DIR] [--category_names cat_to_name.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import cli

EXAMPLES = """examples:
  python evaluate.py runs/lite0/checkpoint.pth flowers/test --category_names cat_to_name.json
  python evaluate.py runs/lite0/checkpoint.pth flowers/valid --out runs/lite0/valid-eval --json

Writes OUT/STEM_report.json, a row-normalized confusion matrix PNG and OUT/STEM_report.html
(STEM is the split folder's name; for test/ the files are test_report.json,
confusion_matrix.png and report.html, as train.py writes them).
"""


def build_parser() -> cli.ArgumentParser:
    """The command-line interface of evaluate.py."""
    p = cli.ArgumentParser("evaluate.py", __doc__, EXAMPLES)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pth made by train.py")
    p.add_argument("split", metavar="SPLIT_DIR", help="ImageFolder split, e.g. flowers/test (one folder per class)")
    p.add_argument("--out", metavar="DIR", help="where the report files go (default: the checkpoint's folder)")
    p.add_argument("--category_names", "--category-names", metavar="JSON",
                   help="JSON mapping class folders to names, e.g. cat_to_name.json")
    p.add_argument("--batch_size", "--batch-size", type=cli.positive_int,
                   help="images per batch (default: the feature batch size the checkpoint was trained with)")
    cli.add_device_flags(p)
    cli.add_workers_flag(p)
    p.add_argument("--json", action="store_true", help="print the whole report as JSON instead of a summary")
    return p


def evaluate(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The report of the checkpoint on the split, computed as training computed it, and the files written."""
    import data_utils as du
    import report
    import report_html
    from checkpoints import load_model
    from devices import resolve_device, resolve_feature_batch_size, resolve_num_workers, tune_for
    from features import FeaturePass, feature_forward, feature_setup, state_fingerprint
    from loops import features_logits
    from store import open_store

    names = du.load_category_names(args.category_names)
    device = resolve_device(args.device, args.gpu)
    tune_for(device)
    model, ckpt = load_model(args.checkpoint, device)
    images = du.scan_split(args.split, ckpt["class_to_idx"])
    train_args = ckpt.get("args", {})
    batch_size = args.batch_size or train_args.get("feature_batch_size") or resolve_feature_batch_size(0, device)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731  (stdout may be --json)
    # features on the engine training used, from the same store, so the numbers match what train.py printed
    arch, engine, amp = ckpt["model"]["arch"], train_args.get("engine", "torch"), bool(train_args.get("amp"))
    engine = "torch" if train_args.get("unfreeze") else engine
    preprocess = du.Preprocess.from_dict(ckpt["preprocess"])
    fingerprint = state_fingerprint(model.backbone)
    forward, engine = feature_forward(model.backbone, arch, preprocess.crop_size, engine, device, amp, fingerprint, log)
    setup = feature_setup(arch, ckpt["model"].get("weights", ""), fingerprint, preprocess, engine, device, amp)
    passes = FeaturePass(forward, preprocess, setup, open_store(log), batch_size,
                         resolve_num_workers(args.num_workers, device), device, log)
    stem = os.path.basename(os.path.normpath(args.split))
    feats, labels = passes.features(images, stem)
    logits = features_logits(model.head, feats, device)
    result = report.classification_report(logits.numpy(), labels.numpy(), du.class_names(ckpt["class_to_idx"]),
                                          names, files=images.files)
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    written = report.write_report(result, out, stem)
    facts = report_html.run_facts("evaluate.py", train_args, str(device), args.split, f"{len(images)} {stem}",
                                  ckpt.get("epoch", "?"))
    curves = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "training_curves.png")
    return result, written + [report_html.write_html_report(out, stem, result, facts, train_args, {
        "Training curves": curves, "Confusion matrix": written[1]})]


def run(args: argparse.Namespace) -> None:
    """Evaluate, then print the report as JSON or a summary."""
    result, (*written, page) = evaluate(args)
    if args.json:  # stdout stays one JSON document; the page's path goes last on stderr
        print(json.dumps(result, indent=2))
        print(f"report: {page}", file=sys.stderr)
        return
    print(f"{args.split}: {result['images']} images, top-1 {100 * result['top1']:.2f}%  "
          f"top-5 {100 * result['top5']:.2f}%")
    for pair in result["most_confused"][:5]:
        print(f"  {cli.printable(pair['true'])} taken for {cli.printable(pair['predicted'])}: {pair['count']}x")
    print("wrote " + ", ".join(written))
    print(f"report: {page}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, evaluate, write the report; return the exit code."""
    return cli.run_main(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
