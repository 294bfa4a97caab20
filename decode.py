"""JPEG batches decoded to normalized tensors on the device (nvjpeg on CUDA), through PIL whatever it cannot take.

Workers read each file's bytes and look at its header only; the main process decodes the
batch's plain JPEGs in one `torchvision.io.decode_jpeg` call on the device, applies the EXIF
orientation, and resizes, crops and normalizes there with the same `Preprocess` as the PIL
path. Every other file (PNG, CMYK, grayscale, 16-bit, palette, progressive, truncated,
unreadable) takes the PIL path (`data_utils.load_rgb` + `preprocess_image`) in the worker.
"""
from __future__ import annotations

import io
import warnings

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

import data_utils as du
import workers

EXIF_ORIENTATION = 0x0112
# PIL's ImageOps.exif_transpose, as tensor ops on (C, H, W)
_ORIENT = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: x.rot90(-1, (-2, -1)),
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),
    8: lambda x: x.rot90(1, (-2, -1)),
}


def jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation of a JPEG the tensor decoder takes (baseline, 8-bit, 3 channels, complete), else None."""
    if not data.startswith(b"\xff\xd8") or not data.endswith(b"\xff\xd9"):  # not a JPEG, or truncated
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if img.format != "JPEG" or img.mode != "RGB" or "progressive" in img.info or "progression" in img.info:
                return None
            return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # any header PIL cannot parse: the PIL path reports it properly
        return None


class JpegBytes:
    """Map-style dataset of (path, JPEG bytes or None, EXIF orientation or the PIL path's array, label)."""

    def __init__(self, images: du.ImageSet, preprocess: du.Preprocess):
        self.files, self.labels, self.preprocess = images.files, images.labels, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            with open(self.files[i], "rb") as f:
                data = f.read()
        except OSError:
            data = b""  # load_rgb below says what is wrong with the file
        orientation = jpeg_orientation(data)
        if orientation is None:
            array = du.preprocess_image(du.load_rgb(self.files[i]), self.preprocess)
            return self.files[i], None, torch.from_numpy(array), self.labels[i]
        return self.files[i], torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation, self.labels[i]


def resize_center_crop(img: torch.Tensor, pp: du.Preprocess) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, crop, crop): the tensor twin of data_utils.resize_center_crop."""
    img = F.resize(img, [pp.resize_size], interpolation=InterpolationMode(pp.interpolation), antialias=True)
    return F.center_crop(img, [pp.crop_size, pp.crop_size])


def normalize(batch: torch.Tensor, pp: du.Preprocess) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 scaled to [0, 1] and normalized, as data_utils.normalize does."""
    std = torch.tensor(pp.std, device=batch.device).view(1, 3, 1, 1)
    mean = torch.tensor(pp.mean, device=batch.device).view(1, 3, 1, 1)
    return batch.float().mul_(1 / (255.0 * std)).add_(-mean / std)


def decode_batch(items: list, pp: du.Preprocess, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A collated list of JpegBytes items -> (normalized float32 batch on `device`, labels)."""
    jpegs = [k for k, item in enumerate(items) if item[1] is not None]
    out = torch.empty((len(items), 3, pp.crop_size, pp.crop_size), dtype=torch.float32, device=device)
    if jpegs:
        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = decode_jpeg([items[k][1] for k in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # the batch fails as a whole: decode it file by file, through PIL
            decoded = None
        if decoded is None:
            for k in jpegs:
                array = du.preprocess_image(du.load_rgb(items[k][0]), pp)
                out[k] = torch.from_numpy(array).to(device)
        else:
            crops = [resize_center_crop(_ORIENT.get(items[k][2], lambda x: x)(img), pp)
                     for k, img in zip(jpegs, decoded)]
            out[jpegs] = normalize(torch.stack(crops), pp)
    for k, item in enumerate(items):
        if item[1] is None:
            out[k] = item[2].to(device, non_blocking=True)
    return out, torch.tensor([item[3] for item in items])


class JpegBatches:
    """Iterable of (normalized batch on the device, labels) over an ImageSet, in order."""

    def __init__(self, images: du.ImageSet, preprocess: du.Preprocess, batch_size: int, num_workers: int,
                 device: torch.device):
        self.preprocess, self.device = preprocess, device
        self.loader = workers.loader(JpegBytes(images, preprocess), batch_size, num_workers, device, collate_fn=list)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for items in self.loader:
            yield decode_batch(items, self.preprocess, self.device)
