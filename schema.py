"""The plain-data formats flowerclf writes: checkpoint, resume state and model.onnx metadata (torch-free)."""
from __future__ import annotations

CHECKPOINT_FORMAT = "flowerclf-checkpoint"
CHECKPOINT_VERSION = 1
RESUME_FORMAT = "flowerclf-resume"  # checkpoint_last.pth: train.py --resume state, not for predict
ONNX_METADATA_KEY = "flowerclf"     # the metadata_props entry holding the checkpoint's plain-data description
