"""Scanning, image modes and preprocessing."""
import os

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

import data_utils as du
from errors import FlowerclfError
from conftest import make_image_folder


def test_scan_lists_classes_and_skips_hidden_and_non_images(tmp_path):
    root = make_image_folder(tmp_path, classes=("a", "b"), per_class={"train": 2, "valid": 1})
    open(os.path.join(root, "train", "a", ".hidden.png"), "wb").close()
    open(os.path.join(root, "train", "a", "notes.txt"), "w").close()
    os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))
    sets = du.scan_data_dir(root)
    assert set(sets) == {"train", "valid"}
    assert sets["train"].class_to_idx == {"a": 0, "b": 1}
    assert len(sets["train"]) == 4 and sorted(sets["train"].labels) == [0, 0, 1, 1]
    assert all(not os.path.basename(f).startswith(".") and f.endswith(".png") for f in sets["train"].files)


def test_valid_class_missing_from_train_is_named(tmp_path):
    root = make_image_folder(tmp_path, classes=("1", "2"), per_class={"train": 1, "valid": 1})
    make_image_folder(tmp_path / "extra", classes=("3",), per_class={"valid": 1})
    os.rename(tmp_path / "extra" / "valid" / "3", os.path.join(root, "valid", "3"))
    with pytest.raises(FlowerclfError, match=r"valid/ has classes \['3'\] that train/ lacks"):
        du.scan_data_dir(root)


@pytest.mark.parametrize("missing", ["train", "valid"])
def test_missing_split_is_an_error(tmp_path, missing):
    root = make_image_folder(tmp_path, per_class={"train": 1, "valid": 1})
    os.rename(os.path.join(root, missing), os.path.join(root, "elsewhere"))
    with pytest.raises(FlowerclfError, match=f"no {missing}/ folder"):
        du.scan_data_dir(root)


def test_split_without_images_is_an_error(tmp_path):
    os.makedirs(tmp_path / "train" / "a")
    with pytest.raises(FlowerclfError, match="has no images"):
        du.scan_split(tmp_path / "train")


def _rgb_of(path):
    return np.asarray(du.load_rgb(path))


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
    out = du.load_rgb(path)
    assert out.size == (2, 6)


def test_unreadable_files_raise_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(FlowerclfError, match="bad.jpg is not an image"):
        du.load_rgb(bad)
    with pytest.raises(FlowerclfError, match="does not exist"):
        du.load_rgb(tmp_path / "nope.jpg")


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(300, 200), (97, 131), (256, 256), (40, 500)])
def test_preprocess_matches_torchvision(size, interp):
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    pp = du.Preprocess(resize_size=232, crop_size=224, interpolation=interp)
    ours = du.preprocess_image(img, pp)
    ref = ImageClassification(crop_size=224, resize_size=232, interpolation=InterpolationMode(interp))(img)
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def test_preprocess_round_trips_as_plain_data():
    pp = du.Preprocess(342, 299, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    assert du.Preprocess.from_dict(pp.to_dict()) == pp
    assert all(isinstance(v, (int, str, list)) for v in pp.to_dict().values())


def test_list_images_expands_folders(tmp_path):
    root = make_image_folder(tmp_path, classes=("a",), per_class={"train": 2})
    assert len(du.list_images([root])) == 2
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FlowerclfError, match="contains no images"):
        du.list_images([str(tmp_path / "empty")])
