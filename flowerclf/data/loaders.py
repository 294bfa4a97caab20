"""The loaders of the input path: PIL in worker processes, and JPEG batches decoded on the device (nvjpeg on CUDA).

`input_batches` is the one choice between them. The PIL path decodes each file in a worker
(`load_rgb` + a transform). The JPEG batch path lets workers read each file's bytes and look at
its header only; the main process decodes the batch's plain JPEGs in one
`torchvision.io.decode_jpeg` call on the device, applies the EXIF orientation, and resizes, crops
and normalizes there with the same `Preprocess` as the PIL path. Every other file (PNG, CMYK,
grayscale, 16-bit, palette, progressive, truncated, unreadable) takes the PIL path in the worker, and so does
a JPEG too large for nvjpeg to be worth it (DRAFT_IN_WORKER_PIXELS). Both paths decode at the transform's draft_size.
A bad file in a worker still ends as one line: FlowerclfError drops the traceback DataLoader wraps around it.
"""
from __future__ import annotations

import io
import sys
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from flowerclf.data.folders import ImageSet
from flowerclf.data.images import load_rgb, open_image, size_problem
from flowerclf.data.transforms import EvalTransform, Preprocess, decode_size, preprocess_image
from flowerclf.runtime.devices import out_of_memory

# ---------------------------------------------------------------- the PIL path

class ImageDataset:
    """Map-style dataset of (CHW float32 array, label); works with torch's DataLoader.

    Each file is decoded at the transform's `draft_size` (create_transform's transforms all have one), or
    read through `copies` (features.copies.WorkingCopies: `augmented(i, transform)`, from its working-size copy).
    """

    def __init__(self, files: list[str], labels: list[int], transform, copies=None):
        self.files, self.labels, self.transform, self.copies = files, labels, transform, copies

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        if self.copies is not None:
            return self.copies.augmented(i, self.transform), self.labels[i]
        return self.transform(load_rgb(self.files[i], draft=self.transform.draft_size)), self.labels[i]


