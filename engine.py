"""Training and evaluation loops of flowerclf (used by train.py and the benchmarks).

Two paths share one epoch loop (`fit`):
- frozen backbone (default): features are computed once per image (and per augmented
  view), cached in memory and on disk, and the head trains on them in seconds;
- `unfreeze`: the last N backbone stages train too, on decoded images, with a lower
  learning rate for the backbone, warm-up + cosine schedule and optional AMP.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Callable

import torch
import torchvision
from torch import nn
from tqdm import tqdm

import data_utils as du
import ddp
import model_utils as mu
import report

CACHE_DIRNAME = ".feature_cache"
DIST_TIMEOUT_S = 300  # a collective waiting longer than this means a rank died or hung: end the job


@dataclass
class TrainConfig:
    """The training run's settings, as plain values (saved in the checkpoint)."""

    data_dir: str
    save_dir: str = "."
    arch: str = "densenet121"
    weights: str = "DEFAULT"
    hidden_units: list[int] = field(default_factory=lambda: [512])
    dropout: float = 0.2
    learning_rate: float = 0.001
    epochs: int = 10
    batch_size: int = 64
    feature_batch_size: int = 0  # 0: auto, see resolve_feature_batch_size
    device: str = "auto"
    gpu: bool = False
    seed: int = 0
    num_workers: int = 0
    cache: bool = True
    augment_views: int = 0
    unfreeze: int | str = 0
    backbone_lr_ratio: float = 0.1
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    amp: bool = False
    compile: bool = False
    category_names: str | None = None
    engine: str = "auto"
    export: str | None = None
    valid_split: float = 0.0
    skip_bad_images: bool = False
    resume: bool = False


# ---------------------------------------------------------------- loaders and AMP

