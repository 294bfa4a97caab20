"""A training run: the epochs that keep the best model, and the files a finished run leaves.

Both plans (plans.py: the frozen head on stored features, or fine-tuning the last stages)
share the one epoch loop here.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Callable

import torch
from torch import nn

from flowerclf.base.errors import FlowerclfError
from flowerclf.base.runfiles import RunFiles
from flowerclf.data.folders import (
    check_splits,
    class_names,
    load_category_names,
)
from flowerclf.data.images import typical_pixels
from flowerclf.data.layout import apply_record, describe, split_label, split_record
from flowerclf.data.transforms import Preprocess
from flowerclf.evaluation.audit import audit_features, write_audit
from flowerclf.evaluation.audit import section as audit_section
from flowerclf.evaluation.audit import summary as audit_summary
from flowerclf.evaluation.calibration import calibrate, report_calibration
from flowerclf.evaluation.html import run_facts, write_html_report
from flowerclf.evaluation.metrics import classification_report
from flowerclf.evaluation.reports import write_history, write_report
from flowerclf.models.checkpoints import atomic_save, first_non_finite, load_head, make_checkpoint, read_head
from flowerclf.models.onnx import export_checkpoint
from flowerclf.models.registry import ModelSpec, build_model, freeze, resolve_weights
from flowerclf.runtime import ddp
from flowerclf.runtime.devices import (
    enable_cudnn_autotune,
    resolve_device,
    resolve_feature_batch_size,
    resolve_num_workers,
)
from flowerclf.training import rundir
from flowerclf.training.config import TrainConfig
from flowerclf.training.loops import (
    NonFiniteModel,
    metrics_from_logits,
)
from flowerclf.training.plans import Plan, finetune_plan, frozen_plan, head_first
from flowerclf.training.preflight import preflight
from flowerclf.training.resume import ResumeState
from flowerclf.training.tensorboard import Board

DIST_TIMEOUT_S = 300  # a collective waiting longer than this means a rank died or hung: end the job
LAST_SYNC_S = 10.0    # checkpoint_last.pth is fsynced at least this often, and after the last epoch
CURVES_EVERY_S = 10.0  # training_curves.png is redrawn during a run at most this often (history.json every epoch)


def _cpu_state(state: dict) -> dict:
    """A copy of a state dict on the CPU (a copy even for CPU tensors, so training cannot change it)."""
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def check_finite_epoch(trainable: nn.Module, valid_loss: float) -> None:
    """Stop when an epoch ends with non-finite weights or validation loss (one batch can blow up a model)."""
    bad = first_non_finite(trainable.state_dict())
    if bad is not None:
        raise NonFiniteModel(f"weight {bad} became NaN or infinite; lower --learning_rate (or drop --amp)")
    if not math.isfinite(valid_loss):
        raise NonFiniteModel(f"the validation loss became {valid_loss}; lower --learning_rate (or drop --amp)")


def format_epoch(epoch: int, epochs: int, train: dict, valid: dict, seconds: float) -> str:
    """The one line printed after each epoch."""
    return (f"epoch {epoch}/{epochs}  train loss {train['loss']:.4f}  valid loss {valid['loss']:.4f}  "
            f"valid acc {100 * valid['acc']:.2f}%  {seconds:.1f}s")


@dataclass
class Run:
    """What the epoch loop needs besides the plan: the model's identity and where it is saved."""

    model: nn.Sequential
    spec: ModelSpec
    preprocess: Preprocess
    class_to_idx: dict
    cfg: TrainConfig
    log: Callable[[str], None]
    resume: ResumeState | None = None   # --resume: checkpoint_last.pth, read and checked before any work
    claimed: rundir.Claim | None = None  # rank 0's hold on the save directory
    split: dict | None = None            # the split carved where DATA_DIR had none (data.layout.split_record)
    board: Board | None = None           # rank 0's TensorBoard event files

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.cfg.save_dir)

    def save(self, epoch: int, history: list, **extra) -> None:
        """checkpoint.pth (rank 0 only)."""
        if ddp.is_main():
            atomic_save(make_checkpoint(self.model, self.spec, self.preprocess, self.class_to_idx, epoch=epoch,
                                        history=history, args=asdict(self.cfg), split=self.split, **extra),
                        self.files.checkpoint)
            if self.claimed is not None:
                self.claimed.saved()  # --overwrite: the previous run's outputs can go now


