"""Models, the public face: the backbone registry, heads, --unfreeze stages, and checkpoints to rebuild them from.

Everything here lives in `flowerclf.models`; this module names the part other code and notebooks use.
"""
from __future__ import annotations

from flowerclf.models.checkpoints import load_model, make_checkpoint, read_checkpoint
from flowerclf.models.registry import (
                                       ModelSpec,
                                       WeightsChoice,
                                       build_head,
                                       build_model,
                                       freeze,
                                       list_archs,
                                       resolve_weights,
)
from flowerclf.models.stages import backbone_stages, describe_stages, unfreeze_last

__all__ = ["ModelSpec", "WeightsChoice", "backbone_stages", "build_head", "build_model", "describe_stages", "freeze",
           "list_archs", "resolve_weights", "unfreeze_last", "load_model", "make_checkpoint", "read_checkpoint"]