def stack_batch(batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a PIL-path batch, the images stacked by numpy.

    default_collate's torch.stack wakes torch's intra-op threads for the copy; in a process that runs ONNX
    Runtime's threads too (the CPU feature pass) that stack of 8 images at 224 px took 24-43 ms on 2 cores,
    against 0.6-0.7 ms on one thread (benchmarks/bench_photos.py's pass measures what it costs).
    """
    images, labels = zip(*batch)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def loader(dataset, batch_size: int, num_workers: int, device: torch.device, collate_fn=stack_batch,
           **kwargs) -> DataLoader:
    """Batches of `dataset`; with workers they persist across epochs and prefetch, and CUDA gets pinned memory."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers else None, **kwargs)


def make_loader(images: ImageSet, transform, batch_size: int, num_workers: int, device: torch.device,
                shuffle: bool = False, generator: torch.Generator | None = None, sampler=None,
                drop_last: bool = False, copies=None) -> DataLoader:
    """The PIL path: batches of `images` through `transform` (PIL RGB -> CHW float32 array), in workers;
    with `copies` (fine-tuning's augmentation), each image comes from its working-size copy."""
    return loader(ImageDataset(images.files, images.labels, transform, copies), batch_size, num_workers, device,
                  shuffle=shuffle, generator=generator, sampler=sampler, drop_last=drop_last)


def input_batches(images: ImageSet, transform, batch_size: int, num_workers: int, device: torch.device):
    """The one choice of input path: (normalized images, labels) batches of `images`, in order.

    On CUDA the eval transform runs on the GPU (JpegBatches below), the PIL path for the rest.
    Elsewhere, and for augmentation, PIL in worker processes: on a CPU the backbone is the
    bottleneck, not decoding.
    """
    if device.type == "cuda" and isinstance(transform, EvalTransform):
        return JpegBatches(images, transform.preprocess, batch_size, num_workers, device)
    return make_loader(images, transform, batch_size, num_workers, device)


# ---------------------------------------------------------------- the JPEG batch path

EXIF_ORIENTATION = 0x0112
# Pixels one decode_jpeg call decodes at most. Its output is 3 bytes a pixel on the device, all at once:
# 128 photos of 12-24 MP would be 4.6-9.2 GB, beside training on a 16 GB card. 256 MP is 768 MB a call:
# 21 photos of 12 MP, whole batches of 500x667 ones (0.33 MP). A call that still runs out of memory is
# split in halves, down to one image, before the PIL path takes it.
MAX_DECODE_PIXELS = 256_000_000
# A JPEG of more pixels than this goes through PIL's draft decode in a worker (when its Preprocess decodes by
# draft and the draft shrinks it at least 2x a side): nvjpeg would decode every pixel only to resize most away.
# UNMEASURED: no GPU was at hand. Chosen conservatively, so only phone-camera photos (8 MP and up) move: on the
# 2-core CPU a 12 MP photo draft-decodes at ~62 img/s per core (14x its full decode; 60 img/s under draft2's
# 1/4 scale), while 5 MP ones gained only 1.6x. Measure nvjpeg against it with benchmarks/bench_photos.py on a
# CUDA machine before lowering it.
DRAFT_IN_WORKER_PIXELS = 8_000_000
_said_pil_for_memory = False  # the PIL fallback for lack of GPU memory is said once a process
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
    """The EXIF orientation of a JPEG the tensor decoder takes (baseline, 8-bit, 3 channels, complete, a size the
    resize takes), else None."""
    if not data.startswith(b"\xff\xd8") or not data.endswith(b"\xff\xd9"):  # not a JPEG, or truncated
        return None
    try:
        with open_image(io.BytesIO(data)) as img:  # reads the header only
            if img.format != "JPEG" or img.mode != "RGB" or "progressive" in img.info or "progression" in img.info:
                return None
            if size_problem(*img.size):
                return None
            return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # any header PIL cannot parse: the PIL path reports it properly
        return None


def jpeg_size(data) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header (bytes or a uint8 tensor), else None; decodes nothing."""
    view = memoryview(data.numpy() if isinstance(data, torch.Tensor) else data)
    i = 2  # after SOI
    while i + 9 <= len(view):
        if view[i] != 0xFF:
            return None
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: precision, height, width
            return (view[i + 7] << 8) | view[i + 8], (view[i + 5] << 8) | view[i + 6]
        elif marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            return None
        else:
            i += 2 + ((view[i + 2] << 8) | view[i + 3])
    return None


def draft_in_worker(size: tuple[int, int] | None, draft: int | None) -> bool:
    """Whether a JPEG of `size` (its header's) takes PIL's draft decode in the worker rather than nvjpeg."""
    return (draft is not None and size is not None and size[0] * size[1] > DRAFT_IN_WORKER_PIXELS
            and min(size) >= 2 * draft)  # draft scales it by 1/2 or less


class JpegBytes:
    """Map-style dataset of (path, JPEG bytes or None, EXIF orientation or the PIL path's array, label)."""

    def __init__(self, images: ImageSet, preprocess: Preprocess):
        self.files, self.labels, self.preprocess = images.files, images.labels, preprocess
        self.draft = decode_size(preprocess)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            with open(self.files[i], "rb") as f:
                data = f.read()
        except OSError:
            data = b""  # load_rgb below says what is wrong with the file
        orientation = jpeg_orientation(data)
        if orientation is None or draft_in_worker(jpeg_size(data), self.draft):
            array = preprocess_image(load_rgb(self.files[i], draft=self.draft), self.preprocess)
            return self.files[i], None, torch.from_numpy(array), self.labels[i]
        return self.files[i], torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation, self.labels[i]


def resize_center_crop(img: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, crop, crop): the tensor twin of transforms.resize_center_crop."""
    img = F.resize(img, [pp.resize_size], interpolation=InterpolationMode(pp.interpolation), antialias=True)
    return F.center_crop(img, [pp.crop_size, pp.crop_size])


def normalize(batch: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 scaled to [0, 1] and normalized, as transforms.normalize does."""
    std = torch.tensor(pp.std, device=batch.device).view(1, 3, 1, 1)
    mean = torch.tensor(pp.mean, device=batch.device).view(1, 3, 1, 1)
    return batch.float().mul_(1 / (255.0 * std)).add_(-mean / std)


def _decode_into(out: torch.Tensor, items: list, jpegs: list[int], pp: Preprocess, device: torch.device) -> None:
    """out[k] for the JPEG items k in `jpegs`: one decode_jpeg call, in halves while it runs out of memory,
    through PIL file by file where it fails otherwise or even one image does not fit."""
    global _said_pil_for_memory
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = decode_jpeg([items[k][1] for k in jpegs], mode=ImageReadMode.RGB, device=device)
        short = False
    except RuntimeError as e:  # the call fails as a whole (a subclass, OutOfMemoryError, included)
        decoded, short = None, out_of_memory(e)
    if decoded is not None and any(size_problem(img.shape[-1], img.shape[-2]) for img in decoded):
        decoded = None  # a frame other than its header said (jpeg_orientation checked that): PIL says what is wrong
    if short:  # outside the except block: its traceback no longer holds what the failed call allocated
        torch.cuda.empty_cache()
        if len(jpegs) > 1:
            half = len(jpegs) // 2
            _decode_into(out, items, jpegs[:half], pp, device)
            _decode_into(out, items, jpegs[half:], pp, device)
            return
        if not _said_pil_for_memory:
            _said_pil_for_memory = True
            print(f"warning: the GPU ran out of memory decoding {items[jpegs[0]][0]} alone with nvjpeg; JPEGs "
                  "that do not fit are decoded on the CPU through PIL (much slower); a smaller batch size leaves "
                  "nvjpeg more room (said once)", file=sys.stderr)
    if decoded is None:
        for k in jpegs:
            array = preprocess_image(load_rgb(items[k][0], draft=decode_size(pp)), pp)
            out[k] = torch.from_numpy(array).to(device)
    else:
        crops = [resize_center_crop(_ORIENT.get(items[k][2], lambda x: x)(img), pp)
                 for k, img in zip(jpegs, decoded)]
        out[jpegs] = normalize(torch.stack(crops), pp)


def decode_batch(items: list, pp: Preprocess, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A collated list of JpegBytes items -> (normalized float32 batch on `device`, labels).

    The JPEGs are decoded in runs of at most MAX_DECODE_PIXELS (by their headers; one larger alone),
    each cropped before the next is decoded.
    """
    jpegs = [k for k, item in enumerate(items) if item[1] is not None]
    out = torch.empty((len(items), 3, pp.crop_size, pp.crop_size), dtype=torch.float32, device=device)
    run, pixels = [], 0
    for k in jpegs:
        size = jpeg_size(items[k][1])
        n = size[0] * size[1] if size else MAX_DECODE_PIXELS
        if run and pixels + n > MAX_DECODE_PIXELS:
            _decode_into(out, items, run, pp, device)
            run, pixels = [], 0
        run.append(k)
        pixels += n
    if run:
        _decode_into(out, items, run, pp, device)
    for k, item in enumerate(items):
        if item[1] is None:
            out[k] = item[2].to(device, non_blocking=True)
    return out, torch.tensor([item[3] for item in items])


class JpegBatches:
    """Iterable of (normalized batch on the device, labels) over an ImageSet, in order."""

    def __init__(self, images: ImageSet, preprocess: Preprocess, batch_size: int, num_workers: int,
                 device: torch.device):
        self.preprocess, self.device = preprocess, device
        self.loader = loader(JpegBytes(images, preprocess), batch_size, num_workers, device, collate_fn=list)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for items in self.loader:
            yield decode_batch(items, self.preprocess, self.device)
