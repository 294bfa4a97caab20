"""The two training plans: what the shared epoch loop trains, how an epoch runs and how validation is scored.

- frozen backbone (default): features come from the per-user feature store, and only the
  images it lacks (per augmented view) go through the backbone; the head trains on them in seconds;
- `unfreeze`: the last N backbone stages train too, on decoded images, with a lower
  learning rate for the backbone, warm-up + cosine schedule and optional AMP. It starts where
  the frozen plan ends (fastai's fine_tune): the head first trains on stored features
  (head_first), and epoch 0 is that head's validation score.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from flowerclf.base.errors import FlowerclfError, brief
from flowerclf.data.layout import class_counts, skewed
from flowerclf.data.loaders import make_loader
from flowerclf.data.transforms import create_transform
from flowerclf.features.copies import working_copies
from flowerclf.features.engines import onnx_forward, state_fingerprint
from flowerclf.features.passes import FeaturePass, head_logits
from flowerclf.features.store import store_dir
from flowerclf.models.prefix import Prefix, frozen_prefix
from flowerclf.models.stages import unfreeze_last
from flowerclf.runtime import ddp
from flowerclf.runtime.devices import amp_dtype, resolve_feature_batch_size, to_channels_last
from flowerclf.training.loops import (class_weights, finetune_epoch, metrics_from_logits, split_logits,
                                      train_head_epoch, warmup_cosine, wrap_ddp)

# The head's epochs on stored features before a fine-tune, the best on valid kept: three 30-epoch frozen lite0
# runs on flowers5-dev peaked at epochs 8, 11 and 13 (docs/finetune.md); each costs a fraction of a second.
HEAD_EPOCHS = 15


@dataclass
class Plan:
    """What a training path hands the shared epoch loop."""

    trainable: nn.Module                  # the part whose weights change: the head, or the whole model
    train_epoch: Callable[[int], dict]
    validate: Callable[[], dict]
    test_logits: Callable[[], tuple] | None
    stateful: dict                        # optimizer, scheduler, scaler...: objects with state_dict()
    generator: torch.Generator            # the order of training batches
    engine: str
    valid_logits: Callable[[], tuple] | None = None  # (logits, labels) of the valid split: calibration's input
    features: dict | None = None                     # the frozen plan's (features, labels) per split: the audit's
    # epoch 0, when the run starts from a trained head (a fine-tune's head_first, or --init_from): its train
    # loss on the stored features, learning rate, seconds spent before validation, and what it is
    warm: dict | None = None


def balance_weights(balance: str, splits: dict, log) -> torch.Tensor | None:
    """--balance: the loss's class weights (class_weights), or None; auto turns them on where the run says the
    classes are skewed (data.layout.skewed)."""
    counts = class_counts(splits["train"])
    if balance == "off" or (balance == "auto" and not skewed(counts)):
        return None
    weights = class_weights(splits["train"].labels, len(counts))
    log(f"--balance {balance}: the loss weighs class c by N / (C * n_c), from {weights.min():.2f} to "
        f"{weights.max():.2f}")
    return weights


def stored_features(model, spec, preprocess, splits, cfg, device, log) -> tuple[dict, str]:
    """(features, labels) per split, from the feature store and one backbone pass over the misses; the engine.

    Runs inside its own random stream, so a store hit and a miss (and a first run's ONNX export,
    which draws random inputs) leave training on the same one.
    """
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        with ddp.main_first():  # rank 0 creates the store before the other ranks open it: creation never races
            passes = FeaturePass(model.backbone, spec.arch, spec.weights, preprocess, cfg.engine, device, cfg.amp,
                                 cfg.feature_batch_size, cfg.num_workers, cfg.store, log)
        with passes:
            log(f"feature pass on {passes.engine}")
            feats = {name: passes.features(images, name) for name, images in splits.items()}
            if cfg.augment_views:
                views = [passes.features(splits["train"], f"train view {view + 1}", view, cfg.seed)
                         for view in range(cfg.augment_views)]
                feats["train plain"] = feats["train"]  # the center crops: what the audit looks at
                feats["train"] = tuple(torch.cat(parts) for parts in zip(*views))
    log(f"features ready in {time.perf_counter() - started:.1f}s")
    return feats, passes.engine


def frozen_plan(model, spec, preprocess, splits, cfg, device, log) -> Plan:
    """Features once, from the store or the backbone; the head trains on them."""
    feats, engine = stored_features(model, spec, preprocess, splits, cfg, device, log)
    head = model.head.to(device)
    runner = wrap_ddp(head, device)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.learning_rate)
    loss_fn = nn.CrossEntropyLoss(balance_weights(cfg.balance, splits, log), label_smoothing=cfg.label_smoothing,
                                  reduction="sum").to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    warm = {"loss": train_loss(head, feats, device), "lr": cfg.learning_rate, "seconds": 0.0,
            "note": f"the head of {cfg.init_from}"} if cfg.init_from else None
    return Plan(
        head,
        lambda epoch: train_head_epoch(runner, *feats["train"], optimizer, cfg.batch_size, generator, device,
                                       loss_fn),
        lambda: metrics_from_logits(head_logits(head, feats["valid"][0], device), feats["valid"][1]),
        (lambda: (head_logits(head, feats["test"][0], device), feats["test"][1])) if "test" in feats else None,
        {"optimizer": optimizer}, generator, engine,
        lambda: (head_logits(head, feats["valid"][0], device), feats["valid"][1]), feats, warm)


def train_loss(head: nn.Module, feats: dict, device: torch.device) -> float:
    """The head's loss on the stored train features, in eval mode: epoch 0's train loss."""
    return metrics_from_logits(head_logits(head, feats["train"][0], device), feats["train"][1])["loss"]


def head_first(model, spec, preprocess, splits, cfg, device, log) -> dict:
    """A fine-tune's start: the head trains on stored features (the best valid of HEAD_EPOCHS kept in model.head),
    or is --init_from's as loaded; returns the Plan's `warm` record for epoch 0."""
    started = time.perf_counter()
    plan = frozen_plan(model, spec, preprocess, {s: splits[s] for s in ("train", "valid")}, cfg, device, log)
    if cfg.init_from:
        warm = plan.warm
    else:
        best = (-1.0, 0, None)
        for epoch in range(1, HEAD_EPOCHS + 1):
            plan.train_epoch(epoch)
            va = plan.validate()
            if math.isfinite(va["loss"]) and va["acc"] > best[0]:
                best = (va["acc"], epoch, {k: v.detach().clone() for k, v in model.head.state_dict().items()})
        if best[2] is None:
            raise FlowerclfError("the head's validation loss was never finite on stored features; lower "
                                 "--learning_rate")
        model.head.load_state_dict(best[2])
        log(f"head on stored features: best valid acc {100 * best[0]:.2f}% at epoch {best[1]} of {HEAD_EPOCHS}; "
            f"fine-tuning starts from it")
        warm = {"loss": train_loss(model.head, plan.features, device), "lr": cfg.learning_rate,
                "note": f"the head trained on stored features, epoch {best[1]} of {HEAD_EPOCHS}"}
    return dict(warm, seconds=time.perf_counter() - started)


class OnnxPrefix:
    """The model with its frozen prefix (models.prefix) on ONNX Runtime and the rest in torch: a CPU's fine-tuning
    step. The session lives for one epoch (`with runner.epoch():`), so validation, which runs in torch, and the
    rest of the run get its threads and memory back."""

    def __init__(self, model: nn.Sequential, prefix: Prefix, arch: str, crop_size: int, batch_size: int):
        self.model, self.prefix, self.batch_size, self.forward = model, prefix, batch_size, None
        self.name, self.crop_size, self.checked = f"{arch}-prefix{len(prefix.layers)}", crop_size, None
        self._open().close()  # the export (once per weights, kept beside the pass's) and its check, outside epoch 1

    def _check(self, forward) -> None:
        """The session gives the frozen layers' own output on an example: a cached file that loads may still be
        another network's (a copy from elsewhere, a damaged store), and would train the rest on wrong inputs."""
        example = torch.randn(2, 3, self.crop_size, self.crop_size, generator=torch.Generator().manual_seed(0))
        modes = {m: m.training for m in self.prefix.layers.modules()}
        try:
            with torch.no_grad():
                want = self.prefix.layers.eval()(example)
        finally:
            for module, training in modes.items():
                module.train(training)
        got = forward(example)
        if got.shape != want.shape or not torch.isfinite(got).all() \
                or (got - want).abs().max() > 1e-3 * want.abs().max():
            folder = os.path.join(store_dir(), "onnx")
            raise FlowerclfError(f"{folder}: the export of the frozen stages gives other outputs than they do (a "
                                 f"damaged store, or a faulty export); delete {os.path.join(folder, self.name)}-*.onnx "
                                 f"to export them again")

    def _open(self):
        """A session on the frozen layers' weights as they are now (--resume loads its state after the plan is
        made), checked once per weights."""
        fingerprint = state_fingerprint(self.prefix.layers)
        with torch.random.fork_rng(devices=[]):  # an export draws random inputs: training keeps its own stream
            forward = onnx_forward(self.prefix.layers, self.name, self.crop_size, fingerprint)
        if fingerprint != self.checked:
            try:
                self._check(forward)
            except BaseException:
                forward.close()
                raise
            self.checked = fingerprint
        return forward

    @contextlib.contextmanager
    def epoch(self):
        self.forward = self._open()
        try:
            yield self
        finally:
            self.forward.close()
            self.forward = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # ONNX Runtime takes NCHW, and runs fastest in the feature pass's batches (8 on a CPU): lite0's prefix took
        # 173 ms for 64 images as 8 x 8, 185 ms as 4 x 16, 214 ms at once (2 loaded cores, medians of 3)
        x = x.contiguous()
        given = torch.cat([self.forward(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)])
        return self.model.head(self.prefix.rest(x, given.contiguous(memory_format=torch.channels_last)))