def run_epochs(plan: Plan, run: Run) -> tuple[list, dict]:
    """Train epoch after epoch; save the best to checkpoint.pth and each to checkpoint_last.pth.

    A run that starts from a trained head (plan.warm) has an epoch 0, scored and saved as any other,
    so the run never keeps a model worse than the head it started from. --resume continues after the
    last finished epoch, epoch 0 included: a resumed fine-tune never trains its head again.
    """
    cfg, last = run.cfg, run.files.last
    start = 0 if plan.warm is not None else 1
    history, best = [], {"epoch": 0, "acc": -1.0, "loss": math.inf, "state": None}
    if run.resume is not None:
        start, history, best = run.resume.apply(plan.trainable, plan.stateful, plan.generator, last)
        run.log(f"resuming after epoch {start - 1} (best so far: epoch {best['epoch']})")
    synced = drawn = time.monotonic()
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        rate = plan.stateful["optimizer"].param_groups[0]["lr"] if epoch else plan.warm["lr"]
        try:
            tr = plan.train_epoch(epoch) if epoch else plan.warm  # epoch 0: the head the run starts from
            va = plan.validate()
            check_finite_epoch(plan.trainable, va["loss"])
        except NonFiniteModel as e:  # the run stops here; a non-finite model is never kept nor saved
            kept = f"{run.files.checkpoint} keeps epoch {best['epoch']}, the best so far" \
                if best["state"] is not None else "no checkpoint was saved"
            raise FlowerclfError(f"{e} (epoch {epoch}); {kept}") from None
        seconds = time.perf_counter() - t0 + (0.0 if epoch else plan.warm["seconds"])
        history.append({"epoch": epoch, "train_loss": tr["loss"], "valid_loss": va["loss"], "valid_acc": va["acc"],
                        "seconds": seconds, "lr": rate})
        run.log(format_epoch(epoch, cfg.epochs, tr, va, seconds) + ("" if epoch else f"  ({plan.warm['note']})"))
        if va["acc"] > best["acc"]:
            best = {"epoch": epoch, "acc": va["acc"], "loss": va["loss"],
                    "state": _cpu_state(plan.trainable.state_dict())}
            run.save(epoch, history, metrics={"valid_loss": va["loss"], "valid_acc": va["acc"]})
        stop = cfg.patience and epoch - best["epoch"] >= cfg.patience
        if ddp.is_main():
            # an fsync made each frozen epoch's save ~1.4x slower; a killed process leaves the file whole without
            # one, so only a power cut can lose the epochs since the last, at most LAST_SYNC_S of them
            durable = stop or epoch == cfg.epochs or time.monotonic() - synced >= LAST_SYNC_S
            atomic_save(ResumeState.capture(_cpu_state(plan.trainable.state_dict()), plan.stateful, plan.generator,
                                            run.spec, run.class_to_idx, epoch, history, best, asdict(cfg),
                                            run.split).to_dict(),
                        last, durable)
            synced = time.monotonic() if durable else synced
            # the history as it grows, to watch a run; the curves at most every CURVES_EVERY_S (a frozen epoch is
            # a tenth of a second, drawing them three times that), and _fit draws the final ones
            draw = time.monotonic() - drawn >= CURVES_EVERY_S
            write_history(history, run.files, curves=draw)
            drawn = time.monotonic() if draw else drawn
            run.board.epoch(history[-1])
        if stop:
            run.log(f"stopped early: no better validation accuracy for {cfg.patience} epochs "
                    f"(checkpoint.pth keeps epoch {best['epoch']})")
            break
    if history and history[0]["epoch"] == 0 and best["epoch"] == 0:  # a resumed run has no plan.warm
        run.log(f"no epoch beat epoch 0: checkpoint.pth keeps {(plan.warm or {}).get('note', 'the starting head')}"
                + (" on the pretrained backbone" if cfg.unfreeze else ""))
    return history, best


def train(cfg: TrainConfig, log: Callable[[str], None] = print, splits: dict | None = None, ranker=None) -> dict:
    """Train a new head (and optionally the last backbone stages), save the best epoch; return the results.

    `splits` are preflight(cfg)'s, when the caller (train.py) checked before importing torch; `ranker` a
    flowerclf.evaluation.ranker.Ranker it started then, for the audit.

    checkpoint.pth is rewritten whenever validation accuracy improves and checkpoint_last.pth
    after every epoch (both atomically), so a crash or Ctrl-C loses at most the running epoch
    (a power cut: the epochs since checkpoint_last.pth's last fsync, at most LAST_SYNC_S ago).
    Under torchrun every rank runs this; only rank 0 writes files and logs progress (any rank, its warnings).
    """
    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial heads
    device = ddp.join(resolve_device(cfg.device, cfg.gpu), DIST_TIMEOUT_S)
    with ddp.peers_watched():
        return _train(cfg, device, log, splits, ranker)


def _train(cfg: TrainConfig, device: torch.device, log: Callable[[str], None], splits: dict | None,
           ranker=None) -> dict:
    """train() on this rank's device: the data, the model, the checks, then the run in its save directory."""
    main = ddp.is_main()
    if not main:  # progress is rank 0's to print; a warning on any rank (a lost store) still reaches the user
        log = ddp.warnings_only(log)
    enable_cudnn_autotune(device)
    splits = splits or preflight(cfg)
    cfg = replace(cfg, feature_batch_size=resolve_feature_batch_size(cfg.feature_batch_size, device),
                  num_workers=resolve_num_workers(cfg.num_workers, device, typical_pixels(splits["train"].files)))
    names = load_category_names(cfg.category_names)  # fail before training, not after
    class_to_idx = splits["train"].class_to_idx
    spec = ModelSpec(cfg.arch, resolve_weights(cfg.arch, cfg.weights).spec, list(cfg.hidden_units),
                     cfg.dropout, len(class_to_idx))
    last = RunFiles(cfg.save_dir).last
    resume = ResumeState.read(last, spec, class_to_idx, cfg.unfreeze) if cfg.resume else None
    if resume is not None:  # other classes, model or flags are refused before any work
        resume.check_args(asdict(cfg), last)
        if resume.split is not None:  # the photos it validated on, even where photos were added since
            splits = apply_record(splits, resume.split, last)
    split = split_record(splits)
    splits, warnings_ = check_splits(splits, full=cfg.skip_bad_images, skip_bad=cfg.skip_bad_images)
    for line in describe(splits) + warnings_ if main else []:  # the same on every rank: said once
        log(line)
    # a mismatch is refused before any work (a resume has its own state)
    init = read_head(cfg.init_from, spec, class_to_idx) if cfg.init_from and resume is None else None
    model, preprocess = build_model(spec)
    freeze(model.backbone)
    if init is not None:
        load_head(model.head, init, cfg.init_from)
    model.to(device)
    log(f"{cfg.arch} on {device}" + (f" x {ddp.world()} processes" if ddp.world() > 1 else "") + ": "
        + ", ".join(f"{len(s)} {n}" for n, s in splits.items()) + f" images, {len(class_to_idx)} classes")
    claim = rundir.claim(RunFiles(cfg.save_dir), cfg.data_dir, cfg.overwrite, cfg.resume, log) if main \
        else nullcontext()
    board = Board(RunFiles(cfg.save_dir).tensorboard) if main else nullcontext()
    with claim as held, board as events:  # before the feature pass: a locked, unwritable or occupied save dir fails now
        return _fit(Run(model, spec, preprocess, class_to_idx, cfg, log, resume, held, split, events), splits, names,
                    device, ranker)


