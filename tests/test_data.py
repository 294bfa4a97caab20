"""Data: scanning ImageFolder splits, checking them, reading images of any mode, the transforms."""
import dataclasses
import io
import json
import math
import os
import re
import warnings

import numpy as np
import pytest
from conftest import (
    EPS,
    ROOT,
    TINY,
    an_image,
    exif_jpeg,
    fuzzed,
    make_image_folder,
    one_error_line,
    small_tiff,
    truncated_jpeg,
)
from conftest import run_script as _main
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

import evaluate
import predict
import train
from flowerclf.base.errors import FlowerclfError
from flowerclf.data.folders import (
    check_splits,
    list_images,
    load_category_names,
    scan_data_dir,
    scan_split,
)
from flowerclf.data.layout import apply_record, describe
from flowerclf.data.images import IMAGE_FORMATS, MAX_ASPECT_RATIO, check_image, load_rgb, typical_pixels
from flowerclf.data.transforms import Preprocess, preprocess_image
from flowerclf.data.transforms import (
    CROP_RATIO,
    CROP_SCALE,
    create_transform,
    decode_size,
)


def test_scan_lists_classes_and_skips_hidden_and_non_images(tmp_path):
    root = make_image_folder(tmp_path, classes=("a", "b"), per_class={"train": 2, "valid": 1})
    open(os.path.join(root, "train", "a", ".hidden.png"), "wb").close()
    open(os.path.join(root, "train", "a", "notes.txt"), "w").close()
    os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))
    sets = scan_data_dir(root)
    assert set(sets) == {"train", "valid"}
    assert sets["train"].class_to_idx == {"a": 0, "b": 1}
    assert len(sets["train"]) == 4 and sorted(sets["train"].labels) == [0, 0, 1, 1]
    assert all(not os.path.basename(f).startswith(".") and f.endswith(".png") for f in sets["train"].files)


def test_valid_class_missing_from_train_is_named(tmp_path):
    root = make_image_folder(tmp_path, classes=("1", "2"), per_class={"train": 1, "valid": 1})
    make_image_folder(tmp_path / "extra", classes=("3",), per_class={"valid": 1})
    os.rename(tmp_path / "extra" / "valid" / "3", os.path.join(root, "valid", "3"))
    with pytest.raises(FlowerclfError, match=r"valid/ has classes \['3'\] that train/ lacks"):
        scan_data_dir(root)


def test_missing_train_is_an_error_and_valid_split_0_refuses_to_carve(tmp_path):
    root = make_image_folder(tmp_path, per_class={"train": 2, "valid": 1})
    os.rename(os.path.join(root, "train"), os.path.join(root, "elsewhere"))
    with pytest.raises(FlowerclfError, match="no train/ folder"):
        scan_data_dir(root)
    os.rename(os.path.join(root, "elsewhere"), os.path.join(root, "train"))
    os.rename(os.path.join(root, "valid"), os.path.join(root, "elsewhere"))
    with pytest.raises(FlowerclfError, match=r"no validation folder \(valid/, val/ or validation/\) and "
                                             r"--valid_split is 0"):
        scan_data_dir(root, valid_split=0)
    assert len(scan_data_dir(root)["valid"]) == 3  # by default 20% of train/: one photo of each class


@pytest.mark.parametrize("name", ["val", "validation"])
def test_val_and_validation_folders_train_and_the_first_line_names_them(tmp_path, name):
    root = make_image_folder(tmp_path / "d", per_class={"train": 6, name: 3})
    code, out, err = _main(train, [root, "--save_dir", str(tmp_path / "s"), "--epochs", "1", "--no_audit"] + TINY)
    assert code == 0, err
    assert out.splitlines()[0] == f"data: train/ (18 photos, 3 classes), {name}/ (9)"
    # no test/: the report is on the validation folder, under its own name
    assert json.loads((tmp_path / "s" / f"{name}_report.json").read_text())["images"] == 9
    assert out.splitlines()[-1] == f"report: {tmp_path / 's' / f'{name}_report.html'}"
    code, _, err = _main(evaluate, [str(tmp_path / "s" / "checkpoint.pth"), os.path.join(root, name)])
    assert code == 0, err
    assert json.loads((tmp_path / "s" / f"eval_{name}_report.json").read_text())["images"] == 9


