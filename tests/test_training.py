"""A run from the code users run: plans, epochs, splits, --balance, early stopping, history, TensorBoard."""
import dataclasses
import gc
import json
import os
import weakref

import numpy as np
import pytest
import torch
from conftest import TINY, make_image_folder, one_error_line, tiny_config
from conftest import run_script as _main

import train
from flowerclf.base.errors import FlowerclfError
from flowerclf.data.folders import scan_data_dir
from flowerclf.data.loaders import make_loader
from flowerclf.data.transforms import create_transform
from flowerclf.evaluation import audit
from flowerclf.models.checkpoints import load_model
from flowerclf.models.registry import ModelSpec, build_model
from flowerclf.models.stages import backbone_stages, unfreeze_last
from flowerclf.training import plans, trainer
from flowerclf.training.loops import finetune_epoch, train_head_epoch, warmup_cosine
from flowerclf.training import loops
from flowerclf.training.loops import NonFiniteModel


def _cfg(data, save, **kw):
    return tiny_config(data, save, overwrite=True, **kw)


def test_unfreeze_trains_only_the_last_stages(image_folder):
    torch.manual_seed(0)
    model, pp = build_model(ModelSpec("mobilenet_v3_small", "none", [8], 0.0, 3), load_pretrained=False)
    names = unfreeze_last(model.backbone, 2)
    stages = {stage.name: [part for part, _ in stage.parts] for stage in backbone_stages(model.backbone)}
    assert names == list(stages)[-2:]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = scan_data_dir(image_folder)["train"]
    loader = make_loader(images, create_transform(pp, augment=True), 9, 0, torch.device("cpu"), shuffle=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    finetune_epoch(model, loader, opt, sched, scaler, torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                          amp=False)
    after = model.state_dict()
    for name, parts in stages.items():
        keys = [k for k in after if k.startswith(tuple(f"backbone.{part}." for part in parts))]
        changed = any(not torch.equal(before[k], after[k]) for k in keys)
        assert changed == (name in names), name  # frozen stages: weights and BatchNorm statistics alike
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("head."))


def test_a_step_with_the_frozen_stages_on_onnxruntime_is_the_torch_step(image_folder):
    torch.manual_seed(0)
    model, pp = build_model(ModelSpec("mobilenet_v3_small", "none", [8], 0.0, 3), load_pretrained=False)
    images = scan_data_dir(image_folder)["train"]
    x, y = next(iter(make_loader(images, create_transform(pp, augment=True), 9, 0, torch.device("cpu"))))
    for m in model.modules():  # BatchNorm statistics of these images, so that activations are not ~1e-9
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    unfreeze_last(model.backbone, 2)
    model = model.to(memory_format=torch.channels_last)
    cfg = _cfg(image_folder, ".", unfreeze=2, feature_batch_size=4)
    runner = plans.onnx_prefix(model, pp, cfg, torch.device("cpu"), print)
    loops.set_train_mode(model)
    steps = []
    for run in (model, runner):
        with runner.epoch():
            torch.manual_seed(1)  # the same dropout masks
            loss = torch.nn.functional.cross_entropy(run(x.contiguous(memory_format=torch.channels_last)), y)
            model.zero_grad()
            loss.backward()
            session = weakref.ref(runner.forward.session)
        steps.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    gc.collect()
    assert session() is None  # the session ends with its epoch: validation runs without it
    (loss, grads), (onnx_loss, onnx_grads) = steps
    assert onnx_loss == pytest.approx(loss, rel=1e-4) and grads.keys() == onnx_grads.keys()
    for name, grad in grads.items():
        assert (onnx_grads[name] - grad).abs().max() <= 1e-3 * grad.abs().max() + 1e-8, name
    assert plans.onnx_prefix(model, pp, dataclasses.replace(cfg, engine="torch"), torch.device("cpu"), print) is None


def test_the_frozen_stages_stay_in_torch_when_their_export_fails(image_folder, monkeypatch):
    model, pp = build_model(ModelSpec("mobilenet_v3_small", "none", [8], 0.0, 3), load_pretrained=False)
    unfreeze_last(model.backbone, 1)
    monkeypatch.setattr(plans, "onnx_forward", lambda *a: (_ for _ in ()).throw(RuntimeError("no exporter")))
    lines = []
    assert plans.onnx_prefix(model, pp, _cfg(image_folder, "."), torch.device("cpu"), lines.append) is None
    assert lines == ["ONNX Runtime unavailable for the frozen stages (RuntimeError: no exporter); they run in torch"]


def test_the_frozen_stages_on_onnxruntime_follow_weights_loaded_after_the_plan(image_folder):
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, pp = build_model(ModelSpec("mobilenet_v3_small", "none", [8], 0.0, 3), load_pretrained=False)
        unfreeze_last(model.backbone, 1)
        models.append(model.to(memory_format=torch.channels_last))
    model, other = models
    runner = plans.onnx_prefix(model, pp, _cfg(image_folder, ".", unfreeze=1), torch.device("cpu"), print)
    model.load_state_dict(other.state_dict())  # as --resume loads checkpoint_last.pth's state into the plan's model
    x = torch.randn(3, 3, pp.crop_size, pp.crop_size).contiguous(memory_format=torch.channels_last)
    prefix = runner.prefix.layers.eval()
    with torch.no_grad(), runner.epoch():
        given, want = runner.forward(x.contiguous()), prefix(x)
    assert (given - want).abs().max() <= 1e-3 * want.abs().max()


def test_a_cached_prefix_export_of_other_weights_leaves_the_frozen_stages_in_torch(image_folder, _cache):
    os.unlink(_cache / "onnx")  # this test's own exports: it replaces one
    os.mkdir(_cache / "onnx")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, pp = build_model(ModelSpec("mobilenet_v3_small", "none", [8], 0.0, 3), load_pretrained=False)
        unfreeze_last(model.backbone, 1)
        before = set(os.listdir(_cache / "onnx"))
        assert plans.onnx_prefix(model, pp, _cfg(image_folder, "."), torch.device("cpu"), print) is not None
        models.append((model, pp, (set(os.listdir(_cache / "onnx")) - before).pop()))
    (model, pp, mine), (_, _, other) = models
    os.replace(_cache / "onnx" / other, _cache / "onnx" / mine)  # a valid ONNX file, of another network
    lines = []
    assert plans.onnx_prefix(model, pp, _cfg(image_folder, "."), torch.device("cpu"), lines.append) is None
    assert len(lines) == 1 and lines[0].startswith(f"warning: {_cache / 'onnx'}: the export of the frozen stages gives")
    assert "-*.onnx to export them again; the frozen stages run in torch" in lines[0]


def test_finetune_run_end_to_end(image_folder, tmp_path):
    result = trainer.train(_cfg(image_folder, tmp_path, unfreeze=1, epochs=2, label_smoothing=0.1),
                          log=lambda s: None)
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2] and "test_acc" in result["metrics"]
    lrs = [h["lr"] for h in result["history"][1:]]  # epoch 0 is the head trained on stored features
    assert lrs[0] < 0.001  # warm-up starts below the peak
    loaded, _ = load_model(result["checkpoint"])
    assert loaded.head[-1].out_features == 3


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=10, warmup_steps=2)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


@pytest.mark.parametrize("bad, message", [
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"learning_rate": float("nan")}, "--learning_rate must be a finite number"),
    ({"label_smoothing": 5.0}, "--label_smoothing must be in"),
    ({"hidden_units": [10 ** 9]}, "--hidden_units must be"),
    ({"seed": 10 ** 22}, "--seed must be"),
    ({"augment_views": 2, "unfreeze": 1}, "--augment_views is for the frozen"),
])
def test_train_config_checks_itself(image_folder, tmp_path, bad, message):
    with pytest.raises(FlowerclfError, match=message):
        trainer.train(_cfg(image_folder, tmp_path / "s", **bad), log=lambda s: None)
    assert not (tmp_path / "s").exists()  # refused before any work


@pytest.mark.parametrize("flags", [["--backbone_lr_ratio", "nan", "--unfreeze", "1"], ["--learning_rate", "inf"],
                                   ["--learning_rate", "nan"], ["--label_smoothing", "5"],
                                   ["--hidden_units", "1000000000"], ["--warmup_epochs", "nan"],
                                   ["--seed", "-1", "--valid_split", "0.2"], ["--seed", "1" * 23],
                                   ["--warmup_epochs", "1e308", "--unfreeze", "1"]])
def test_bad_flags_are_one_line_before_any_work(image_folder, tmp_path, flags):
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "s")] + TINY + flags)
    one_error_line(code, err)
    assert not (tmp_path / "s").exists()


