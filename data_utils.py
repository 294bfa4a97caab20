"""Data, the public face: ImageFolder splits, reading images, the transforms, the loaders and sample data sets.

Everything here lives in `flowerclf.data`; this module names the part other code and notebooks use.
`python data_utils.py flowers102 DIR` or `python data_utils.py demo DIR` writes a data set to start from.
"""
from __future__ import annotations

from flowerclf.data.folders import (
    IMAGE_EXTENSIONS,
    SPLITS,
    ImageSet,
    carve,
    check_splits,
    class_names,
    is_image_file,
    list_images,
    load_category_names,
    scan_data_dir,
    scan_split,
)
from flowerclf.data.images import check_image, load_rgb, to_rgb
from flowerclf.data.transforms import (
    EvalTransform,
    Preprocess,
    create_transform,
    normalize,
    preprocess_image,
    resize_center_crop,
)

__all__ = ["IMAGE_EXTENSIONS", "SPLITS", "ImageSet", "carve", "check_splits", "class_names", "is_image_file",
           "list_images", "load_category_names", "scan_data_dir", "scan_split", "check_image", "load_rgb", "to_rgb",
           "EvalTransform", "Preprocess", "create_transform", "normalize", "preprocess_image", "resize_center_crop"]

if __name__ == "__main__":
    from flowerclf.data import samples
    raise SystemExit(samples.main())