def test_two_validation_folders_are_one_error_line_naming_both(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"train": 2, "val": 1, "validation": 1})
    line = one_error_line(*_main(train, [root] + TINY)[::2])
    assert f"{root}/ has both val/ and validation/" in line and "keep one of them" in line


def test_split_without_images_is_an_error(tmp_path):
    os.makedirs(tmp_path / "train" / "a")
    with pytest.raises(FlowerclfError, match="has no images"):
        scan_split(tmp_path / "train")


def _rgb_of(path):
    return np.asarray(load_rgb(path))


def test_image_modes_become_rgb(tmp_path):
    gray = tmp_path / "gray.png"
    Image.new("L", (4, 4), 100).save(gray)
    assert _rgb_of(gray)[0, 0].tolist() == [100, 100, 100]

    rgba = tmp_path / "rgba.png"  # fully transparent red -> the white background
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(rgba)
    assert _rgb_of(rgba)[0, 0].tolist() == [255, 255, 255]

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    assert _rgb_of(tmp_path / "pal.png")[0, 0].tolist() == [10, 20, 30]

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    r, g, b = _rgb_of(cmyk)[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60

    deep = tmp_path / "deep.png"  # 16-bit grayscale: 65535 is white, not clipped garbage
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    assert _rgb_of(deep)[0, 0].tolist() == [255, 255, 255]
    Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(deep)
    assert _rgb_of(deep)[0, 0].tolist() == [128, 128, 128]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (6, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=100)
    out = load_rgb(path)
    assert out.size == (2, 6)


def test_unreadable_files_raise_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(FlowerclfError, match="bad.jpg is not an image"):
        load_rgb(bad)
    with pytest.raises(FlowerclfError, match="does not exist"):
        load_rgb(tmp_path / "nope.jpg")


def test_postscript_named_jpg_never_runs_ghostscript(tmp_path, fake_gs):
    path = tmp_path / "holiday.jpg"
    path.write_bytes(EPS)
    with pytest.raises(FlowerclfError) as e:
        load_rgb(path)
    problem = "looks like EPS (Encapsulated Postscript), a format flowerclf does not open"
    assert str(e.value).startswith(f"{path} {problem}") and "\n" not in str(e.value)
    with pytest.raises(FlowerclfError, match=f"upload.jpg {re.escape(problem)}"):
        load_rgb(io.BytesIO(EPS), "upload.jpg")
    assert check_image(str(path), full=True) == check_image(str(path), full=False) == str(e.value)[len(str(path)) + 1:]
    assert not fake_gs.exists()
    with pytest.raises(Exception), Image.open(path) as img:  # the control: without the allow-list, gs runs
        img.load()
    assert fake_gs.exists()


def test_every_image_open_in_the_package_goes_through_the_allow_list():
    opens = []
    for folder, _, files in os.walk(os.path.join(ROOT, "flowerclf")):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(folder, f), encoding="utf-8").read()
                opens += [f"{f}: {line.strip()}" for line in text.splitlines() if "Image.open(" in line]
    assert opens == ["images.py: return Image.open(source, formats=IMAGE_FORMATS)"]


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"),
                                     ("BMP", "bmp"), ("TIFF", "tif"), ("PPM", "ppm"), ("PPM", "pgm")])
def test_the_listed_formats_read(tmp_path, fmt, ext):
    assert fmt in IMAGE_FORMATS
    path = tmp_path / f"photo.{ext}"
    Image.new("L" if ext == "pgm" else "RGB", (8, 6), 90).save(path, fmt)
    assert load_rgb(path).size == (8, 6) and check_image(str(path), full=True) is None