def test_a_blown_up_model_is_never_saved(image_folder, tmp_path):
    save = tmp_path / "s"
    code, _, err = _main(train, [image_folder, "--save_dir", str(save), "--epochs", "2", "--learning_rate", "1e308",
                                 "--batch_size", "64"] + TINY[:-4] + ["--engine", "torch"])
    line = one_error_line(code, err)
    assert "(epoch 1)" in line and "no checkpoint was saved" in line
    assert not (save / "checkpoint.pth").exists() and not (save / "checkpoint_last.pth").exists()


def test_same_command_cold_then_warm_gives_identical_checkpoints(image_folder, tmp_path):
    states = []
    for _ in range(2):  # the first run fills the feature cache, the second reads it
        code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "s"), "--epochs", "3",
                                     "--overwrite"] + TINY)
        assert code == 0, err
        states.append(torch.load(tmp_path / "s" / "checkpoint.pth", weights_only=True)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_ctrl_c_before_any_epoch_says_no_checkpoint_was_saved(tmp_path):
    args = train.build_parser().parse_args(["D", "--save_dir", str(tmp_path)])
    assert train.interrupted(args) == "no epoch had finished, so no checkpoint was saved"


def test_nan_loss_stops_and_keeps_the_best_checkpoint(image_folder, tmp_path, monkeypatch):
    real = train_head_epoch
    calls = []

    def poisoned(head, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                head[-1].weight.fill_(float("nan"))
        return real(head, *a, **k)
    monkeypatch.setattr(plans, "train_head_epoch", poisoned)
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path), "--epochs", "5", "--dropout", "0"]
                         + TINY)
    assert code == 2 and err.count("\n") == 1
    assert "the training loss became nan" in err and "(epoch 3)" in err and "keeps epoch" in err
    model, ckpt = load_model(str(tmp_path / "checkpoint.pth"))
    assert ckpt["epoch"] in (1, 2)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_a_nan_loss_stops_finetuning_within_the_check_interval(monkeypatch):
    # the loss is summed on the device and looked at every CHECK_EVERY steps (one CPU-GPU sync each)
    monkeypatch.setattr(loops, "CHECK_EVERY", 2)
    model = torch.nn.Sequential()
    model.add_module("backbone", torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten()))
    model.add_module("head", torch.nn.Linear(16, 2))
    taken = []

    def batches():
        for step in range(1, 11):
            taken.append(step)
            yield torch.ones(2, 3, 2, 2), torch.tensor([0, 1])
    steps = iter(range(1, 11))

    def loss_fn(logits, y):  # NaN at step 3 only
        loss = torch.nn.functional.cross_entropy(logits, y)
        return loss * float("nan") if next(steps) == 3 else loss
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(NonFiniteModel, match="the training loss became nan"):
        finetune_epoch(model, batches(), optimizer, scheduler, scaler, loss_fn, torch.device("cpu"), False)
    assert taken == [1, 2, 3, 4]  # stopped at the first look after the NaN, not at the epoch's end


def test_finetuning_validates_through_one_loader_for_the_whole_run(image_folder, tmp_path, monkeypatch):
    real, loaders = loops.extract_features, {}

    def recording(forward, loader, desc="features", on_batch=None):
        loaders.setdefault(desc, []).append(loader)
        return real(forward, loader, desc, on_batch)
    monkeypatch.setattr(loops, "extract_features", recording)
    trainer.train(_cfg(image_folder, tmp_path, epochs=3, unfreeze=1, batch_size=6, num_workers=1),
                  log=lambda line: None)
    # epochs 0 to 3, then the best epoch's logits for the temperature: one loader, so its workers persist
    assert len(loaders["valid"]) == 5 and len({id(x) for x in loaders["valid"]}) == 1
    assert len(loaders["test"]) == 1


def test_hidden_units_zero_gives_a_linear_head(image_folder, tmp_path):
    save = str(tmp_path / "s")
    assert train.main([image_folder, "--arch", "mobilenet_v3_small", "--weights", "none", "--hidden_units", "0",
                       "--epochs", "1", "--save_dir", save, "--engine", "torch"]) == 0
    model, _ = load_model(os.path.join(save, "checkpoint.pth"))
    assert [type(m).__name__ for m in model.head] == ["Dropout", "Linear"]


def test_the_feature_batch_size_keys_the_stored_vectors(image_folder, tmp_path):
    outs = []
    for run, size in enumerate(("4", "5", "4")):
        code, out, err = _main(train, [image_folder, "--save_dir", str(tmp_path / str(run)), "--epochs", "1",
                                       "--feature_batch_size", size] + TINY)
        assert code == 0, err
        outs.append(out)
    assert "features train: 0 cached, 18 computed" in outs[1]  # not the vectors batches of 4 gave
    assert "features train: 18 cached, 0 computed" in outs[2]


@pytest.mark.parametrize("every_s, durable", [(1e9, [False, False, True]), (0.0, [True, True, True])])
def test_checkpoint_last_is_fsynced_now_and_then_and_after_the_last_epoch(image_folder, tmp_path, monkeypatch,
                                                                          every_s, durable):
    saves, real = [], trainer.atomic_save
    monkeypatch.setattr(trainer, "LAST_SYNC_S", every_s)
    monkeypatch.setattr(trainer, "atomic_save", lambda obj, path, *a: saves.append((path, *a)) or real(obj, path, *a))
    assert _main(train, [image_folder, "--save_dir", str(tmp_path / "s"), "--epochs", "3"] + TINY)[0] == 0
    last = str(tmp_path / "s" / "checkpoint_last.pth")
    assert [a[0] for p, *a in saves if p == last] == durable
    assert all(not a or a[0] for p, *a in saves if p != last)  # checkpoint.pth: always


def test_a_frozen_run_audits_its_data_and_no_audit_turns_it_off(tmp_path):
    import json
    import shutil

    from PIL import Image

    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", per_class={"train": 10, "valid": 4, "test": 3})
    moved = os.path.join(data, "train", "2", "1_moved.png")  # a photo of class 1 filed under 2
    shutil.move(os.path.join(data, "train", "1", "1_9.png"), moved)
    shutil.copy(os.path.join(data, "train", "3", "3_0.png"), os.path.join(data, "train", "1", "3_copy.png"))
    shutil.copy(os.path.join(data, "train", "2", "2_0.png"), os.path.join(data, "test", "2", "2_leak.png"))
    ramp = (np.linspace(60, 200, 48)[None, :, None] * np.array([[[1.0, 0.3, 0.3]]])).repeat(48, 0)
    Image.fromarray(ramp.astype(np.uint8)).save(os.path.join(data, "train", "1", "ramp.png"))
    Image.open(os.path.join(data, "train", "1", "ramp.png")).resize((32, 32)).save(
        os.path.join(data, "valid", "1", "ramp_small.jpg"), quality=70)
    save = tmp_path / "save"
    lite0 = ["--arch", "efficientnet_lite0", "--batch_size", "8"]  # offline pretrained: features worth auditing
    code, out, err = _main(train, [data, "--save_dir", str(save), "--epochs", "1"] + lite0)
    assert code == 0, err
    result = json.loads((save / "audit.json").read_text())
    suspects = [os.path.basename(s["path"]) for s in result["suspects"]]
    assert "1_moved.png" in suspects[:4]
    assert next(s for s in result["suspects"] if s["path"] == moved)["likely"] == "1"
    counts = result["duplicates"]["counts"]
    assert counts["test_in_train"] == 1 and counts["valid_in_train"] >= 1 and counts["across_classes"] >= 1
    near = [sorted(os.path.basename(p["path"]) for p in g["photos"]) for g in result["duplicates"]["near"]]
    assert ["ramp.png", "ramp_small.jpg"] in near
    line = out.strip().splitlines()[-2]  # the report's path comes last
    assert line == (f"audit: {len(suspects)} train/valid photos look mislabeled, {counts['across_classes']} duplicates "
                    f"across classes, 1 test photos also in train; see report.html#audit")
    page = (save / "report.html").read_text()
    assert 'id="audit"' in page and "1_moved.png" in page and "2_leak.png" in page

    code, out, err = _main(train, [data, "--save_dir", str(save), "--epochs", "1", "--overwrite", "--no_audit"]
                           + lite0)
    assert code == 0, err
    assert not (save / "audit.json").exists() and "audit:" not in out and 'id="audit"' not in \
        (save / "report.html").read_text()


def test_a_broken_cleanlab_is_the_audits_one_error_line(image_folder, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)  # imports as a missing or broken install does
    broken = tmp_path / "site" / "cleanlab"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    monkeypatch.setenv("PYTHONPATH", str(broken.parent))  # the same in the ranker's process
    code, out, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "run"), "--epochs", "1"] + TINY)
    line = one_error_line(code, err, expected_code=1)
    assert "the data audit needs cleanlab" in line and "--no_audit" in line


def test_the_ranker_process_ranks_as_cleanlab_does_and_steps_aside_when_it_cannot(tmp_path, monkeypatch):
    import sys

    from flowerclf.evaluation.ranker import Ranker

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    probs = rng.dirichlet(np.ones(4), 200)
    expected = audit.label_suspects(probs, labels)  # in this process
    with Ranker() as ranker:
        assert ranker.rank(probs, labels) == expected and expected
    assert ranker.child.poll() is not None  # ended
    cwd = tmp_path / "photos"  # a folder of someone else's files: nothing there runs in the child
    cwd.mkdir()
    (cwd / "numpy.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.chdir(cwd)
    with Ranker() as ranker:
        assert ranker.rank(probs, labels) == expected
    assert not (tmp_path / "ran").exists()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    (tmp_path / "cleanlab").mkdir()
    (tmp_path / "cleanlab" / "__init__.py").write_text("raise ImportError('no')\n")
    with Ranker() as ranker:  # no cleanlab there: the work is left to this process
        assert ranker.rank(probs, labels) is None
        assert audit.label_suspects(probs, labels, ranker) == expected
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with Ranker() as ranker:  # no process to start: the same
        assert ranker.child is None and audit.label_suspects(probs, labels, ranker) == expected


def test_patience_stops_early_and_keeps_the_best_checkpoint(image_folder, tmp_path, monkeypatch):
    accs = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])  # no better epoch after the 2nd for 2 epochs: stop after the 4th
    real = plans.metrics_from_logits
    monkeypatch.setattr(plans, "metrics_from_logits", lambda *a: dict(real(*a), acc=next(accs, 0.0)))
    lines = []
    result = trainer.train(_cfg(image_folder, tmp_path, epochs=6, patience=2), log=lines.append)
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3, 4] and result["epoch"] == 2
    assert "stopped early: no better validation accuracy for 2 epochs (checkpoint.pth keeps epoch 2)" in lines
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 2


def test_the_history_is_on_disk_after_each_epoch(image_folder, tmp_path, monkeypatch):
    real = trainer.format_epoch

    def interrupt_at_2(epoch, *a):
        if epoch == 2:
            assert json.loads((tmp_path / "history.json").read_text())[-1]["epoch"] == 1
            assert (tmp_path / "history.csv").read_text().count("\n") == 2  # the header and epoch 1
            raise KeyboardInterrupt
        return real(epoch, *a)
    monkeypatch.setattr(trainer, "format_epoch", interrupt_at_2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_cfg(image_folder, tmp_path, epochs=3), log=lambda line: None)
    assert [h["epoch"] for h in json.loads((tmp_path / "history.json").read_text())] == [1]


def _split_of(path):
    return torch.load(path, weights_only=True)["split"]


def test_no_validation_folder_carves_the_same_photos_on_a_rerun_and_on_resume(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class={"train": 10, "test": 2})
    argv = [data, "--epochs", "1", "--no_audit"] + TINY
    runs = []
    for save in ("a", "b"):
        code, out, err = _main(train, argv + ["--save_dir", str(tmp_path / save)])
        assert code == 0, err
        assert out.splitlines()[:2] == [
            "data: train (24 photos, 3 classes; 80% of train/), valid (6; 20% of train/), test/ (6)",
            "no validation folder (valid/, val/ or validation/): 6 photos of train/ validate (20% of each class, "
            "seed 0, the same on a rerun), nothing copied; --valid_split sets the fraction"]
        runs.append(_split_of(tmp_path / save / "checkpoint.pth"))
    assert runs[0] == runs[1] and runs[0]["fractions"] == {"valid": 0.2} and runs[0]["seed"] == 0
    assert len(runs[0]["files"]["valid"]) == 6 and all(f.endswith(".png") for f in runs[0]["files"]["valid"])
    # photos added since: a fresh split would take 3 of class 1's 13, but the resumed run keeps its 6 photos
    for i in range(3):
        os.link(os.path.join(data, "test", "1", "1_0.png"), os.path.join(data, "train", "1", f"new_{i}.png"))
    assert len(scan_data_dir(data)["valid"]) == 7
    code, out, err = _main(train, [data, "--epochs", "2", "--no_audit", "--resume", "--save_dir",
                                   str(tmp_path / "a")] + TINY)
    assert code == 0, err
    assert out.splitlines()[0] == "data: train (27 photos, 3 classes; 80% of train/), valid (6; 20% of train/), " \
                                  "test/ (6)"
    assert _split_of(tmp_path / "a" / "checkpoint_last.pth") == runs[0]