def _fit(run: Run, splits: dict, names: dict, device: torch.device, ranker=None) -> dict:
    """The plan, the epochs, the test split, and the files a finished run leaves."""
    cfg, log, main = run.cfg, run.log, ddp.is_main()
    if cfg.unfreeze:  # a resumed fine-tune has its head (and epoch 0) in checkpoint_last.pth already
        warm = head_first(run.model, run.spec, run.preprocess, splits, cfg, device, log) if run.resume is None \
            else None
        plan = finetune_plan(run.model, run.preprocess, splits, cfg, device, log, warm)
    else:
        plan = frozen_plan(run.model, run.spec, run.preprocess, splits, cfg, device, log)
    run.cfg = cfg = replace(cfg, engine=plan.engine)  # recorded, so evaluate.py recomputes features the same way
    history, best = run_epochs(plan, run)

    plan.trainable.load_state_dict(best["state"])
    metrics = {"valid_loss": best["loss"], "valid_acc": best["acc"]}
    valid = plan.valid_logits()
    calibration = calibrate(*(t.numpy() for t in valid))
    log(f"calibration on valid: temperature {calibration['temperature']:.3f}; \"not sure\" below "
        f"{100 * calibration['threshold']:.1f}% (keeps {100 * calibration['kept']:.0f}% of its right answers)")
    test = plan.test_logits() if plan.test_logits else None
    if test is not None:
        m = metrics_from_logits(*test)
        metrics.update(test_loss=m["loss"], test_acc=m["acc"], test_top5=m["top5"], test_balanced=m["balanced"])
        k = min(5, len(run.class_to_idx))
        log(f"test accuracy: top-1 {100 * m['acc']:.2f}%  top-{k} {100 * m['top5']:.2f}%  balanced "
            f"{100 * m['balanced']:.2f}%  (best epoch {best['epoch']})")
    run.save(best["epoch"], history, metrics=metrics, calibration=calibration)
    files = run.files
    result = {"checkpoint": files.checkpoint, "metrics": metrics, "history": history, "epoch": best["epoch"]}
    ddp.cleanup()
    if not main:
        return result
    log(f"saved {files.checkpoint} (epoch {best['epoch']}, valid acc {100 * best['acc']:.2f}%)")
    written = write_history(history, files)
    audited = audit_features(splits, plan.features, class_names(run.class_to_idx), names, cfg.store, log,
                             ranker=ranker) if cfg.audit and plan.features is not None else None
    if audited is not None:
        written.append(write_audit(audited, files.audit))
    # the report is on test/, or on valid/ when there is none (and says so: valid chose the epoch and the temperature)
    split, (logits, labels) = ("test", test) if test is not None else ("valid", valid)
    # the report files take the folder's own name (val_report.html), or the split's when carved
    stem, label = (split if splits[split].carved else splits[split].name), split_label(split, splits[split])
    temperature = calibration["temperature"]
    report = classification_report(logits.numpy() / temperature, labels.numpy(), class_names(run.class_to_idx),
                                   names, files=splits[split].files)
    written += write_report(report, files, stem)
    if run.board.finish(report, stem, files.confusion(stem), history[-1]["epoch"]):
        written.append(files.tensorboard)
    facts = run_facts("train.py", asdict(cfg), str(device), label if splits[split].carved
                      else os.path.join(cfg.data_dir, stem), ", ".join(f"{len(s)} {n}" for n, s in splits.items()),
                      best["epoch"])
    if split == "valid":
        facts["note"] = (f"no test/ folder, so this report is on {label}, which also chose the best epoch and the "
                         f"temperature: its figures are optimistic; add DATA_DIR/test/ for an honest one")
    facts[f"calibration ({stem})"] = report_calibration(logits.numpy(), labels.numpy(), temperature,
                                                        files.reliability(stem))
    log(f"calibration on {stem}: {facts[f'calibration ({stem})']}")
    written.append(files.reliability(stem))
    page = write_html_report(files.folder, stem, report, facts, asdict(cfg), {
        "Training curves": files.curves, "Confusion matrix": files.confusion(stem),
        "Reliability diagram": files.reliability(stem)}, audited and partial(audit_section, audited))
    if split == "valid":
        log(f"no {os.path.join(cfg.data_dir, 'test')}/ folder: the report is on {label} (python evaluate.py "
            f"{files.checkpoint} OTHER_SPLIT evaluates any other folder)")
    if cfg.export == "onnx":
        written.append(export_checkpoint(files.checkpoint))
    log("wrote " + ", ".join(os.path.basename(p) for p in written))
    if audited is not None:  # before the report's path, which stays the last line
        log(audit_summary(audited, f"{os.path.basename(page)}#audit"))
    log(f"report: {page}")
    return result
