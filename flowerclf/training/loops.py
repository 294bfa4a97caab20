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
from flowerclf.evaluation.metrics import accuracies
from flowerclf.features.engines import torch_forward
from flowerclf.features.passes import head_logits, sharded_features
from flowerclf.runtime import ddp
from flowerclf.runtime.devices import autocast


class NonFiniteModel(FlowerclfError):
    """Training went NaN or infinite: the loss, a weight or the validation loss."""


def check_finite(loss: torch.Tensor) -> None:
    """Stop on a NaN or infinite loss (note: a CPU-GPU sync point, once per batch)."""
    if not torch.isfinite(loss):
        raise NonFiniteModel(f"the training loss became {loss.item()}; lower --learning_rate (or drop --amp)")


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
    total, world = 0.0, ddp.world()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        mine = idx[ddp.rank()::world]
        x, y = feats[mine].to(device), labels[mine].to(device)
        loss = loss_fn(head(x), y) * (world / len(idx))
        check_finite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx) / world
    return {"loss": ddp.all_sum(total, device) / len(order)}


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
    total, count = 0.0, 0
    for x, y in progress(loader, "train"):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(y).to(device, non_blocking=True)
        with autocast(device, amp):
            loss = loss_fn(runner(x), y)
        check_finite(loss)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.item() * len(y)
        count += len(y)
    return {"loss": ddp.all_sum(total, device) / ddp.all_sum(count, device)}


def split_logits(model: nn.Sequential, images: ImageSet, preprocess: Preprocess, batch_size: int,
                 device: torch.device, amp: bool = False, desc: str = "eval",
                 num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a whole split through the whole model (fine-tuning): backbone, then head."""
    feats, labels = sharded_features(torch_forward(model.backbone, device, amp), images,
                                     create_transform(preprocess), batch_size, num_workers, device, desc)
    return head_logits(model.head, feats, device), labels


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-k (k = min(5, classes)) accuracy."""
    top1, top5 = accuracies(logits.numpy(), labels.numpy())
    return {"loss": nn.functional.cross_entropy(logits, labels).item(), "acc": top1, "top5": top5}


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear warm-up to 1, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor
