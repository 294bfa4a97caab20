"""The tensor (decode_jpeg) input path against the PIL path, its fallbacks, and the choice between them."""
import dataclasses
import io
import os

import numpy as np
import pytest
import torch
from conftest import exif_jpeg, fuzzed, small_tiff
from PIL import Image

from flowerclf.base.errors import FlowerclfError
from flowerclf.data import loaders
from flowerclf.data.folders import ImageSet
from flowerclf.data.images import load_rgb
from flowerclf.data.loaders import (
    EXIF_ORIENTATION,
    JpegBatches,
    input_batches,
    jpeg_orientation,
    make_loader,
)
from flowerclf.data.transforms import (CROP_RATIO, CROP_SCALE, Preprocess, create_transform, decode_size,
                                       preprocess_image)
from flowerclf.features.engines import torch_forward
from flowerclf.models.registry import (
    build_imagenet_model,
    pretrained_state,
    resolve_weights,
    strip_classifier,
)

PP = Preprocess(resize_size=110, crop_size=96, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CPU = torch.device("cpu")


def photo(rng, h, w) -> np.ndarray:
    """Photo-like pixels: smooth colour gradients, a soft blob and fine texture, as uint8 (H, W, 3)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        cy, cx, r = rng.uniform(0.2, 0.8, 3)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.05 + 0.1 * r))
        channels.append(128 + 60 * (a * x + b * y) + 50 * c * blob + 12 * np.sin(40 * x + 7 * rng.random())
                        * np.cos(30 * y) + rng.normal(0, 4, (h, w)))
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def jpeg_set(folder, n, seed=0) -> ImageSet:
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    images = ImageSet(str(folder))
    for i in range(n):
        h, w = (int(v) for v in rng.integers(80, 200, 2))
        path = os.path.join(folder, f"{i:03d}.jpg")
        Image.fromarray(photo(rng, h, w)).save(path, quality=int(rng.integers(75, 96)))
        images.files.append(path)
        images.labels.append(i % 5)
    return images


def tensor_path(images, batch_size=16, device=CPU):
    return torch.cat([x.cpu() for x, _ in JpegBatches(images, PP, batch_size, 0, device)])


def pil_path(images):
    return torch.cat([x for x, _ in make_loader(images, create_transform(PP), 16, 0, CPU)])


def test_tensor_path_features_match_the_pil_path(tmp_path):
    images = jpeg_set(tmp_path / "photos", 100)
    assert all(jpeg_orientation(open(f, "rb").read()) == 1 for f in images.files)  # all on the tensor path
    ours, theirs = tensor_path(images), pil_path(images)
    assert (ours - theirs).abs().mean() < 0.02  # normalized units: about a grey level on average
    # a real network (lite0's offline ImageNet weights): a random one amplifies any difference chaotically
    weights = resolve_weights("efficientnet_lite0", "DEFAULT")
    net = build_imagenet_model("efficientnet_lite0", weights)
    net.load_state_dict(pretrained_state("efficientnet_lite0", weights, net))
    imagenet_head = net.classifier
    strip_classifier(net)
    forward = torch_forward(net, CPU)
    with torch.inference_mode():
        fa, fb = forward(ours), forward(theirs)
        cosine = torch.nn.functional.cosine_similarity(fa, fb)
        same_top1 = (imagenet_head(fa).argmax(1) == imagenet_head(fb).argmax(1)).float().mean()
    assert cosine.min() >= 0.999, cosine.min()
    assert same_top1 >= 0.99


def _write(path, img: Image.Image, **kwargs) -> str:
    img.save(path, **kwargs)
    return str(path)


def test_files_the_decoder_cannot_take_go_through_pil(tmp_path):
    rgb = Image.fromarray(photo(np.random.default_rng(1), 90, 120))
    wide = (np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16)
    files = {
        "png": _write(tmp_path / "a.png", rgb),
        "cmyk": _write(tmp_path / "b.jpg", rgb.convert("CMYK"), quality=95),
        "16-bit": _write(tmp_path / "c.png", Image.fromarray(wide)),
        "palette": _write(tmp_path / "d.png", rgb.convert("P")),
        "grayscale": _write(tmp_path / "e.jpg", rgb.convert("L"), quality=95),
        "progressive": _write(tmp_path / "f.jpg", rgb, quality=95, progressive=True),
    }
    for name, path in files.items():
        assert jpeg_orientation(open(path, "rb").read()) is None, name
    images = ImageSet(str(tmp_path), list(files.values()), list(range(len(files))))
    x, y = next(iter(JpegBatches(images, PP, len(files), 0, CPU)))
    expected = np.stack([preprocess_image(load_rgb(f), PP) for f in files.values()])
    np.testing.assert_array_equal(x.numpy(), expected)  # the very PIL path, file by file
    assert y.tolist() == list(range(len(files)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_on_the_tensor_path(tmp_path, orientation):
    img = Image.fromarray(photo(np.random.default_rng(orientation), 90, 150))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    path = _write(tmp_path / "rotated.jpg", img, quality=95, exif=exif)
    assert jpeg_orientation(open(path, "rb").read()) == orientation  # stays on the fast path
    images = ImageSet(str(tmp_path), [path], [0])
    ours, theirs = tensor_path(images), pil_path(images)
    assert (ours - theirs).abs().mean() < 0.03  # a wrong rotation or flip differs by about 1


def test_a_truncated_jpeg_is_one_error_naming_it_even_from_a_worker(tmp_path):
    images = jpeg_set(tmp_path / "photos", 3)
    data = open(images.files[1], "rb").read()
    with open(images.files[1], "wb") as f:
        f.write(data[:len(data) // 2])
    assert jpeg_orientation(data[:len(data) // 2]) is None
    for batches in (JpegBatches(images, PP, 3, 1, CPU),
                    make_loader(images, create_transform(PP), 3, 1, CPU)):
        with pytest.raises(FlowerclfError) as caught:
            list(batches)
        assert "001.jpg cannot be read" in str(caught.value) and "Traceback" not in str(caught.value)


def test_jpeg_size_reads_the_frame_header(tmp_path):
    images = jpeg_set(tmp_path / "photos", 6)
    exif = Image.Exif()
    exif[loaders.EXIF_ORIENTATION] = 6
    rgb = Image.fromarray(photo(np.random.default_rng(2), 90, 150))
    images.files += [_write(tmp_path / "exif.jpg", rgb, quality=90, exif=exif),  # an APP1 segment first
                     _write(tmp_path / "progressive.jpg", rgb, quality=90, progressive=True)]  # SOF2
    for f in images.files:
        with Image.open(f) as img:
            assert loaders.jpeg_size(open(f, "rb").read()) == img.size, f
    data = open(images.files[0], "rb").read()
    assert loaders.jpeg_size(torch.frombuffer(bytearray(data), dtype=torch.uint8)) == Image.open(images.files[0]).size
    assert loaders.jpeg_size(b"\xff\xd8\xff\xd9") is None and loaders.jpeg_size(open(tmp_path / "progressive.jpg",
                                                                                   "rb").read()[:30]) is None


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damage it reads past
def test_fuzzed_headers_never_raise_in_the_jpeg_readers():
    jpeg = exif_jpeg()
    variants = [*fuzzed(jpeg, 300, 3, 0, 400), *fuzzed(small_tiff(), 50, 3), b"", b"\xff\xd8", b"\xff\xd8\xff\xd9"]
    for data in variants:
        orientation, size = jpeg_orientation(data), loaders.jpeg_size(data)
        assert orientation is None or isinstance(orientation, int)
        assert size is None or (len(size) == 2 and all(isinstance(v, int) for v in size))
    assert loaders.jpeg_size(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)) == (20, 12)


def test_a_jpeg_strip_is_refused_on_the_tensor_path_too(tmp_path):
    strip = _write(tmp_path / "strip.jpg", Image.new("RGB", (4000, 100), (90, 140, 60)), quality=90)
    assert jpeg_orientation(open(strip, "rb").read()) is None  # the PIL path says what is wrong
    with pytest.raises(FlowerclfError, match="strip.jpg is 4000x100 pixels, a strip narrower than 1:20"):
        list(JpegBatches(ImageSet(str(tmp_path), [strip], [0]), PP, 1, 0, CPU))
    # a frame that is a strip behind a header that was not: the decoded shape sends it to PIL too
    good = _write(tmp_path / "good.jpg", Image.new("RGB", (150, 100), (90, 140, 60)), quality=90)
    item = loaders.JpegBytes(ImageSet(str(tmp_path), [good], [0]), PP)[0]
    lying = (strip, torch.frombuffer(bytearray(open(strip, "rb").read()), dtype=torch.uint8), 1, 0)
    assert item[1] is not None
    with pytest.raises(FlowerclfError, match="strip.jpg is 4000x100 pixels"):
        loaders.decode_batch([item, lying], PP, CPU)


def _jpeg_items(images):
    return [loaders.JpegBytes(images, PP)[i] for i in range(len(images.files))]


def test_the_pixel_cap_splits_a_batch_of_large_photos(tmp_path, monkeypatch):
    path = _write(tmp_path / "12mp.jpg", Image.new("RGB", (4000, 3000), (90, 140, 60)), quality=50)
    full = dataclasses.replace(PP, decode="full")  # under the draft rule a 12 MP photo is decoded in the worker
    item = loaders.JpegBytes(ImageSet(str(tmp_path), [path], [0]), full)[0]
    calls = []

    def decode_jpeg(datas, mode, device):  # the headers say 12 MP; the pixels are beside the point
        calls.append(len(datas))
        return [torch.full((3, 60, 80), 128, dtype=torch.uint8) for _ in datas]
    monkeypatch.setattr(loaders, "decode_jpeg", decode_jpeg)
    x, _ = loaders.decode_batch([item] * 128, full, CPU)
    assert calls == [21] * 6 + [2]  # 21 x 12 MP under the 256 MP cap: 6.1 GB of output becomes 0.76 GB a call
    assert x.shape == (128, 3, 96, 96) and x.abs().max() < 0.01  # grey 128 normalized, in every row


def _short_of_memory(monkeypatch, most):
    """loaders.decode_jpeg as a GPU with room for `most` images a call (0: not even one); returns its calls."""
    real, calls = loaders.decode_jpeg, []

    def decode_jpeg(datas, mode, device):
        calls.append(len(datas))
        if len(datas) > most:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return real(datas, mode=mode, device=device)
    monkeypatch.setattr(loaders, "decode_jpeg", decode_jpeg)
    monkeypatch.setattr(loaders, "_said_pil_for_memory", False)
    return calls


def test_decoder_out_of_memory_splits_the_batch_in_halves(tmp_path, monkeypatch, capsys):
    items = _jpeg_items(jpeg_set(tmp_path / "photos", 8))
    reference, _ = loaders.decode_batch(items, PP, CPU)
    calls = _short_of_memory(monkeypatch, 2)
    x, y = loaders.decode_batch(items, PP, CPU)
    assert calls == [8, 4, 2, 2, 4, 2, 2]
    torch.testing.assert_close(x, reference, rtol=0, atol=0)  # still nvjpeg's pixels, not PIL's
    assert y.tolist() == [i % 5 for i in range(8)] and capsys.readouterr().err == ""


def test_what_does_not_fit_even_alone_goes_through_pil_said_once(tmp_path, monkeypatch, capsys):
    images = jpeg_set(tmp_path / "photos", 6)
    items = _jpeg_items(images)
    calls = _short_of_memory(monkeypatch, 0)
    first, _ = loaders.decode_batch(items[:4], PP, CPU)
    second, _ = loaders.decode_batch(items[4:], PP, CPU)
    assert calls == [4, 2, 1, 1, 2, 1, 1] + [2, 1, 1]  # down to one image before giving up on the GPU
    expected = np.stack([preprocess_image(load_rgb(f), PP) for f in images.files])
    np.testing.assert_array_equal(torch.cat([first, second]).numpy(), expected)  # the very PIL path
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the GPU ran out of memory decoding") and "000.jpg" in err[0]


def test_the_input_path_is_chosen_by_device_and_transform(tmp_path):
    images = jpeg_set(tmp_path / "photos", 2)
    cuda = torch.device("cuda")  # only chosen here, never run
    assert isinstance(input_batches(images, create_transform(PP), 2, 0, cuda), JpegBatches)
    for device, transform in ((CPU, create_transform(PP)), (cuda, create_transform(PP, augment=True))):
        assert not isinstance(input_batches(images, transform, 2, 0, device), JpegBatches)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
def test_nvjpeg_path_matches_the_pil_path_on_cuda(tmp_path):
    images = jpeg_set(tmp_path / "photos", 40)
    ours = tensor_path(images, 16, torch.device("cuda"))
    assert (ours - pil_path(images)).abs().mean() < 0.03


def test_the_pil_path_decodes_at_the_transform_draft_size(tmp_path):
    path = _write(tmp_path / "big.jpg", Image.fromarray(photo(np.random.default_rng(2), 900, 1200)), quality=90)
    seen = []

    class Recorder:  # a transform that records the size it is given
        draft_size = 110

        def __call__(self, img):
            seen.append(img.size)
            return np.zeros((3, 2, 2), np.float32)
    loaders.ImageDataset([path], [0], Recorder())[0]
    assert seen == [(150, 113)]  # 1/8 a side, still over 110
    x, _ = next(iter(make_loader(ImageSet(str(tmp_path), [path], [0]), create_transform(PP), 1, 0, CPU)))
    np.testing.assert_array_equal(x[0].numpy(), preprocess_image(load_rgb(path, draft=decode_size(PP)), PP))


def test_large_jpegs_take_the_draft_path_in_the_worker(tmp_path, monkeypatch):
    assert loaders.draft_in_worker((4032, 3024), 256) and loaders.draft_in_worker((3024, 4032), 256)
    assert not loaders.draft_in_worker((2592, 1944), 256)  # 5 MP: nvjpeg keeps it
    assert not loaders.draft_in_worker((4032, 3024), None)  # a checkpoint that decodes in full
    assert not loaders.draft_in_worker((9000, 3000), 2000)  # the draft would not shrink it 2x a side
    monkeypatch.setattr(loaders, "DRAFT_IN_WORKER_PIXELS", 40_000)  # so test-sized photos cross it
    rng = np.random.default_rng(3)
    big = _write(tmp_path / "big.jpg", Image.fromarray(photo(rng, 480, 600)), quality=90)  # 288,000 px
    small = _write(tmp_path / "small.jpg", Image.fromarray(photo(rng, 150, 200)), quality=90)  # 30,000 px
    images = ImageSet(str(tmp_path), [big, small, big], [0, 1, 2])
    items = _jpeg_items(images)
    assert [item[1] is None for item in items] == [True, False, True]  # the big ones decoded in the worker
    x, y = loaders.decode_batch(items, PP, CPU)
    np.testing.assert_array_equal(x[0].numpy(), preprocess_image(load_rgb(big, draft=220), PP))  # PIL's draft
    assert decode_size(PP) == 220 and load_rgb(big, draft=220).size == (300, 240) and y.tolist() == [0, 1, 2]
    assert (x[1] - pil_path(ImageSet(str(tmp_path), [small], [1]))[0]).abs().mean() < 0.03  # nvjpeg's
    full = dataclasses.replace(PP, decode="full")
    assert all(item[1] is not None for item in (loaders.JpegBytes(images, full)[i] for i in range(3)))


def _copies_of(tmp_path, monkeypatch):
    """A large JPEG (short side over PP's working size, 392) and a small one; their WorkingCopies; decodes counted."""
    from flowerclf.features import copies, store

    rng = np.random.default_rng(4)
    big = _write(tmp_path / "big.jpg", Image.fromarray(photo(rng, 420, 560)), quality=90)
    small = _write(tmp_path / "small.jpg", Image.fromarray(photo(rng, 300, 390)), quality=90)
    decoded, real = [], copies.load_rgb
    monkeypatch.setattr(copies, "load_rgb", lambda path, **kw: decoded.append(os.path.basename(path))
                        or real(path, **kw))
    files = [big, small]
    return copies.WorkingCopies(files, [store.file_digest(f) for f in files], 392, copies.copies_dir()), decoded


def test_fine_tuning_reads_a_large_photo_from_its_working_copy_after_the_first_epoch(tmp_path, monkeypatch):
    from flowerclf.features import copies, store

    work, decoded = _copies_of(tmp_path, monkeypatch)
    big, small = work.files
    assert work.short == decode_size(PP, augment=True)
    assert copies.working_copies(work.files, dataclasses.replace(PP, decode="full"), True, print) is None  # old rule
    images = ImageSet(str(tmp_path), work.files, [0, 1])
    batches = make_loader(images, create_transform(PP, augment=True), 2, 0, CPU, copies=work)
    x, _ = next(iter(batches))  # epoch 1: both photos decoded, the large one's copy written
    assert x.shape == (2, 3, 96, 96) and decoded == ["big.jpg", "small.jpg"]
    copy = os.path.join(copies.copies_dir(), "392", store.file_digest(big).hex()[:2], store.file_digest(big).hex()
                        + ".jpg")
    assert work.path(0) == copy and os.listdir(os.path.dirname(copy)) == [os.path.basename(copy)]
    with Image.open(copy) as img:
        assert img.size == (523, 392)  # the draft's 1/1 decode of 560x420, scaled to the working size
    assert not os.path.exists(work.path(1))  # 390 px a side: at or below the working size, no copy
    next(iter(batches))  # epoch 2: the large photo comes from its copy, only the small one is decoded
    assert decoded == ["big.jpg", "small.jpg", "small.jpg"]
    assert work.load(0).size == (523, 392)


def test_a_working_copy_is_decoded_at_the_scale_its_random_crop_needs(tmp_path, monkeypatch):
    from torchvision import transforms as T

    copy = _write(tmp_path / "copy.jpg", Image.fromarray(photo(np.random.default_rng(5), 392, 523)), quality=95)
    augment = create_transform(PP, augment=True)
    resized, real = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda img, size, resample=None, box=None, **kw: resized.append(
        (img.size, box)) or real(img, size, resample, box, **kw))
    scales = set()
    for seed in range(40):
        torch.manual_seed(seed)
        drafted = augment.from_jpeg(Image.open(copy))
        (size, box), = resized[-1:]
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(load_rgb(copy), CROP_SCALE, CROP_RATIO)
        scales.add(round(523 / size[0]))
        k = 1 / round(523 / size[0])
        assert box == pytest.approx((left * k, top * k, (left + w) * k, (top + h) * k), abs=1 / 8)  # the same box
        assert min(box[2] - box[0], box[3] - box[1]) >= PP.crop_size  # still >= crop_size pixels a side
        torch.manual_seed(seed)
        full = augment(load_rgb(copy))  # the same crop and flip of the whole decode
        assert np.abs(drafted - full).mean() < 0.05, seed
    assert scales >= {1, 2}  # large crops came from a smaller decode


def test_a_working_copy_found_truncated_as_it_decodes_is_augmented_from_the_photo(tmp_path, monkeypatch):
    work, decoded = _copies_of(tmp_path, monkeypatch)
    augment = create_transform(PP, augment=True)
    assert work.augmented(0, augment).shape == (3, 96, 96) and decoded == ["big.jpg"]  # the copy written
    with open(work.path(0), "rb") as f:
        whole = f.read()
    with open(work.path(0), "wb") as f:
        f.write(whole[: len(whole) // 2])  # its header still reads as a copy's
    assert work.augmented(0, augment).shape == (3, 96, 96) and decoded == ["big.jpg", "big.jpg"]
    with open(work.path(0), "rb") as f:
        assert f.read() == whole  # rewritten whole
    work.augmented(0, augment)
    assert decoded == ["big.jpg", "big.jpg"]


class _Blocked(BaseException):  # not an Exception: the copies' fallbacks must not swallow it
    pass


def test_a_fifo_in_place_of_a_working_copy_is_replaced_not_waited_on(tmp_path, monkeypatch):
    import signal

    work, decoded = _copies_of(tmp_path, monkeypatch)
    os.makedirs(os.path.dirname(work.path(0)))
    os.mkfifo(work.path(0))  # opening it to read would block until something writes to it
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Blocked()))
    signal.alarm(60)
    try:
        assert work.augmented(0, create_transform(PP, augment=True)).shape == (3, 96, 96)
        assert work.load(0).size == (523, 392)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert decoded == ["big.jpg"] and os.path.isfile(work.path(0))  # made from the photo once, as a file


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other size"])
def test_a_damaged_working_copy_falls_back_to_the_photo_and_is_rewritten(tmp_path, monkeypatch, damage):
    work, decoded = _copies_of(tmp_path, monkeypatch)
    good = np.asarray(work.load(0))
    with open(work.path(0), "rb") as f:
        whole = f.read()
    if damage == "truncated":
        data = whole[: len(whole) // 2]
    elif damage == "garbage":
        data = b"\xff\xd8" + bytes(range(256)) * 4
    else:  # a whole JPEG, but not at the working size
        buf = io.BytesIO()
        Image.fromarray(good[:300]).save(buf, "JPEG")
        data = buf.getvalue()
    with open(work.path(0), "wb") as f:
        f.write(data)
    np.testing.assert_array_equal(np.asarray(work.load(0)), good)  # decoded from the photo again
    assert decoded == ["big.jpg", "big.jpg"]
    with open(work.path(0), "rb") as f:
        assert f.read() == whole  # rewritten whole
    work.load(0)
    assert decoded == ["big.jpg", "big.jpg"]
