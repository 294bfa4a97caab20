"""What a run checks before importing torch: the arch name, the save directory, the splits and the names.

So a typo or a wrong folder is one line in a fraction of a second, not after seconds of imports.
"""
from __future__ import annotations

from flowerclf.data.folders import (
    ImageSet,
    check_splits,
    load_category_names,
    scan_data_dir,
)
from flowerclf.data.layout import describe
from flowerclf.features.store import store_dir
from flowerclf.models.names import check_arch
from flowerclf.training.config import TrainConfig
from flowerclf.training.rundir import check_not_in_data


def preflight(cfg: TrainConfig) -> dict[str, ImageSet]:
    """Check everything that needs no torch; return the scanned splits."""
    check_arch(cfg.arch)
    check_not_in_data(cfg.save_dir, cfg.data_dir)
    check_not_in_data(store_dir(), cfg.data_dir, "the feature store folder (FLOWERCLF_STORE)")
    splits = scan_data_dir(cfg.data_dir, cfg.valid_split, cfg.seed)
    load_category_names(cfg.category_names)
    return splits


def check_data(cfg: TrainConfig) -> str:
    """train.py --check: scan DATA_DIR, decode every image; a report, or an error listing each bad file."""
    splits = scan_data_dir(cfg.data_dir, cfg.valid_split, cfg.seed)
    said = describe(splits)
    splits, warnings_ = check_splits(splits, full=True, skip_bad=cfg.skip_bad_images)
    summary = (f"{cfg.data_dir}: " + ", ".join(f"{len(s)} {n}" for n, s in splits.items())
               + f" images, {len(splits['train'].class_to_idx)} classes, all readable")
    return "\n".join(said + warnings_ + [summary])