def test_a_tree_of_class_folders_splits_70_15_15_the_same_on_a_rerun(tmp_path):
    make_image_folder(tmp_path / "m", per_class={"train": 10})
    photos = str(tmp_path / "photos")
    os.rename(tmp_path / "m" / "train", photos)  # photos/1/*.png, photos/2/*.png, photos/3/*.png
    runs = []
    for save in ("a", "b"):
        code, out, err = _main(train, [photos, "--epochs", "1", "--no_audit", "--save_dir", str(tmp_path / save)]
                               + TINY)
        assert code == 0, err
        assert out.splitlines()[:2] == [
            f"data: train (18 photos, 3 classes; 70% of {photos}/), valid (6; 15% of {photos}/), "
            f"test (6; 15% of {photos}/)",
            f"no train/ folder: the class folders of {photos}/ are split 70/15/15 into train, valid, test per class "
            f"(seed 0, the same on a rerun), nothing copied"]
        assert "test accuracy: top-1" in out and (tmp_path / save / "report.html").is_file()
        runs.append(_split_of(tmp_path / save / "checkpoint.pth"))
    assert runs[0] == runs[1] and set(runs[0]["files"]) == {"valid", "test"}
    assert not set(runs[0]["files"]["valid"]) & set(runs[0]["files"]["test"])
    assert sorted(os.listdir(photos)) == ["1", "2", "3"]  # nothing copied, nothing written there


def test_balance_weights_the_loss_by_inverse_class_frequency(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "d", per_class={"train": 8, "valid": 2})
    for name in sorted(os.listdir(os.path.join(data, "train", "3")))[2:]:
        os.unlink(os.path.join(data, "train", "3", name))  # 8, 8 and 2 photos: N = 18, C = 3
    splits = scan_data_dir(data)
    expected = [18 / (3 * 8), 18 / (3 * 8), 18 / (3 * 2)]  # weight_c = N / (C * n_c): 0.75, 0.75, 3.0
    assert plans.balance_weights("on", splits, print).tolist() == pytest.approx(expected)
    assert plans.balance_weights("auto", splits, print).tolist() == pytest.approx(expected)  # 4x > 3x
    assert plans.balance_weights("off", splits, print) is None
    even = scan_data_dir(make_image_folder(tmp_path / "e", per_class={"train": 4, "valid": 1}))
    assert plans.balance_weights("auto", even, print) is None
    assert plans.balance_weights("on", even, print).tolist() == [1.0, 1.0, 1.0]
    kept = [i for i, label in enumerate(even["train"].labels) if label != 2]  # class 3's photos all left out
    no_class_3 = dict(even, train=dataclasses.replace(even["train"], files=[even["train"].files[i] for i in kept],
                                                      labels=[even["train"].labels[i] for i in kept]))
    assert plans.balance_weights("auto", no_class_3, print) is None  # 4 and 4 photos: no skew

    made = []

    class Spy(torch.nn.CrossEntropyLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(plans.nn, "CrossEntropyLoss", Spy)
    losses = {}
    for flags in (["--balance", "on"], ["--balance", "off"], ["--balance", "on", "--unfreeze", "1"]):
        code, out, err = _main(train, [data, "--epochs", "1", "--no_audit", "--overwrite", "--save_dir",
                                       str(tmp_path / "s")] + TINY + flags)
        assert code == 0, err
        weight = made[-1].weight
        assert (weight is None) == (flags[1] == "off")
        if weight is not None:  # the frozen and the fine-tuning plan alike
            assert weight.tolist() == pytest.approx(expected)
            assert "--balance on: the loss weighs class c by N / (C * n_c), from 0.75 to 3.00" in out.splitlines()
        losses[" ".join(flags)] = next(line for line in out.splitlines() if line.startswith("epoch 1/1"))[:30]
    assert losses["--balance on"] != losses["--balance off"]  # the same seed and photos, another loss


def test_a_resume_state_from_before_carved_splits_still_resumes(image_folder, tmp_path):
    argv = [image_folder, "--save_dir", str(tmp_path), "--no_audit"] + TINY
    assert _main(train, argv + ["--epochs", "1"])[0] == 0
    state = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    state["args"]["valid_split"] = 0.0  # what --valid_split's old default wrote; no 'balance', no 'split'
    del state["args"]["balance"], state["split"]
    torch.save(state, tmp_path / "checkpoint_last.pth")
    code, out, err = _main(train, argv + ["--epochs", "2", "--resume"])
    assert code == 0 and "resuming after epoch 1" in out, err
    state["args"]["valid_split"] = 0.3
    torch.save(state, tmp_path / "checkpoint_last.pth")
    assert "--valid_split 0.3 (now None)" in one_error_line(*_main(train, argv + ["--epochs", "3", "--resume"])[::2])


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={IMAGES: 0})  # 0: keep every image
    events.Reload()
    return events


def test_the_run_writes_tensorboard_scalars_and_the_report_figures(image_folder, tmp_path):
    import io

    from PIL import Image

    from flowerclf.training.tensorboard import COLUMNS, TILE_PX
    lines = []
    result = trainer.train(_cfg(image_folder, tmp_path, epochs=3), log=lines.append)
    events = _events(tmp_path / "tensorboard")
    history = result["history"]
    for tag, key in (("loss/train", "train_loss"), ("loss/valid", "valid_loss"), ("accuracy/valid", "valid_acc"),
                     ("learning_rate", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([h[key] for h in history], rel=1e-6)
    images = {tag: events.Images(tag) for tag in events.Tags()["images"]}
    assert sorted(images) == ["test/confusion_matrix", "test/top_losses"]
    assert [i.step for i in images["test/confusion_matrix"]] == [3]
    assert images["test/confusion_matrix"][0].encoded_image_string == (tmp_path / "confusion_matrix.png").read_bytes()
    grid = Image.open(io.BytesIO(images["test/top_losses"][0].encoded_image_string))
    shown = len(json.loads((tmp_path / "test_report.json").read_text())["top_losses"])  # 9 test photos
    assert grid.size == (COLUMNS * TILE_PX, -(-shown // COLUMNS) * (TILE_PX + 40)) and shown == 9
    assert "tensorboard" in next(line for line in lines if line.startswith("wrote ")).split(", ")


def test_a_resumed_run_continues_the_tensorboard_curves_without_repeats(image_folder, tmp_path, monkeypatch):
    real = trainer.format_epoch

    def crash_after_2(epoch, *a):
        if epoch == 3:
            raise KeyboardInterrupt
        return real(epoch, *a)
    monkeypatch.setattr(trainer, "format_epoch", crash_after_2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_cfg(image_folder, tmp_path, epochs=4), log=lambda line: None)
    assert [s.step for s in _events(tmp_path / "tensorboard").Scalars("loss/train")] == [1, 2]  # kept on failure
    monkeypatch.setattr(trainer, "format_epoch", real)
    trainer.train(tiny_config(image_folder, tmp_path, epochs=4, resume=True), log=lambda line: None)
    assert [s.step for s in _events(tmp_path / "tensorboard").Scalars("loss/train")] == [1, 2, 3, 4]


def test_a_file_where_the_tensorboard_folder_goes_is_one_line_before_any_epoch(image_folder, tmp_path):
    (tmp_path / "tensorboard").write_text("not a folder\n")
    lines = []
    with pytest.raises(FlowerclfError, match="tensorboard is a file, where the run's TensorBoard event files go"):
        trainer.train(tiny_config(image_folder, tmp_path, epochs=1), log=lines.append)
    assert not [line for line in lines if line.startswith(("features", "epoch"))]  # refused before the work
    assert (tmp_path / "tensorboard").read_text() == "not a folder\n"
    trainer.train(_cfg(image_folder, tmp_path, epochs=1), log=lambda line: None)  # --overwrite sets it aside
    assert (tmp_path / "tensorboard").is_dir()


def test_a_missing_tensorboard_package_is_one_line_before_any_epoch(image_folder, tmp_path, monkeypatch):
    from flowerclf.training import tensorboard
    monkeypatch.setattr(tensorboard, "find_spec", lambda name: None)
    lines = []
    with pytest.raises(FlowerclfError, match="the tensorboard package is not installed; pip install"):
        trainer.train(_cfg(image_folder, tmp_path, epochs=1), log=lines.append)
    assert not [line for line in lines if line.startswith(("features", "epoch"))]


def test_a_finetune_starts_from_the_frozen_head_and_never_keeps_worse(image_folder, tmp_path, monkeypatch):
    frozen = trainer.train(_cfg(image_folder, tmp_path / "frozen", epochs=plans.HEAD_EPOCHS, learning_rate=0.01),
                           log=lambda line: None)
    monkeypatch.setattr(plans, "finetune_epoch", lambda *a, **k: {"loss": 1.0})  # no epoch can beat epoch 0
    lines = []
    tuned = trainer.train(_cfg(image_folder, tmp_path / "tuned", epochs=2, unfreeze=1, learning_rate=0.01),
                          log=lines.append)
    first = tuned["history"][0]  # scored on images through the whole model, as every fine-tuning epoch
    assert first["epoch"] == 0 and first["valid_acc"] == frozen["metrics"]["valid_acc"]
    assert first["valid_loss"] == pytest.approx(frozen["metrics"]["valid_loss"], abs=1e-4)
    assert tuned["epoch"] == 0 and any(line.startswith("no epoch beat epoch 0: checkpoint.pth keeps the head trained "
                                                       "on stored features") for line in lines)
    a = torch.load(tmp_path / "frozen" / "checkpoint.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "tuned" / "checkpoint.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the frozen head on the backbone it was trained on


@pytest.mark.parametrize("unfreeze", ["0", "1"])
def test_init_from_starts_at_the_checkpoints_valid_score(tiny_run, tmp_path, unfreeze):
    data, run = tiny_run
    init = torch.load(run / "checkpoint.pth", weights_only=True)
    lines = []
    code, out, err = _main(train, [data, "--save_dir", str(tmp_path / "s"), "--epochs", "1", "--unfreeze", unfreeze,
                                   "--init_from", str(run / "checkpoint.pth")] + TINY)
    assert code == 0, err
    lines = out.splitlines()
    assert "head on stored features" not in out  # the checkpoint's head, not one trained here
    first = json.loads((tmp_path / "s" / "history.json").read_text())[0]
    assert first["epoch"] == 0 and first["valid_acc"] == init["metrics"]["valid_acc"]
    assert first["valid_loss"] == pytest.approx(init["metrics"]["valid_loss"], abs=1e-4)
    assert any(line.startswith("epoch 0/1") and line.endswith(f"(the head of {run / 'checkpoint.pth'})")
               for line in lines)


def test_init_from_mismatches_are_one_line_before_any_work(tiny_run, tmp_path):
    data, run = tiny_run
    ckpt = str(run / "checkpoint.pth")
    other = make_image_folder(tmp_path / "other", classes=("a", "b", "c"))
    for folder, flags, says in [(data, ["--hidden_units", "16"], "hidden units is [8], this run's [16]; pass "
                                                                   "--hidden_units 8"),
                                (data, ["--arch", "resnet18"], "arch is mobilenet_v3_small, this run's resnet18; "
                                                               "pass --arch mobilenet_v3_small"),
                                (data, ["--weights", "DEFAULT"], "weights is none"),
                                (other, [], "are not DATA_DIR's")]:
        code, _, err = _main(train, [folder, "--save_dir", str(tmp_path / "s"), "--init_from", ckpt] + TINY + flags)
        assert says in one_error_line(code, err)
    last = str(run / "checkpoint_last.pth")
    code, _, err = _main(train, [data, "--save_dir", str(tmp_path / "s"), "--init_from", last] + TINY)
    assert "--init_from" in one_error_line(code, err) and "use checkpoint.pth" in err
    assert not (tmp_path / "s").exists()


def test_init_from_takes_a_classic_checkpoints_head(tmp_path):
    from collections import OrderedDict

    import torchvision

    from flowerclf.models.checkpoints import load_head, read_head
    torch.manual_seed(0)
    classic = torchvision.models.get_model("resnet18", weights=None)
    classic.fc = torch.nn.Sequential(OrderedDict([("fc1", torch.nn.Linear(512, 32)), ("relu", torch.nn.ReLU()),
                                                  ("drop", torch.nn.Dropout(0.2)), ("fc2", torch.nn.Linear(32, 3)),
                                                  ("output", torch.nn.LogSoftmax(dim=1))]))
    path = str(tmp_path / "classic.pth")
    torch.save({"arch": "resnet18", "state_dict": classic.state_dict(), "class_to_idx": {"1": 0, "2": 1, "3": 2}},
               path)
    classes = {"1": 0, "2": 1, "3": 2}
    spec = ModelSpec("resnet18", "none", [32], 0.2, 3)
    model, _ = build_model(spec, load_pretrained=False)
    load_head(model.head, read_head(path, spec, classes), path)
    assert torch.equal(model.head[0].weight, classic.fc.fc1.weight) and torch.equal(model.head[3].bias,
                                                                                     classic.fc.fc2.bias)
    with pytest.raises(FlowerclfError, match="hidden units is \\[32\\], this run's \\[64\\]; pass --hidden_units 32"):
        read_head(path, ModelSpec("resnet18", "none", [64], 0.2, 3), classes)
