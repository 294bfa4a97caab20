"""Epoch loops: the head on stored features, fine-tuning on images, logits and metrics of a split."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from flowerclf.base.errors import FlowerclfError
from flowerclf.base.progress import progress
from flowerclf.data.folders import ImageSet
from flowerclf.data.transforms import Preprocess, create_transform
from flowerclf.evaluation.metrics import accuracies, balanced_accuracy
from flowerclf.features.engines import torch_forward
from flowerclf.data.loaders import input_batches
from flowerclf.features.passes import extract_features, head_logits, shard_of
from flowerclf.runtime import ddp
from flowerclf.runtime.devices import autocast


class NonFiniteModel(FlowerclfError):
    """Training went NaN or infinite: the loss, a weight or the validation loss."""


# Steps between looks at the summed loss. Each look is a CPU-GPU sync point (a stall of the GPU's queue);
# a NaN or infinite loss still stops the epoch within this many steps, and the epoch is never saved.
CHECK_EVERY = 50


def check_finite(total: torch.Tensor) -> None:
    """Stop when a sum of training losses is NaN or infinite: one of them was (note: a CPU-GPU sync point)."""
    if not torch.isfinite(total):
        raise NonFiniteModel(f"the training loss became {total.item()}; lower --learning_rate (or drop --amp)")


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around what trains, under torchrun; the module itself otherwise."""
    if ddp.world() == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def train_head_epoch(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor,
                     optimizer: torch.optim.Optimizer, batch_size: int, generator: torch.Generator,
                     device: torch.device, loss_fn: nn.Module) -> dict[str, float]:
    """One epoch of the head over cached features, in a seeded random order.

    `loss_fn` sums over samples. Under torchrun every rank draws the same global batch and
    takes its share; scaling by world / batch makes DDP's gradient average the mean over
    the whole batch, as in one process.
    """
    head.train()
    order = torch.randperm(len(labels), generator=generator)
    total, world = torch.zeros((), device=device), ddp.world()  # summed on the device: no sync per step
    for step, start in enumerate(range(0, len(order), batch_size), 1):
        idx = order[start:start + batch_size]
        mine = idx[ddp.rank()::world]
        x, y = feats[mine].to(device), labels[mine].to(device)
        loss = loss_fn(head(x), y) * (world / len(idx))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * (len(idx) / world)
        if step % CHECK_EVERY == 0:
            check_finite(total)
    check_finite(total)
    return {"loss": ddp.all_sum(total.item(), device) / len(order)}


def class_weights(labels: list[int], n_classes: int) -> torch.Tensor:
    """Inverse class frequency, weight_c = N / (C * n_c): each class weighs in the loss as if all were n_c = N / C."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=n_classes).double()
    return (counts.sum() / (n_classes * counts.clamp(min=1))).float()


def set_train_mode(model: nn.Sequential) -> None:
    """Train mode for what trains; frozen modules stay in eval so their BatchNorm statistics hold."""
    model.train()
    for module in model.backbone.modules():
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()


def finetune_epoch(model: nn.Sequential, loader, optimizer, scheduler, scaler, loss_fn: nn.Module,
                   device: torch.device, amp: bool, runner: nn.Module | None = None) -> dict[str, float]:
    """One epoch over images with part of the backbone trainable; `runner` may wrap `model` (DDP, compile)."""
    set_train_mode(model)
    runner = runner or model
    total, count = torch.zeros((), device=device), 0  # the loss summed on the device: no sync per step
    for step, (x, y) in enumerate(progress(loader, "train"), 1):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(y).to(device, non_blocking=True)
        with autocast(device, amp):
            loss = loss_fn(runner(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.detach().float() * len(y)
        count += len(y)
        if step % CHECK_EVERY == 0:
            check_finite(total)
    check_finite(total)
    return {"loss": ddp.all_sum(total.item(), device) / ddp.all_sum(count, device)}


def split_logits(model: nn.Sequential, images: ImageSet, preprocess: Preprocess, batch_size: int,
                 device: torch.device, amp: bool = False, desc: str = "eval",
                 num_workers: int = 0) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A function giving (logits, labels) of a whole split through the whole model (fine-tuning): backbone, then head.

    Its input loader is built here, once: called every epoch, it keeps the same persistent workers.
    """
    part, _, sharded = shard_of(images)
    batches = input_batches(part, create_transform(preprocess), batch_size, num_workers, device)
    labels = torch.as_tensor(images.labels)

    def logits() -> tuple[torch.Tensor, torch.Tensor]:
        forward = torch_forward(model.backbone, device, amp, batch_size)  # eval mode again, after training
        feats, _ = extract_features(forward, batches, desc)
        feats = ddp.gather_rows(feats, len(images), device) if sharded else feats
        return head_logits(model.head, feats, device), labels
    return logits


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-k (k = min(5, classes)) accuracy, balanced accuracy."""
    top1, top5 = accuracies(logits.numpy(), labels.numpy())
    return {"loss": nn.functional.cross_entropy(logits, labels).item(), "acc": top1, "top5": top5,
            "balanced": balanced_accuracy(logits.numpy(), labels.numpy())}


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear warm-up to 1, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor
