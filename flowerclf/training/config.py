"""TrainConfig: a training run's settings as plain values, checked when made (saved in the checkpoint)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from flowerclf.base.errors import FlowerclfError
from flowerclf.base.schema import DEVICES, MAX_HIDDEN_UNITS

MAX_SEED = 2 ** 32 - 1


@dataclass
class TrainConfig:
    """The training run's settings, as plain values (saved in the checkpoint); checked when made."""

    data_dir: str
    save_dir: str = "."
    arch: str = "densenet121"
    weights: str = "DEFAULT"
    hidden_units: list[int] = field(default_factory=lambda: [512])
    dropout: float = 0.2
    learning_rate: float = 0.001
    epochs: int = 10
    batch_size: int = 64
    feature_batch_size: int = 0  # 0: auto, see devices.resolve_feature_batch_size
    device: str = "auto"
    gpu: bool = False
    seed: int = 0
    num_workers: int | str = "auto"  # see devices.resolve_num_workers
    store: bool = True  # --no_store (alias --no_cache): neither read nor write the feature store
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
    valid_split: float | None = None  # None: 0.2 of train/ when DATA_DIR has no validation folder
    balance: str = "auto"  # weight the loss by inverse class frequency: off, on, or auto (on past SKEW)
    skip_bad_images: bool = False
    resume: bool = False
    overwrite: bool = False
    patience: int = 5  # stop after this many epochs without a better validation accuracy; 0: never
    init_from: str | None = None  # a checkpoint whose head this run starts from (epoch 0 is its valid score)
    audit: bool = True  # --no_audit: no data audit (mislabeled photos, duplicates, leaks) after a frozen run

    def __post_init__(self):
        """Every caller (train.py, tests, benchmarks) gets the same checks, before any work."""
        self.hidden_units = [h for h in self.hidden_units if h != 0]  # "0" means no hidden layer
        numbers = {"--dropout": self.dropout, "--learning_rate": self.learning_rate,
                   "--backbone_lr_ratio": self.backbone_lr_ratio, "--warmup_epochs": self.warmup_epochs,
                   "--label_smoothing": self.label_smoothing, "--valid_split": self.valid_split or 0}
        not_finite = [flag for flag, v in numbers.items() if not math.isfinite(v)]
        problems = [
            (not not_finite, " and ".join(not_finite) + (" must be finite numbers" if len(not_finite) > 1
                                                          else " must be a finite number")),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch_size must be at least 1"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.learning_rate > 0, "--learning_rate must be positive"),
            (self.backbone_lr_ratio > 0, "--backbone_lr_ratio must be positive"),
            (0 <= self.warmup_epochs <= self.epochs, f"--warmup_epochs must be from 0 to --epochs ({self.epochs})"),
            (0 <= self.label_smoothing < 1, "--label_smoothing must be in [0, 1)"),
            (self.valid_split is None or 0 <= self.valid_split < 1, "--valid_split must be in [0, 1)"),
            (self.balance in ("off", "on", "auto"), "--balance must be off, on or auto"),
            (all(0 < h <= MAX_HIDDEN_UNITS for h in self.hidden_units),
             f"--hidden_units must be whole numbers from 0 to {MAX_HIDDEN_UNITS}"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be a whole number from 0 to {MAX_SEED}"),
            (self.num_workers == "auto" or (isinstance(self.num_workers, int) and self.num_workers >= 0),
             "--num_workers must be auto or a whole number, 0 or more"),
            (self.feature_batch_size >= 0, "--feature_batch_size must be 0 (auto) or more"),
            (self.augment_views >= 0, "--augment_views must be 0 or more"),
            (isinstance(self.patience, int) and self.patience >= 0, "--patience must be a whole number, 0 or more"),
            (self.unfreeze == "all" or (isinstance(self.unfreeze, int) and self.unfreeze >= 0),
             "--unfreeze must be a number of stages or 'all'"),
            (not (self.augment_views and self.unfreeze),
             "--augment_views is for the frozen, cached path; --unfreeze augments every epoch already"),
            (not self.compile or bool(self.unfreeze),
             "--compile applies to --unfreeze training (the frozen path trains a small head)"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
            (not self.gpu or self.device in ("auto", "cuda"),
             f"--gpu asks for CUDA but --device is {self.device}; pass one of them"),
            (self.engine in ("auto", "torch", "onnxruntime"), "--engine must be auto, torch or onnxruntime"),
            (self.export in (None, "onnx"), "--export takes onnx"),
            (not (self.resume and self.overwrite), "--resume continues the run in --save_dir and --overwrite "
                                                   "replaces it; pass one of them"),
        ]
        for ok, message in problems:
            if not ok:
                raise FlowerclfError(message)