def onnx_prefix(model, preprocess, cfg, device, log) -> OnnxPrefix | None:
    """The fine-tuning step with the frozen stages on ONNX Runtime, where --engine allows it (the feature pass's
    rule: a CPU, one process, no --amp; nor --compile), the backbone cuts (models.prefix) and the export works."""
    if cfg.engine == "torch" or device.type != "cpu" or cfg.amp or cfg.compile or ddp.launched():
        return None
    prefix = frozen_prefix(model.backbone, preprocess.crop_size)
    if prefix is None:
        log("the frozen stages run in torch: the backbone does not cut before its first trainable layer")
        return None
    try:
        runner = OnnxPrefix(model, prefix, cfg.arch, preprocess.crop_size,
                            resolve_feature_batch_size(cfg.feature_batch_size, device))
    except FlowerclfError as e:  # a wrong cached export: its fix, in full
        log(f"warning: {e}; the frozen stages run in torch")
        return None
    except Exception as e:  # exporter and runtime failures are many; every one means "use torch"
        log(f"ONNX Runtime unavailable for the frozen stages ({brief(e, 150)}); they run in torch")
        return None
    log(f"frozen stages (the {len(prefix.layers)} layers before {prefix.cut}) on onnxruntime, the trained ones "
        f"in torch")
    return runner


