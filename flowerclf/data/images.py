"""Reading images: any PIL mode to 8-bit RGB with its EXIF orientation, and what is wrong with a file."""
from __future__ import annotations

import logging
import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flowerclf.base.errors import FlowerclfError, brief

# The formats Pillow may open for us: decoders inside Pillow itself (.ppm/.pgm are PPM), by content, whatever the
# name says. Never EPS/PS (Pillow hands those to Ghostscript, a program, on load), nor any format we do not list.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF and PPM/PGM"
# Pillow warns of damaged metadata in a file it still reads ("Corrupt EXIF data", "tag 256 had too many entries"),
# and logs some errors before it raises them: lines on stderr besides our one, about nothing the user can do
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
logging.getLogger("PIL").addHandler(logging.NullHandler())  # no lastResort handler; an app's own logging still sees it


class _Unreadable(Exception):
    """A problem found while reading an image, in words that follow its name."""


def open_image(source: str | os.PathLike | BinaryIO) -> Image.Image:
    """Image.open restricted to IMAGE_FORMATS (lazy: reads the header only); the one way flowerclf opens an image."""
    return Image.open(source, formats=IMAGE_FORMATS)


# The eval transform resizes the shorter side to resize_size (256) keeping the aspect ratio, so the longer side
# grows with it: a 143-byte 20000x1 PNG would become 256 x 5,120,000 pixels (3.9 GB). At 1:20 a resize to 256 is
# 256 x 5120 (3.9 MB, 22 MB at efficientnet_b7's 600): far more than any photo needs, 360-degree panoramas
# included (2:1 to about 12:1).
MAX_ASPECT_RATIO = 20


def size_problem(width: int, height: int) -> str | None:
    """What is wrong with an image's size for the transforms (too narrow a strip), or None.

    (Pillow itself refuses images of 0 pixels when it opens them.)
    """
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f"is {width}x{height} pixels, a strip narrower than 1:{MAX_ASPECT_RATIO} that resizing would blow up;"
                f" crop it")
    return None


def _pixels(img: Image.Image) -> Image.Image:
    problem = size_problem(*img.size)
    if problem:
        raise _Unreadable(problem)
    return img


def _decode(source: str | os.PathLike | BinaryIO, draft: int | None = None) -> Image.Image:
    """What training reads from a file: opened, EXIF-oriented, decoded (a JPEG at the smallest DCT scale keeping
    both sides >= `draft`), RGB."""
    with open_image(source) as img:
        _pixels(img)
        if draft:  # before anything decodes; other formats ignore it
            img.draft("RGB", (draft, draft))
        img = ImageOps.exif_transpose(img)
        img.load()
        return to_rgb(img)


def _detected(source: str | os.PathLike | BinaryIO) -> str:
    """What a file Pillow did not open for us looks like, from its first bytes alone (no plugin opens it)."""
    try:
        if hasattr(source, "read"):
            source.seek(0)
            prefix = source.read(16)
        else:
            with open(source, "rb") as f:
                prefix = f.read(16)
    except (OSError, ValueError):
        return "cannot be read again"
    if not prefix:
        return "is empty (0 bytes)"
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            looks = accept is not None and accept(prefix)  # a prefix test; a string says a codec is missing
        except Exception:
            continue
        if looks and not isinstance(looks, str):
            if fmt in IMAGE_FORMATS:
                return f"looks like {fmt} but PIL cannot read its header"
            kind = getattr(factory, "format_description", None)
            return (f"looks like {fmt}{f' ({kind})' if kind else ''}, a format flowerclf does not open (it reads "
                    f"{_FORMAT_NAMES}); convert it to JPEG or PNG")
    return f"is not an image PIL can read (flowerclf reads {_FORMAT_NAMES}; it starts with {prefix!r})"


def _problem(e: Exception, source: str | os.PathLike | BinaryIO) -> str:
    """Any exception reading `source` raised, in words that follow its name."""
    if isinstance(e, _Unreadable):
        return str(e)
    if isinstance(e, FileNotFoundError):
        return "does not exist"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels)"
    if isinstance(e, UnidentifiedImageError):
        return _detected(source)
    # on crafted files Pillow raises about anything (TypeError, struct.error, ...): all say the file is damaged
    return f"cannot be read as an image ({brief(e)})"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float grayscale: PIL's convert('L') clips instead of scaling.
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))  # a float TIFF may hold NaN
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
    Anything reading it raises ends as one FlowerclfError. A DecompressionBombWarning counts as a bomb too where
    warnings are errors (serve.py makes them so).
    """
    try:
        return _decode(path, draft)
    except Exception as e:
        raise FlowerclfError(f"{path if name is None else name} {_problem(e, path)}") from None


def typical_pixels(files: list[str], sample: int = 16) -> float:
    """The median pixel count of up to `sample` of `files`, spread over them, from their headers alone (no decode);
    0 where none opens. What --num_workers auto weighs: decoding a phone photo outweighs the backbone."""
    counts = []
    for path in files[::max(1, len(files) // sample)][:sample]:
        try:
            with warnings.catch_warnings():  # a header over MAX_IMAGE_PIXELS counts, without Pillow's line on stderr
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with open_image(path) as img:
                    counts.append(img.width * img.height)
        except Exception:  # unreadable files are the checks' to name; they just do not count here
            continue
    return float(np.median(counts)) if counts else 0.0


def check_image(path: str, full: bool) -> str | None:
    """What is wrong with one image file, or None: load_rgb's verdict with `full` (it decodes), else its header's."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if full:
                _decode(path)
            else:
                with open_image(path) as img:
                    _pixels(img)
    except Exception as e:
        return _problem(e, path)
    return None