@pytest.mark.parametrize("fmt", ["PCX", "ICO", "SGI", "QOI"])
def test_other_formats_pillow_reads_are_refused_in_one_line(tmp_path, fmt):
    Image.init()
    if fmt not in Image.SAVE:
        pytest.skip(f"this Pillow ({Image.__version__}) cannot write {fmt}")  # QOI: reads in 10.0, writes later
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (16, 16), 90).save(path, fmt)
    with pytest.raises(FlowerclfError) as e:
        load_rgb(path)
    assert str(e.value).startswith(f"{path} looks like {fmt} (")
    assert "a format flowerclf does not open (it reads JPEG, PNG" in str(e.value)
    assert check_image(str(path), full=False) == str(e.value)[len(str(path)) + 1:]


def _verdict(path):
    """load_rgb's answer as check_image words it: None, or the problem after the file's name."""
    try:
        load_rgb(path)
    except FlowerclfError as e:
        assert str(e).startswith(f"{path} ") and "\n" not in str(e)
        return str(e)[len(str(path)) + 1:]
    return None


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damage it reads past
def test_fuzzed_exif_jpegs_and_tiffs_load_or_fail_in_one_line(tmp_path):
    jpeg, tiff = exif_jpeg(), small_tiff()
    app1_end = 22 + int.from_bytes(jpeg[22:24], "big")  # the EXIF segment: SOI, APP0, then APP1's length
    kinds = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # as check_image and serve.py count it
        for ext, variants in [("jpg", fuzzed(jpeg, 300, 2, 20, app1_end)), ("tif", fuzzed(tiff, 300, 2, 0, 200))]:
            for i, data in enumerate(variants):
                path = tmp_path / f"v{i}.{ext}"
                path.write_bytes(data)
                verdict = _verdict(path)
                assert check_image(str(path), full=True) == verdict, data
                kinds.update(re.findall(r"cannot be read as an image \((\w+):", verdict or ""))
    # the fuzz reaches what Pillow raises besides OSError on such files (struct.error, TypeError), once loose
    assert kinds & {"error", "TypeError"}, kinds


@pytest.mark.parametrize("size", [(20000, 1), (1, 20000), (4001, 200)])
def test_a_strip_is_refused_before_the_resize(tmp_path, size):
    path = tmp_path / "strip.png"
    Image.new("RGB", size).save(path)
    message = f"{path} is {size[0]}x{size[1]} pixels, a strip narrower than 1:{MAX_ASPECT_RATIO}"
    with pytest.raises(FlowerclfError, match=re.escape(message)):
        load_rgb(path)
    assert check_image(str(path), full=False) == check_image(str(path), full=True) == _verdict(path)


@pytest.mark.parametrize("size", [(800, 200), (1600, 200), (4000, 200), (100, 800)])
def test_panoramas_still_read(tmp_path, size):
    path = tmp_path / "pano.jpg"
    Image.new("RGB", size, (10, 200, 30)).save(path)
    assert check_image(str(path), full=True) is None
    assert preprocess_image(load_rgb(path), Preprocess()).shape == (3, 224, 224)


