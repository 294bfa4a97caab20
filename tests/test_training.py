"""Fine-tuning, its schedule and stages, and the checks of TrainConfig (the feature store: test_store.py)."""
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
