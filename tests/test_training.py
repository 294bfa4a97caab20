"""Feature cache, augmented views and fine-tuning."""
import os

import pytest
import torch

import checkpoints
import data_utils as du
import features
import loops
import model_utils as mu
import training
from errors import FlowerclfError


def _cfg(data, save, **kw):
    base = dict(data_dir=data, save_dir=str(save), arch="mobilenet_v3_small", weights="none", hidden_units=[8],
                epochs=2, batch_size=8, overwrite=True)
    return training.TrainConfig(**{**base, **kw})


def _count_passes(monkeypatch):
    calls = []
    real = features.extract_features

    def counting(*a, **k):
        calls.append(k.get("desc", a[2] if len(a) > 2 else ""))
        return real(*a, **k)
    monkeypatch.setattr(features, "extract_features", counting)
    return calls


def test_rerun_with_other_head_settings_skips_the_backbone(image_folder, tmp_path, monkeypatch):
    calls = _count_passes(monkeypatch)
    training.train(_cfg(image_folder, tmp_path), log=lambda s: None)
    assert len(calls) == 3  # train, valid, test
    first = len(os.listdir(tmp_path / training.CACHE_DIRNAME))
    calls.clear()
    training.train(_cfg(image_folder, tmp_path, learning_rate=0.01, hidden_units=[4, 4], epochs=3),
                 log=lambda s: None)
    assert calls == []
    assert len(os.listdir(tmp_path / training.CACHE_DIRNAME)) == first


def test_changed_image_or_arch_is_a_cache_miss(image_folder, tmp_path, monkeypatch):
    calls = _count_passes(monkeypatch)
    training.train(_cfg(image_folder, tmp_path), log=lambda s: None)
    calls.clear()
    changed = os.path.join(image_folder, "valid", "1", "1_0.png")
    du.load_rgb(changed).rotate(90).save(changed)
    os.utime(changed, ns=(1, 1))
    training.train(_cfg(image_folder, tmp_path), log=lambda s: None)
    assert calls == ["features valid"]
    calls.clear()
    training.train(_cfg(image_folder, tmp_path, arch="squeezenet1_1"), log=lambda s: None)
    assert len(calls) == 3


def test_no_cache_writes_nothing(image_folder, tmp_path):
    training.train(_cfg(image_folder, tmp_path, cache=False), log=lambda s: None)
    assert not (tmp_path / training.CACHE_DIRNAME).exists()
    assert (tmp_path / "checkpoint.pth").exists()


def test_augmented_views_are_cached_and_distinct(image_folder, tmp_path, monkeypatch):
    calls = _count_passes(monkeypatch)
    training.train(_cfg(image_folder, tmp_path, augment_views=2), log=lambda s: None)
    assert calls[-2:] == ["features train view 1", "features train view 2"]
    files = sorted((tmp_path / training.CACHE_DIRNAME).iterdir())
    assert len(files) == 5
    sizes = {len(torch.load(f, weights_only=True)["labels"]) for f in files}
    assert sizes == {18, 9}  # 3 classes x 6 train images per view; 3 x 3 valid / test
    views = [torch.load(f, weights_only=True)["features"] for f in files]
    train_like = [v for v in views if len(v) == 18]
    assert not torch.equal(train_like[0], train_like[1])


def test_unfreeze_trains_only_the_last_stages(image_folder):
    torch.manual_seed(0)
    model, pp = mu.build_model(mu.ModelSpec("mobilenet_v3_small", "none", [8], 0.0, 3), load_pretrained=False)
    names = mu.unfreeze_last(model.backbone, 2)
    stages = dict(mu.backbone_stages(model.backbone))
    assert names == list(stages)[-2:]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = du.scan_data_dir(image_folder)["train"]
    loader = features.make_loader(images, du.train_transform(pp), 9, 0, torch.device("cpu"), shuffle=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loops.finetune_epoch(model, loader, opt, sched, scaler, torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                          amp=False)
    after = model.state_dict()
    for name in stages:
        prefix = f"backbone.{name}."
        keys = [k for k in after if k.startswith(prefix)]
        changed = any(not torch.equal(before[k], after[k]) for k in keys)
        assert changed == (name in names), name  # frozen stages: weights and BatchNorm statistics alike
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("head."))


def test_finetune_run_end_to_end(image_folder, tmp_path):
    result = training.train(_cfg(image_folder, tmp_path, unfreeze=1, epochs=2, label_smoothing=0.1),
                          log=lambda s: None)
    assert len(result["history"]) == 2 and "test_acc" in result["metrics"]
    lrs = [h["lr"] for h in result["history"]]
    assert lrs[0] < 0.001  # warm-up starts below the peak
    loaded, _ = checkpoints.load_model(result["checkpoint"])
    assert loaded.head[-1].out_features == 3


def test_warmup_cosine_schedule():
    f = loops.warmup_cosine(total_steps=10, warmup_steps=2)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


@pytest.mark.parametrize("model_name", ["mobilenet_v3_small", "vit_b_32"])
def test_stages_cover_the_trainable_backbone(model_name):
    with torch.device("meta"):
        model, _ = mu.build_model(mu.ModelSpec(model_name, "none", [], 0.0, 3), load_pretrained=False)
    stages = mu.backbone_stages(model.backbone)
    assert len(stages) >= 5
    assert mu.unfreeze_last(model.backbone, "all") == ["all"]
    assert all(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("bad, message", [
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"learning_rate": float("nan")}, "must be finite"),
    ({"label_smoothing": 5.0}, "--label_smoothing must be in"),
    ({"hidden_units": [10 ** 9]}, "--hidden_units must be"),
    ({"seed": 10 ** 22}, "--seed must be"),
    ({"augment_views": 2, "unfreeze": 1}, "--augment_views is for the frozen"),
])
def test_train_config_checks_itself(image_folder, tmp_path, bad, message):
    with pytest.raises(FlowerclfError, match=message):
        training.train(_cfg(image_folder, tmp_path / "s", **bad), log=lambda s: None)
    assert not (tmp_path / "s").exists()  # refused before any work