def test_a_float_tiff_with_nan_reads_without_a_warning(tmp_path):
    path = tmp_path / "nan.tif"
    Image.fromarray(np.array([[np.nan, 1.0], [np.inf, 0.5]], np.float32)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _rgb_of(path)[:, 0, 0].tolist() == [0, 255]


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(300, 200), (97, 131), (256, 256), (40, 500)])
def test_preprocess_matches_torchvision(size, interp):
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    pp = Preprocess(resize_size=232, crop_size=224, interpolation=interp)
    ours = preprocess_image(img, pp)
    ref = ImageClassification(crop_size=224, resize_size=232, interpolation=InterpolationMode(interp))(img)
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def test_preprocess_round_trips_as_plain_data():
    pp = Preprocess(342, 299, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    assert Preprocess.from_dict(pp.to_dict()) == pp
    assert all(isinstance(v, (int, str, list)) for v in pp.to_dict().values())


def _smooth_jpeg(path, w, h, orientation=None) -> str:
    """A photo-like JPEG (gradients, a soft blob, fine ripples) of w x h stored pixels, with an EXIF orientation."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    pixels = np.stack([128 + 60 * (a * x - b * y) + 40 * np.exp(-((x - 0.5) ** 2 + (y - 0.4) ** 2) / 0.08)
                       + 10 * np.sin(40 * x) * np.cos(30 * y) for a, b in ((1, 0.5), (-0.5, 1), (0.3, -1))], -1)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90, exif=exif)
    return str(path)


def test_the_decode_rule_for_eval_augment_and_stored_views():
    pp = Preprocess(256, 224)
    assert pp.decode == "draft2" and decode_size(pp) == 512 and create_transform(pp).draft_size == 512
    assert decode_size(pp, augment=True) == 915 == create_transform(pp, augment=True).draft_size
    assert create_transform(pp, view=1, seed=3).draft_size == 915
    before = dataclasses.replace(pp, decode="draft")  # a checkpoint of before keeps its rule
    assert decode_size(before) == 256 and decode_size(before, augment=True) == 915
    full = Preprocess(256, 224, decode="full")
    assert [decode_size(full), create_transform(full, augment=True).draft_size] == [None, None]
    crop = create_transform(pp, augment=True).augment.transforms[0]  # the rule's parameters are the transform's
    assert (crop.scale, crop.ratio) == (CROP_SCALE, CROP_RATIO) == ((0.08, 1.0), (3 / 4, 4 / 3))
    # the smallest crop a 915 x 915 decode can give still has 224 pixels a side
    assert math.sqrt(915 * 915 * CROP_SCALE[0] * CROP_RATIO[0]) >= 224 > math.sqrt(914 * 914 * 0.08 * 0.75)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    sides = [min(crop.get_params(Image.new("RGB", (915, 915)), crop.scale, crop.ratio)[2:]) for _ in range(2000)]
    assert min(sides) >= 224


@pytest.mark.parametrize("rule, decoded", [("draft2", (400, 300)), ("draft", (200, 150))])
def test_a_large_jpeg_is_decoded_smaller_to_the_same_result(tmp_path, rule, decoded):
    pp = Preprocess(128, 112, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), decode=rule)
    path = _smooth_jpeg(tmp_path / "big.jpg", 1600, 1200)
    drafted, full = load_rgb(path, draft=decode_size(pp)), load_rgb(path)
    # draft2: 1/4 a side, still over twice 128; draft: 1/8, still over 128
    assert drafted.size == decoded and full.size == (1600, 1200)
    ours, reference = preprocess_image(drafted, pp), preprocess_image(full, pp)
    assert ours.shape == reference.shape == (3, 112, 112)
    assert np.abs(ours - reference).mean() < 0.01 and np.abs(ours - reference).max() < 0.05


@pytest.mark.parametrize("w, h, decoded", [(255, 300, (255, 300)), (256, 300, (128, 150)), (511, 600, (256, 300)),
                                           (1030, 2000, (129, 250)), (2048, 1023, (512, 256)),
                                           (200, 3000, (200, 3000))])
def test_draft_never_decodes_below_the_size_the_transform_needs(tmp_path, w, h, decoded):
    img = load_rgb(_smooth_jpeg(tmp_path / "p.jpg", w, h), draft=128)
    assert img.size == decoded and min(img.size) >= min(128, w, h)


@pytest.mark.parametrize("orientation, turned", [(6, True), (8, True), (3, False)])
def test_an_exif_rotated_large_jpeg_is_drafted_then_turned(tmp_path, orientation, turned):
    pp = Preprocess(128, 112, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    path = _smooth_jpeg(tmp_path / "r.jpg", 1600, 1200, orientation)
    drafted, full = load_rgb(path, draft=decode_size(pp)), load_rgb(path)
    assert drafted.size == ((300, 400) if turned else (400, 300)) and full.size == tuple(s * 4 for s in drafted.size)
    assert np.abs(preprocess_image(drafted, pp) - preprocess_image(full, pp)).mean() < 0.01


def test_a_png_ignores_the_draft(tmp_path):
    Image.new("RGB", (900, 700), (10, 200, 30)).save(tmp_path / "big.png")
    assert load_rgb(tmp_path / "big.png", draft=100).size == (900, 700)


def test_list_images_expands_folders(tmp_path):
    root = make_image_folder(tmp_path, classes=("a",), per_class={"train": 2})
    assert len(list_images([root])) == 2
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FlowerclfError, match="contains no images"):
        list_images([str(tmp_path / "empty")])


def test_bad_files_stop_training_with_one_line_each(image_folder, tmp_path):
    bad = os.path.join(image_folder, "train", "1")
    open(os.path.join(bad, "zero.jpg"), "wb").close()
    with open(os.path.join(bad, "garbage.png"), "wb") as f:
        f.write(b"this is not a png")
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "s")] + TINY)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: 2 bad image file(s)") and "--skip_bad_images" in lines[0]
    assert any(line.endswith("zero.jpg is empty (0 bytes)") for line in lines)
    assert any("garbage.png is not an image" in line for line in lines)


def test_skip_bad_images_reports_and_trains(image_folder, tmp_path):
    truncated_jpeg(tmp_path / "cut.jpg")
    os.rename(tmp_path / "cut.jpg", os.path.join(image_folder, "train", "2", "cut.jpg"))
    code, out, _ = _main(train, [image_folder, "--save_dir", str(tmp_path / "s"), "--epochs", "1",
                                 "--skip_bad_images"] + TINY)
    assert code == 0
    assert "warning: skipped" in out and "cut.jpg cannot be read as an image" in out
    assert "18 train" in out  # the 6 x 3 good ones


def test_truncated_image_without_skip_names_the_file(image_folder, tmp_path):
    truncated_jpeg(tmp_path / "cut.jpg")
    os.rename(tmp_path / "cut.jpg", os.path.join(image_folder, "valid", "3", "cut.jpg"))
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "s"), "--epochs", "1"] + TINY)
    assert code == 2 and err.count("\n") == 1 and "cut.jpg cannot be read" in err
    code, _, err = _main(train, [image_folder, "--check"])
    assert code == 2 and "cut.jpg cannot be read as an image" in err


def test_decompression_bomb_is_refused(image_folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # our 16x16 images now count as bombs
    path = os.path.join(image_folder, "train", "1", "1_0.png")
    assert check_image(path, full=False) == "is too large to decode safely (over 100 pixels)"
    with pytest.raises(FlowerclfError, match="too large"):
        load_rgb(path)


def test_check_reports_structure_problems(tmp_path):
    root = make_image_folder(tmp_path / "d")
    code, out, _ = _main(train, [root, "--check"])
    assert code == 0 and out.splitlines() == ["data: train/ (18 photos, 3 classes), valid/ (9), test/ (9)",
                                              f"{root}: 18 train, 9 valid, 9 test images, 3 classes, all readable"]
    for f in os.listdir(os.path.join(root, "valid", "3")):
        os.remove(os.path.join(root, "valid", "3", f))
    code, out, _ = _main(train, [root, "--check"])
    assert code == 0 and "warning: valid/ has no images of classes ['3'] that train/ has" in out
    os.makedirs(os.path.join(root, "train", "4"))
    code, _, err = _main(train, [root, "--check"])
    assert code == 2 and "train/ class folders ['4'] have no images" in err


def test_valid_split_is_stratified_and_seeded(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"train": 10})
    code, out, _ = _main(train, [root, "--check"])
    assert code == 0 and out.splitlines()[:2] == [
        "data: train (24 photos, 3 classes; 80% of train/), valid (6; 20% of train/)",
        "no validation folder (valid/, val/ or validation/): 6 photos of train/ validate (20% of each class, seed 0, "
        "the same on a rerun), nothing copied; --valid_split sets the fraction"]
    assert scan_data_dir(root)["valid"].files == scan_data_dir(root, valid_split=0.2)["valid"].files
    sets = scan_data_dir(root, valid_split=0.2, seed=3)
    assert sorted(sets["valid"].labels) == [0, 0, 1, 1, 2, 2]
    assert len(sets["train"]) == 24 and not set(sets["train"].files) & set(sets["valid"].files)
    assert scan_data_dir(root, valid_split=0.2, seed=3)["valid"].files == sets["valid"].files
    assert scan_data_dir(root, valid_split=0.2, seed=4)["valid"].files != sets["valid"].files
    # a photo added to class 1 (label 0) leaves the other classes' validation photos where they were
    Image.open(sets["train"].files[0]).save(os.path.join(root, "train", "1", "new.png"))
    others = lambda images: [f for f, y in zip(images.files, images.labels) if y != 0]  # noqa: E731
    assert others(scan_data_dir(root, valid_split=0.2, seed=3)["valid"]) == others(sets["valid"])


def _odd_images(folder):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("LA").save(folder / "la.png")
    base.convert("P").save(folder / "palette.png")
    base.convert("L").save(folder / "gray.jpg")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257).save(folder / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    base.save(folder / "exif.jpg", exif=exif)


def test_every_mode_trains_and_predicts(image_folder, tmp_path):
    _odd_images(tmp_path)
    for name in os.listdir(tmp_path):
        if name.endswith((".png", ".jpg")):
            os.link(tmp_path / name, os.path.join(image_folder, "train", "1", name))
    code, out, _ = _main(train, [image_folder, "--save_dir", str(tmp_path / "s"), "--epochs", "1"] + TINY)
    assert code == 0 and "25 train" in out
    odd = sorted(str(tmp_path / n) for n in os.listdir(tmp_path) if n.endswith((".png", ".jpg")))
    code, out, err = _main(predict, odd + [str(tmp_path / "s" / "checkpoint.pth"), "--json"])
    assert code == 0, err
    assert [r["image"] for r in json.loads(out)] == odd


def test_a_file_as_data_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "is a file" in one_error_line(*_main(train, [str(tmp_path / "f")] + TINY)[::2])


def test_a_class_folder_linked_to_its_parent(image_folder):
    os.symlink(os.path.join(image_folder, "train"), os.path.join(image_folder, "train", "loop"))
    with pytest.raises(FlowerclfError, match="links to .* every image would count twice"):
        scan_split(os.path.join(image_folder, "train"))
    os.unlink(os.path.join(image_folder, "train", "loop"))
    os.symlink("/", os.path.join(image_folder, "train", "root"))  # else the whole file system is walked
    with pytest.raises(FlowerclfError, match="root links to /, which holds"):
        scan_data_dir(image_folder)


def test_non_utf8_category_names(tiny_run, tmp_path):
    data, save = tiny_run
    names = tmp_path / "names.json"
    names.write_bytes('{"1": "café"}'.encode("latin-1"))
    for module, argv in [(predict, [an_image(data), str(save / "checkpoint.pth")]),
                         (evaluate, [str(save / "checkpoint.pth"), os.path.join(data, "test")]),
                         (train, [data, "--save_dir", str(tmp_path / "t")] + TINY)]:
        line = one_error_line(*_main(module, argv + ["--category_names", str(names)])[::2])
        assert "is not UTF-8" in line


def test_category_names_must_be_strings(tmp_path):
    (tmp_path / "n.json").write_text('{"1": 3}')
    with pytest.raises(FlowerclfError, match="not a string"):
        load_category_names(str(tmp_path / "n.json"))


@pytest.mark.parametrize("text", ["[" * 200_000 + "]" * 200_000, '{"1": ' + "9" * 5000 + "}"],
                         ids=["nested-200000-deep", "5000-digit-number"])
def test_category_names_json_cannot_take_is_one_line(tiny_run, tmp_path, text):
    data, save = tiny_run
    (tmp_path / "n.json").write_text(text)
    line = one_error_line(*_main(predict, [an_image(data), str(save / "checkpoint.pth"), "--category_names",
                                           str(tmp_path / "n.json")])[::2])
    assert "is not a JSON mapping we can read" in line


def test_a_valid_split_that_sets_nothing_aside_is_refused_and_a_class_always_keeps_a_photo(tmp_path):
    one_each = make_image_folder(tmp_path / "one", per_class={"train": 1})  # no class has 2 images to split
    line = one_error_line(*_main(train, [one_each, "--valid_split", "0.5", "--check"])[::2])
    assert "--valid_split 0.5 set aside no image" in line
    uneven = make_image_folder(tmp_path / "uneven", per_class={"train": 8})
    for name in os.listdir(os.path.join(uneven, "train", "2"))[2:]:
        os.unlink(os.path.join(uneven, "train", "2", name))  # class 2 keeps 2 photos: 0.9 takes one of them
    sets = scan_data_dir(uneven, valid_split=0.9)
    assert sorted(sets["train"].labels) == [0, 1, 2] and sorted(sets["valid"].labels) == [0] * 7 + [1] + [2] * 7


def test_a_class_too_small_to_split_and_a_skewed_set_get_a_line_each(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"train": 10})
    for name in sorted(os.listdir(os.path.join(root, "train", "2")))[1:]:
        os.unlink(os.path.join(root, "train", "2", name))  # class 2: one photo, nothing to spare
    code, out, err = _main(train, [root, "--check"])
    assert code == 0, err
    assert ("too few photos to split, so valid has no photo of: '2' (1) (photos per class; the rest stay in "
            "train); add photos to these classes") in out.splitlines()
    assert "skewed classes: '1' has 8 training photos, '2' 1 (8.0x)" in out.splitlines()
    assert "warning" not in out  # said once, by the line above
    balanced = make_image_folder(tmp_path / "b", per_class={"train": 3, "valid": 1})
    assert not [line for line in _main(train, [balanced, "--check"])[1].splitlines() if "skew" in line]



def test_class_folders_too_small_for_a_test_part_are_refused_in_one_line(tmp_path):
    make_image_folder(tmp_path / "m", per_class={"train": 2})
    photos = str(tmp_path / "photos")
    os.rename(tmp_path / "m" / "train", photos)  # 2 photos a class: one to train, one to valid, none to test
    line = one_error_line(*_main(train, [photos, "--check"])[::2])
    assert "cannot be split into train, valid and test" in line and "3 or more" in line
    with pytest.raises(FlowerclfError, match="or a smaller --valid_split"):
        scan_data_dir(make_image_folder(tmp_path / "six", per_class={"train": 6}) + "/train", valid_split=0.84)


@pytest.mark.parametrize("record", [
    {"source": "train", "files": {1: ["1/1_0.png"]}}, {"source": "train", "files": {None: []}},
    {"source": "train", "files": {}}, {"source": "train", "files": "1/1_0.png"}, ["valid"], None])
def test_a_damaged_split_record_is_refused_on_resume(tmp_path, record):
    splits = scan_data_dir(make_image_folder(tmp_path / "d", per_class={"train": 5}))
    with pytest.raises(FlowerclfError, match="field 'split' is damaged"):
        apply_record(splits, record, "last.pth")


def test_a_split_record_never_empties_a_part_or_names_files_outside_data_dir(tmp_path):
    splits = scan_data_dir(make_image_folder(tmp_path / "d", per_class={"train": 5}))
    everything = [f"{c}/{c}_{i}.png" for c in "123" for i in range(5)]
    for files, problem in (({"train": everything}, "laid out otherwise"),  # only held-out parts are recorded
                           ({"valid": everything}, "leaves train no photo"),
                           ({"valid": ["/etc/passwd", "../../d/train/1/1_0.png"]}, "leaves valid no photo"),
                           ({"valid": ["1/1_0.png"], "test": ["1/1_1.png"]}, "laid out otherwise")):
        with pytest.raises(FlowerclfError, match=problem):
            apply_record(splits, {"source": "train", "files": files}, "last.pth")
    kept = apply_record(splits, {"source": "train", "files": {"valid": ["2/2_3.png", "2/2_3.png", "/x.png"]}}, "p")
    assert [os.path.relpath(f, kept["valid"].root) for f in kept["valid"].files] == ["2/2_3.png"]
    assert len(kept["train"]) == 14


def test_a_class_left_with_no_training_photo_is_said_not_divided_by(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"train": 4, "valid": 2})
    for name in os.listdir(os.path.join(root, "train", "3")):
        truncated_jpeg(os.path.join(root, "train", "3", name))  # every photo of class 3 unreadable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "divide by zero" RuntimeWarning on stderr
        splits, _ = check_splits(scan_data_dir(root), full=True, skip_bad=True)
        lines = describe(splits)
    assert lines[-1] == "no training photo of: '3'; the model cannot learn these classes: add photos"
    assert not [line for line in lines if "skewed" in line or "inf" in line]


def test_check_prints_no_raw_control_character_of_a_folder_name(tmp_path):
    make_image_folder(tmp_path / "m", per_class={"train": 4})
    photos = str(tmp_path / "photos\x1b[2J")
    os.rename(tmp_path / "m" / "train", photos)
    code, out, err = _main(train, [photos, "--check"])
    assert code == 0, err
    assert "\x1b" not in out and out.splitlines()[0].startswith("data: train (6 photos, 3 classes; 70% of ")
    assert f"{tmp_path}/photos\\x1b[2J/" in out.splitlines()[0]


@pytest.mark.parametrize("name", ["test", "val", "validation"])
def test_a_class_folder_named_like_a_split_is_told_to_be_renamed(tmp_path, name):
    make_image_folder(tmp_path / "m", per_class={"train": 4})
    os.rename(tmp_path / "m" / "train" / "3", tmp_path / "m" / "train" / name)
    with pytest.raises(FlowerclfError, match=f"has no train/ folder.*a class named {name}\\? its name is a split's"):
        scan_data_dir(tmp_path / "m" / "train")


def test_a_valid_split_that_leaves_no_room_for_test_names_the_bound_it_must_stay_below(tmp_path):
    make_image_folder(tmp_path / "m", per_class={"train": 10})
    with pytest.raises(FlowerclfError, match=r"--valid_split 0.85 must be above 0 and below 0.85$"):
        scan_data_dir(tmp_path / "m" / "train", valid_split=0.85)  # class folders: test/ keeps its 15%
    assert len(scan_data_dir(tmp_path / "m", valid_split=0.9)["valid"]) == 27  # train/: up to 1


@pytest.mark.parametrize("name", ["val", "test"])
def test_a_split_linked_to_train_is_refused(tmp_path, name):
    root = make_image_folder(tmp_path / "d", per_class={"train": 4})
    os.symlink("train", os.path.join(root, name))
    with pytest.raises(FlowerclfError, match=f"d/{name}/ is train/ or holds it \\(a link\\?\\)"):
        scan_data_dir(root)


def test_typical_pixels_reads_headers_and_skips_what_does_not_open(tmp_path):
    files = []
    for i, size in enumerate([(40, 30), (80, 60), (400, 300)]):
        files.append(str(tmp_path / f"{i}.jpg"))
        Image.new("RGB", size).save(files[-1])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert typical_pixels(files + [str(tmp_path / "bad.jpg")]) == 80 * 60
    assert typical_pixels([str(tmp_path / "bad.jpg")]) == 0.0 and typical_pixels([]) == 0.0
    # a sample spread over the whole list, not its first files
    assert typical_pixels([files[0]] * 10 + [files[1]] * 10 + [files[2]] * 10, sample=3) == 80 * 60


def test_typical_pixels_counts_a_header_over_the_pixel_limit_without_a_warning(tmp_path):
    import struct
    import zlib

    small = str(tmp_path / "small.png")
    Image.new("RGB", (40, 30)).save(small)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    bomb = tmp_path / "bomb.png"  # 144 MP, over MAX_IMAGE_PIXELS: Pillow warns as it opens (evaluate.py checks none)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert typical_pixels([small, str(bomb), str(bomb)]) == 12000 * 12000  # a 108 MP phone photo is as large
    assert not seen
