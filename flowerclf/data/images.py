"""Reading images: any PIL mode to 8-bit RGB with its EXIF orientation, and what is wrong with a file."""
from __future__ import annotations

import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flowerclf.base.errors import FlowerclfError


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float grayscale: PIL's convert('L') clips instead of scaling.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if (img.mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike | BinaryIO, name: str | None = None, draft: int | None = None) -> Image.Image:
    """Open an image (a path, or a binary stream that errors call `name`), apply its EXIF orientation, return RGB.

    `draft` (a transform's draft_size): a JPEG is decoded at the smallest DCT scale keeping both sides >= it.
    A DecompressionBombWarning counts as a bomb too where warnings are errors (serve.py makes them so).
    """
    name = path if name is None else name
    try:
        with Image.open(path) as img:
            if draft:  # before anything decodes; other formats ignore it
                img.draft("RGB", (draft, draft))
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise FlowerclfError(f"{name} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise FlowerclfError(f"{name} is too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise FlowerclfError(f"{name} is not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise FlowerclfError(f"{name} cannot be read as an image ({e})") from None


def check_image(path: str, full: bool) -> str | None:
    """What is wrong with one image file, or None. `full` decodes it (catches truncation)."""
    try:
        if os.path.getsize(path) == 0:
            return "is empty (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if full:
                    img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels)"
    except UnidentifiedImageError:
        return "is not an image PIL can read"
    except (OSError, SyntaxError, ValueError) as e:
        return f"cannot be decoded ({e})"
    return None
