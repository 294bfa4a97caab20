"""ResumeState: checkpoint_last.pth, written after every epoch and read by --resume, built, checked and applied here."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from flowerclf.base.errors import FlowerclfError
from flowerclf.base.schema import CHECKPOINT_VERSION, RESUME_FORMAT
from flowerclf.models.registry import ModelSpec

# the fields a resume state must have, with their types: a file is data from anywhere
_TYPES = {"epoch": int, "history": list, "best": dict, "trained_state": dict, "stateful": dict,
          "generator": torch.Tensor, "rng": torch.Tensor, "class_to_idx": dict, "model": dict}

# flags a resumed run may change: where the data and outputs are, how fast and on what it runs, how long
RESUMABLE_FLAGS = frozenset({"data_dir", "save_dir", "epochs", "feature_batch_size", "device", "gpu", "num_workers",
                             "store", "compile", "engine", "category_names", "export", "skip_bad_images", "resume",
                             "overwrite", "patience", "audit"})


@dataclass
class ResumeState:
    """Everything needed to continue a run exactly where an epoch ended, as plain data."""

    model: dict               # ModelSpec.to_dict()
    class_to_idx: dict
    unfreeze: int | str
    epoch: int                # the epoch that ended
    history: list
    best: dict                # epoch, acc and loss of the best epoch so far
    best_state: dict | None   # its weights
    trained_state: dict       # the trainable part's weights after `epoch`
    stateful: dict            # optimizer, scheduler, scaler...: name -> state_dict()
    generator: torch.Tensor   # the order of training batches
    rng: torch.Tensor         # torch's global random state (dropout masks)
    args: dict
    # the random state of the CUDA device this process trains on (its current one), when CUDA was in use;
    # under torchrun every rank's stream is rank 0's (one seed, the same ops), as with `rng`
    cuda_rng: torch.Tensor | None = None
    split: dict | None = None  # a split carved from train/ or DATA_DIR (data.layout.split_record): the same on resume

    @classmethod
    def capture(cls, trained_state: dict, stateful: dict, generator: torch.Generator, spec: ModelSpec,
                class_to_idx: dict, epoch: int, history: list, best: dict, args: dict,
                split: dict | None = None) -> "ResumeState":
        """The state of the run now, at the end of `epoch`."""
        return cls(spec.to_dict(), dict(class_to_idx), args["unfreeze"], epoch, history,
                   {k: best[k] for k in ("epoch", "acc", "loss")}, best["state"], trained_state,
                   {name: obj.state_dict() for name, obj in stateful.items()}, generator.get_state(),
                   torch.get_rng_state(), args,
                   torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None, split)

    def to_dict(self) -> dict:
        """What torch.save writes: the format's name and version, then every field."""
        return {"format": RESUME_FORMAT, "version": CHECKPOINT_VERSION,
                **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def read(cls, path: str, spec: ModelSpec, class_to_idx: dict, unfreeze) -> "ResumeState":
        """Load checkpoint_last.pth and check it continues this run (same classes and model flags)."""
        if not os.path.isfile(path):
            raise FlowerclfError(f"--resume: {path} does not exist; train without --resume first")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle refusals, truncation: all mean "cannot resume from this"
            raise FlowerclfError(f"--resume: {path} is not loadable ({type(e).__name__})") from None
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            raise FlowerclfError(f"--resume: {path} is not a train.py resume state")
        for key, kind in _TYPES.items():
            if not isinstance(state.get(key), kind):
                raise FlowerclfError(f"--resume: {path}: field '{key}' is missing or not {kind.__name__}; the file "
                                     f"is damaged; train again with --overwrite")
        cuda_rng = state.get("cuda_rng")
        if cuda_rng is not None and not isinstance(cuda_rng, torch.Tensor):
            raise FlowerclfError(f"--resume: {path}: field 'cuda_rng' is not a tensor; the file is damaged; "
                                 f"train again with --overwrite")
        if state["class_to_idx"] != class_to_idx:
            raise FlowerclfError(f"--resume: {path} was made for classes {sorted(state['class_to_idx'])[:8]}, "
                                 f"but the data has {sorted(class_to_idx)[:8]}; use another --save_dir")
        if state["model"] != spec.to_dict() or state.get("unfreeze") != unfreeze:
            raise FlowerclfError(f"--resume: {path} was made with other model settings ({state['model']}, "
                                 f"unfreeze {state.get('unfreeze')}); pass the same --arch, --weights, "
                                 f"--hidden_units, --dropout and --unfreeze")
        return cls(**{f.name: state.get(f.name) for f in fields(cls)})

    def check_args(self, args: dict, path: str) -> None:
        """Refuse a resume whose training flags differ from the run it continues (they would be ignored).

        Free to change: what only says where and how fast the run goes (`RESUMABLE_FLAGS`), and
        --epochs, which is how a run is extended.
        """
        if not isinstance(self.args, dict):
            raise FlowerclfError(f"--resume: {path}: field 'args' is missing or not dict; the file is damaged; "
                                 f"train again with --overwrite")
        # --valid_split 0 and unset mean the same wherever a run resumes (a validation folder, or the split the
        # state records); states from before the carved split said 0
        changed = [f"--{k} {self.args[k]!r:.40} (now {v!r:.40})" for k, v in args.items()
                   if k not in RESUMABLE_FLAGS and k in self.args and self.args[k] != v
                   and not (k == "valid_split" and not self.args[k] and not v)]
        if changed:
            raise FlowerclfError(f"--resume: {path} was trained with {', '.join(changed)}; a resumed run keeps its "
                                 f"settings, so pass the same flags, or train anew with --overwrite")

    def apply(self, trainable: torch.nn.Module, stateful: dict, generator: torch.Generator,
              path: str) -> tuple[int, list, dict]:
        """Load this state into the run's objects; return (the next epoch, the history, the best so far)."""
        trainable.load_state_dict(self.trained_state)
        for name, obj in stateful.items():
            if name not in self.stateful:
                raise FlowerclfError(f"--resume: {path} has no {name} state; train again with --overwrite")
            if isinstance(obj, torch.amp.GradScaler) and obj.is_enabled() != bool(self.stateful[name]):
                # a disabled scaler's state is {}: bf16 or no --amp, where this machine would take fp16, or back
                said = ("fp16 with loss scaling", "bf16 or no --amp")
                raise FlowerclfError(f"--resume: {path} was trained with {said[obj.is_enabled()]}, but this run "
                                     f"uses {said[not obj.is_enabled()]} (--amp picks fp16 on GPUs without "
                                     f"bf16); resume where the same precision is picked, or train again "
                                     f"with --overwrite")
            obj.load_state_dict(self.stateful[name])
        generator.set_state(self.generator)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None and torch.cuda.is_available():  # dropout masks drawn on the GPU
            torch.cuda.set_rng_state(self.cuda_rng)
        return self.epoch + 1, self.history, dict(self.best, state=self.best_state)