def finetune_plan(model, preprocess, splits, cfg, device, log, warm: dict | None = None) -> Plan:
    """The last stages of the backbone train with the head, on augmented images; `warm`: head_first's epoch 0."""
    names = unfreeze_last(model.backbone, cfg.unfreeze)
    log(f"fine-tuning backbone stages: {', '.join(names) or 'none'}")
    to_channels_last(model)
    generator = torch.Generator().manual_seed(cfg.seed)
    # --batch_size is global: under torchrun each of the N processes takes batch_size / N per step
    sampler = torch.utils.data.DistributedSampler(range(len(splits["train"])), seed=cfg.seed) \
        if ddp.world() > 1 else None
    # on CUDA every step has the same shape (one cuDNN autotuning), unless that would leave no step at all
    train_loader = make_loader(splits["train"], create_transform(preprocess, augment=True),
                               max(1, cfg.batch_size // ddp.world()), cfg.num_workers, device,
                               shuffle=sampler is None, generator=generator, sampler=sampler,
                               drop_last=device.type == "cuda" and len(splits["train"]) >= cfg.batch_size,
                               copies=working_copies(splits["train"].files, preprocess, cfg.store, log))
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": model.head.parameters(), "lr": cfg.learning_rate},
        {"params": backbone_params, "lr": cfg.learning_rate * cfg.backbone_lr_ratio}], weight_decay=1e-4)
    steps = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps, min(steps, max(1, round(cfg.warmup_epochs * len(train_loader))))))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype(device) == torch.float16)
    loss_fn = nn.CrossEntropyLoss(balance_weights(cfg.balance, splits, log),
                                  label_smoothing=cfg.label_smoothing).to(device)
    runner = wrap_ddp(model, device)
    runner = torch.compile(runner) if cfg.compile else runner
    split = onnx_prefix(model, preprocess, cfg, device, log)

    def train_epoch(epoch: int) -> dict:
        if sampler is not None:
            sampler.set_epoch(epoch)
        with split.epoch() if split is not None else contextlib.nullcontext(runner) as run:
            return finetune_epoch(model, train_loader, optimizer, scheduler, scaler, loss_fn, device, cfg.amp, run)

    logits = {split: split_logits(model, splits[split], preprocess, cfg.feature_batch_size, device, cfg.amp, split,
                                  num_workers=cfg.num_workers) for split in ("valid", "test") if split in splits}
    return Plan(
        model, train_epoch, lambda: metrics_from_logits(*logits["valid"]()), logits.get("test"),
        {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}, generator, "torch", logits["valid"],
        warm=warm)