def make_loader(images: du.ImageSet, transform, batch_size: int, num_workers: int, device: torch.device,
                shuffle: bool = False, generator: torch.Generator | None = None,
                sampler=None) -> torch.utils.data.DataLoader:
    """DataLoader over `images` with `transform` (PIL RGB -> CHW float32 array)."""
    dataset = du.ImageDataset(images.files, images.labels, transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda")


def progress(iterable, desc: str, unit: str = "batch"):
    """A progress bar on rank 0's terminal; nothing elsewhere."""
    return tqdm(iterable, desc=desc, unit=unit, leave=False, disable=None if ddp.is_main() else True)


def eval_transform(preprocess: du.Preprocess):
    """The deterministic resize + center-crop + normalize transform."""
    return partial(du.preprocess_image, pp=preprocess)


def autocast(device: torch.device, enabled: bool):
    """The one mixed-precision context: bf16 where supported (CPU, recent GPUs), else fp16."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(device))


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 unless on a CUDA device without bf16 support."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def to_channels_last(model: nn.Module) -> nn.Module:
    """Channels-last lets oneDNN/cuDNN pick faster conv kernels (1.6x for efficientnet_lite0, 2 CPU cores)."""
    return model.to(memory_format=torch.channels_last)


# ---------------------------------------------------------------- features

Forward = Callable[[torch.Tensor], torch.Tensor]  # a CPU batch of images -> CPU float32 features


def torch_forward(backbone: nn.Module, device: torch.device, amp: bool = False) -> Forward:
    """The backbone in eval mode and channels-last, on `device`."""
    to_channels_last(backbone.eval())

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            return backbone(x).float().cpu()
    return forward


def onnx_cache_dir() -> str:
    """Where exported backbones are kept across runs and projects: $FLOWERCLF_CACHE or ~/.cache/flowerclf."""
    return os.environ.get("FLOWERCLF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowerclf")


def onnx_forward(backbone: nn.Module, arch: str, crop_size: int, fingerprint: str) -> Forward:
    """The backbone through ONNX Runtime's CPU provider, exported once per weights and library versions."""
    import onnx
    import onnxruntime as ort

    versions = f"{torch.__version__}|{onnx.__version__}|{ort.__version__}|{crop_size}"
    key = hashlib.sha256(f"{fingerprint}|{versions}".encode()).hexdigest()[:24]
    path = os.path.join(onnx_cache_dir(), "onnx", f"{arch}-{key}.onnx")
    if not os.path.isfile(path):  # a copy: the export moves the module to contiguous format
        mu.export_onnx(copy.deepcopy(backbone), path, crop_size)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def feature_forward(backbone: nn.Module, arch: str, crop_size: int, engine: str, device: torch.device,
                    amp: bool, fingerprint: str, log: Callable[[str], None]) -> tuple[Forward, str]:
    """The frozen backbone's forward on the chosen engine, and the engine actually used.

    auto: ONNX Runtime on a CPU (3.2x torch for efficientnet_lite0 on 2 cores), torch elsewhere and
    under torchrun (where the processes already share the cores).
    A failed export falls back to torch with one line.
    """
    use_ort = engine == "onnxruntime" or (engine == "auto" and device.type == "cpu" and not amp
                                          and not ddp.launched())
    if use_ort and ddp.launched():
        raise du.FlowerclfError("--engine onnxruntime is for single-process runs; under torchrun use --engine torch")
    if use_ort and device.type != "cpu":
        raise du.FlowerclfError(f"--engine onnxruntime runs on the CPU, but the device is {device}; "
                                f"pass --device cpu or --engine torch")
    if use_ort:
        try:
            return onnx_forward(backbone, arch, crop_size, fingerprint), "onnxruntime"
        except Exception as e:  # exporter and runtime failures are many; every one means "use torch"
            detail = str(e).splitlines()[0][:150] if str(e) else ""
            log(f"ONNX Runtime unavailable for {arch} ({type(e).__name__}: {detail}); using torch")
    return torch_forward(backbone, device, amp), "torch"


@torch.inference_mode()
def extract_features(forward: Forward, loader, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen backbone once over `loader`; return (features, labels) on the CPU."""
    feats, labels = [], []
    for x, y in progress(loader, desc):
        feats.append(forward(x))
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def feature_key(images: du.ImageSet, fingerprint: str, preprocess: du.Preprocess, view: int | None,
                seed: int, amp: bool, engine: str) -> str:
    """Hash of everything that changes the features; nothing about the head or the optimizer."""
    files = [(f, st.st_size, st.st_mtime_ns) for f in images.files for st in (os.stat(f),)]
    blob = json.dumps({"files": files, "labels": images.labels, "backbone": fingerprint,
                       "preprocess": preprocess.to_dict(), "view": view, "seed": seed if view is not None else None,
                       "amp": amp, "engine": engine, "torch": torch.__version__,
                       "torchvision": torchvision.__version__})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def sharded_features(forward: Forward, images: du.ImageSet, transform, batch_size: int, num_workers: int,
                     device: torch.device, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image, in order; under torchrun each rank computes its shard and they swap."""
    mine = ddp.shard(len(images))
    if not mine:
        raise du.FlowerclfError(f"{images.root} has {len(images)} images, fewer than the {ddp.world()} processes")
    part = du.ImageSet(images.root, [images.files[i] for i in mine], [images.labels[i] for i in mine])
    feats, _ = extract_features(forward, make_loader(part, transform, batch_size, num_workers, device), desc)
    return ddp.gather_rows(feats, len(images), device), torch.as_tensor(images.labels)


def cached_features(forward: Forward, images: du.ImageSet, transform, key: str | None, cache_dir: str,
                    cfg: TrainConfig, device: torch.device, desc: str, log: Callable[[str], None]):
    """Features of `images` from the disk cache when `key` is there, else computed (and stored)."""
    path = os.path.join(cache_dir, f"{key}.pt") if key else None
    if path and ddp.all_true(os.path.isfile(path), device):  # every rank takes the same branch
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return data["features"], data["labels"]
        except Exception:  # a damaged cache file is only a miss
            log(f"warning: ignoring unreadable feature cache {path}")
    feats = sharded_features(forward, images, transform, cfg.feature_batch_size, cfg.num_workers, device, desc)
    if path and ddp.is_main():
        mu.atomic_save({"features": feats[0], "labels": feats[1]}, path)
    return feats


# ---------------------------------------------------------------- one epoch

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


@torch.inference_mode()
def features_logits(head: nn.Module, feats: torch.Tensor, device: torch.device,
                    batch_size: int = 1024) -> torch.Tensor:
    """Logits of `head` on cached features, on the CPU."""
    head.eval()
    return torch.cat([head(feats[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(feats), batch_size)])


def split_logits(model: nn.Sequential, images: du.ImageSet, preprocess: du.Preprocess, batch_size: int,
                 device: torch.device, amp: bool = False, desc: str = "eval", forward: Forward | None = None,
                 num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a whole split, computed as training computes them: backbone, then head."""
    feats, labels = sharded_features(forward or torch_forward(model.backbone, device, amp), images,
                                     eval_transform(preprocess), batch_size, num_workers, device, desc)
    return features_logits(model.head, feats, device), labels


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-k (k = min(5, classes)) accuracy."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    return {
        "loss": nn.functional.cross_entropy(logits, labels).item(),
        "acc": (topk[:, 0] == labels).float().mean().item(),
        "top5": (topk == labels[:, None]).any(dim=1).float().mean().item(),
    }


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear warm-up to 1, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


# ---------------------------------------------------------------- the run

def format_epoch(epoch: int, epochs: int, train: dict, valid: dict, seconds: float) -> str:
    """The one line printed after each epoch."""
    return (f"epoch {epoch}/{epochs}  train loss {train['loss']:.4f}  valid loss {valid['loss']:.4f}  "
            f"valid acc {100 * valid['acc']:.2f}%  {seconds:.1f}s")


class NonFiniteLoss(du.FlowerclfError):
    """The training loss became NaN or infinite."""


def check_finite(loss: torch.Tensor) -> None:
    """Stop on a NaN or infinite loss (note: a CPU-GPU sync point, once per batch)."""
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"the training loss became {loss.item()}; lower --learning_rate (or drop --amp)")


@dataclass
class Plan:
    """What a training path hands the shared epoch loop."""

    trained: nn.Module                    # the part whose weights change: the head, or the whole model
    train_epoch: Callable[[int], dict]
    validate: Callable[[], dict]
    test_logits: Callable[[], tuple] | None
    stateful: dict                        # optimizer, scheduler, scaler...: objects with state_dict()
    generator: torch.Generator            # the order of training batches
    engine: str


def _frozen_plan(model, spec, preprocess, splits, cfg, device, log) -> Plan:
    """Cache features once; the head trains on them."""
    cache_dir = os.path.join(cfg.save_dir, CACHE_DIRNAME)
    started = time.perf_counter()
    fingerprint = mu.state_fingerprint(model.backbone)
    forward, engine = feature_forward(model.backbone, spec.arch, preprocess.crop_size, cfg.engine, device, cfg.amp,
                                      fingerprint, log)
    log(f"feature pass on {engine}")
    key = (lambda images, view: feature_key(images, fingerprint, preprocess, view, cfg.seed, cfg.amp, engine)) \
        if cfg.cache else (lambda images, view: None)
    feats = {}
    for name, images in splits.items():
        feats[name] = cached_features(forward, images, eval_transform(preprocess), key(images, None),
                                      cache_dir, cfg, device, f"features {name}", log)
    if cfg.augment_views:
        augment = du.train_transform(preprocess)
        views = []
        rng = torch.get_rng_state()
        for view in range(cfg.augment_views):
            torch.manual_seed(cfg.seed * 1000 + view)  # each view is its own reproducible draw
            views.append(cached_features(forward, splits["train"], augment, key(splits["train"], view),
                                         cache_dir, cfg, device, f"features train view {view + 1}", log))
        torch.set_rng_state(rng)  # so a cache hit and a miss leave training on the same random stream
        feats["train"] = tuple(torch.cat(parts) for parts in zip(*views))
    log(f"features ready in {time.perf_counter() - started:.1f}s")

    head = model.head.to(device)
    trained = wrap_ddp(head, device)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.learning_rate)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="sum")
    generator = torch.Generator().manual_seed(cfg.seed)
    return Plan(
        head,
        lambda epoch: train_head_epoch(trained, *feats["train"], optimizer, cfg.batch_size, generator, device,
                                       loss_fn),
        lambda: metrics_from_logits(features_logits(head, feats["valid"][0], device), feats["valid"][1]),
        (lambda: (features_logits(head, feats["test"][0], device), feats["test"][1])) if "test" in feats else None,
        {"optimizer": optimizer}, generator, engine)


def _finetune_plan(model, preprocess, splits, cfg, device, log) -> Plan:
    """The last stages of the backbone train with the head, on augmented images."""
    names = mu.unfreeze_last(model.backbone, cfg.unfreeze)
    log(f"fine-tuning backbone stages: {', '.join(names) or 'none'}")
    to_channels_last(model)
    generator = torch.Generator().manual_seed(cfg.seed)
    # --batch_size is global: under torchrun each of the N processes takes batch_size / N per step
    sampler = torch.utils.data.DistributedSampler(range(len(splits["train"])), seed=cfg.seed) \
        if ddp.world() > 1 else None
    train_loader = make_loader(splits["train"], du.train_transform(preprocess),
                               max(1, cfg.batch_size // ddp.world()), cfg.num_workers, device,
                               shuffle=sampler is None, generator=generator, sampler=sampler)
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": model.head.parameters(), "lr": cfg.learning_rate},
        {"params": backbone_params, "lr": cfg.learning_rate * cfg.backbone_lr_ratio}], weight_decay=1e-4)
    steps = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps, min(steps, max(1, round(cfg.warmup_epochs * len(train_loader))))))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype(device) == torch.float16)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    runner = wrap_ddp(model, device)
    runner = torch.compile(runner) if cfg.compile else runner

    def train_epoch(epoch: int) -> dict:
        if sampler is not None:
            sampler.set_epoch(epoch)
        return finetune_epoch(model, train_loader, optimizer, scheduler, scaler, loss_fn, device, cfg.amp, runner)

    def logits(split: str):
        return split_logits(model, splits[split], preprocess, cfg.feature_batch_size, device, cfg.amp, split,
                            num_workers=cfg.num_workers)

    return Plan(
        model, train_epoch, lambda: metrics_from_logits(*logits("valid")),
        (lambda: logits("test")) if "test" in splits else None,
        {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}, generator, "torch")


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around what trains, under torchrun; the module itself otherwise."""
    if ddp.world() == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def resolve_feature_batch_size(requested: int, device: torch.device) -> int:
    """Batch size of inference passes. On a CPU small batches stay in cache: efficientnet_lite0 on 2 cores
    ran 67 img/s at 8, 57 at 16, 45 at 64, 31 at 128 (benchmarks/bench_train.py probes this too)."""
    return requested or (8 if device.type == "cpu" else 128)


def _cpu_state(state: dict) -> dict:
    """A copy of a state dict on the CPU (a copy even for CPU tensors, so training cannot change it)."""
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def resume_state(plan: Plan, spec: mu.ModelSpec, class_to_idx: dict, epoch: int, history: list, best: dict,
                 args: dict) -> dict:
    """checkpoint_last.pth: everything needed to continue exactly where this epoch ended (plain data)."""
    return {
        "format": mu.RESUME_FORMAT, "version": mu.CHECKPOINT_VERSION, "model": spec.to_dict(),
        "class_to_idx": dict(class_to_idx), "unfreeze": args["unfreeze"], "epoch": epoch, "history": history,
        "best": {k: best[k] for k in ("epoch", "acc", "loss")}, "best_state": best["state"],
        "trained_state": _cpu_state(plan.trained.state_dict()),
        "stateful": {name: obj.state_dict() for name, obj in plan.stateful.items()},
        "generator": plan.generator.get_state(), "rng": torch.get_rng_state(), "args": args,
    }


def restore(path: str, plan: Plan, spec: mu.ModelSpec, class_to_idx: dict, unfreeze) -> tuple[int, list, dict]:
    """Load checkpoint_last.pth into `plan`; return (next epoch, history, best)."""
    if not os.path.isfile(path):
        raise du.FlowerclfError(f"--resume: {path} does not exist; train without --resume first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusals, truncation: all mean "cannot resume from this"
        raise du.FlowerclfError(f"--resume: {path} is not loadable ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != mu.RESUME_FORMAT:
        raise du.FlowerclfError(f"--resume: {path} is not a train.py resume state")
    if state["class_to_idx"] != class_to_idx:
        raise du.FlowerclfError(f"--resume: {path} was made for classes {sorted(state['class_to_idx'])[:8]}, "
                                f"but the data has {sorted(class_to_idx)[:8]}; use another --save_dir")
    if state["model"] != spec.to_dict() or state["unfreeze"] != unfreeze:
        raise du.FlowerclfError(f"--resume: {path} was made with other model settings ({state['model']}, "
                                f"unfreeze {state['unfreeze']}); pass the same --arch, --weights, "
                                f"--hidden_units, --dropout and --unfreeze")
    plan.trained.load_state_dict(state["trained_state"])
    for name, obj in plan.stateful.items():
        obj.load_state_dict(state["stateful"][name])
    plan.generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"])
    return state["epoch"] + 1, state["history"], dict(state["best"], state=state["best_state"])


def check_data(cfg: TrainConfig) -> str:
    """train.py --check: scan DATA_DIR, decode every image; a report, or an error listing each bad file."""
    splits = du.scan_data_dir(cfg.data_dir, cfg.valid_split, cfg.seed)
    splits, warnings_ = du.check_splits(splits, full=True, skip_bad=cfg.skip_bad_images)
    summary = (f"{cfg.data_dir}: " + ", ".join(f"{len(s)} {n}" for n, s in splits.items())
               + f" images, {len(splits['train'].class_to_idx)} classes, all readable")
    return "\n".join(warnings_ + [summary])


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train a new head (and optionally the last backbone stages), save the best epoch; return the results.

    checkpoint.pth is rewritten whenever validation accuracy improves and checkpoint_last.pth
    after every epoch (both atomically), so a crash or Ctrl-C loses at most the running epoch.
    Under torchrun every rank runs this; only rank 0 logs and writes files.
    """
    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial heads
    device = ddp.setup(mu.resolve_device(cfg.device, cfg.gpu), DIST_TIMEOUT_S)
    main = ddp.is_main()
    if not main:
        log = lambda line: None  # noqa: E731
    cfg = replace(cfg, feature_batch_size=resolve_feature_batch_size(cfg.feature_batch_size, device))
    splits = du.scan_data_dir(cfg.data_dir, cfg.valid_split, cfg.seed)
    splits, warnings_ = du.check_splits(splits, full=cfg.skip_bad_images, skip_bad=cfg.skip_bad_images)
    for line in warnings_:
        log(line)
    names = du.load_category_names(cfg.category_names)  # fail before training, not after
    class_to_idx = splits["train"].class_to_idx
    spec = mu.ModelSpec(cfg.arch, mu.resolve_weights(cfg.arch, cfg.weights).spec, list(cfg.hidden_units),
                        cfg.dropout, len(class_to_idx))
    model, preprocess = mu.build_model(spec)
    mu.freeze(model.backbone)
    model.to(device)
    log(f"{cfg.arch} on {device}" + (f" x {ddp.world()} processes" if ddp.world() > 1 else "") + ": "
        + ", ".join(f"{len(s)} {n}" for n, s in splits.items()) + f" images, {len(class_to_idx)} classes")

    if cfg.unfreeze:
        plan = _finetune_plan(model, preprocess, splits, cfg, device, log)
    else:
        plan = _frozen_plan(model, spec, preprocess, splits, cfg, device, log)
    cfg = replace(cfg, engine=plan.engine)  # recorded, so evaluate.py recomputes features the same way
    args = asdict(cfg)
    out, last = os.path.join(cfg.save_dir, "checkpoint.pth"), os.path.join(cfg.save_dir, "checkpoint_last.pth")
    start, history, best = 1, [], {"epoch": 0, "acc": -1.0, "loss": math.inf, "state": None}
    if cfg.resume:
        start, history, best = restore(last, plan, spec, class_to_idx, cfg.unfreeze)
        log(f"resuming after epoch {start - 1} (best so far: epoch {best['epoch']})")

    def save(path: str, epoch: int, **extra) -> None:
        if main:
            mu.atomic_save(mu.make_checkpoint(model, spec, preprocess, class_to_idx, epoch=epoch, history=history,
                                              args=args, **extra), path)

    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        rate = plan.stateful["optimizer"].param_groups[0]["lr"]
        try:
            tr = plan.train_epoch(epoch)
        except NonFiniteLoss as e:
            kept = f"{out} keeps epoch {best['epoch']}, the best so far" if best["epoch"] else "no checkpoint was saved"
            raise du.FlowerclfError(f"{e} (epoch {epoch}); {kept}") from None
        va = plan.validate()
        seconds = time.perf_counter() - t0
        history.append({"epoch": epoch, "train_loss": tr["loss"], "valid_loss": va["loss"], "valid_acc": va["acc"],
                        "seconds": seconds, "lr": rate})
        log(format_epoch(epoch, cfg.epochs, tr, va, seconds))
        if va["acc"] > best["acc"]:
            best = {"epoch": epoch, "acc": va["acc"], "loss": va["loss"],
                    "state": _cpu_state(plan.trained.state_dict())}
            save(out, epoch, metrics={"valid_loss": va["loss"], "valid_acc": va["acc"]})
        if main:
            mu.atomic_save(resume_state(plan, spec, class_to_idx, epoch, history, best, args), last)

    plan.trained.load_state_dict(best["state"])
    metrics = {"valid_loss": best["loss"], "valid_acc": best["acc"]}
    test = plan.test_logits() if plan.test_logits else None
    if test is not None:
        m = metrics_from_logits(*test)
        metrics.update(test_loss=m["loss"], test_acc=m["acc"], test_top5=m["top5"])
        log(f"test accuracy: top-1 {100 * m['acc']:.2f}%  top-5 {100 * m['top5']:.2f}%  "
            f"(best epoch {best['epoch']})")
    save(out, best["epoch"], metrics=metrics)
    result = {"checkpoint": out, "metrics": metrics, "history": history, "epoch": best["epoch"]}
    ddp.cleanup()
    if not main:
        return result
    log(f"saved {out} (epoch {best['epoch']}, valid acc {100 * best['acc']:.2f}%)")
    written = report.write_history(history, cfg.save_dir)
    if test is not None:
        classes = du.class_names(class_to_idx)
        written += report.write_report(report.classification_report(
            test[0].numpy(), test[1].numpy(), classes, names), cfg.save_dir)
    if cfg.export == "onnx":
        written.append(mu.export_checkpoint_onnx(out))
    log("wrote " + ", ".join(os.path.basename(p) for p in written))
    return result
