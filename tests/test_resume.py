"""--resume and kills: checkpoint_last.pth continues a run exactly, refuses another run's state, survives kill -9."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, make_image_folder, one_error_line, tiny_config
from conftest import run_script as _main

import predict
import train
from flowerclf.features import passes as passes_module
from flowerclf.base.errors import FlowerclfError
from flowerclf.models.registry import ModelSpec
from flowerclf.training import trainer
from flowerclf.training.resume import ResumeState
from flowerclf.models.checkpoints import load_model
from flowerclf.training.trainer import format_epoch


def _wait_for(proc, text: bytes) -> None:
    """Read the process's output until `text`; fail (not hang) if it ends first."""
    for line in iter(proc.stdout.readline, b""):
        if text in line:
            return
    pytest.fail(f"the process ended (exit {proc.wait()}) before printing {text!r}")


def _train_cmd(data, save, *extra):
    # --patience 0: these runs are killed at a given epoch, so they must not stop early by themselves
    return [sys.executable, os.path.join(ROOT, "train.py"), data, "--save_dir", str(save), "--patience", "0"] + TINY \
        + list(extra)


@pytest.mark.slow
def test_sigkill_never_leaves_a_broken_checkpoint(image_folder, tmp_path):
    save = tmp_path / "s"
    subprocess.run(_train_cmd(image_folder, save, "--epochs", "2", "--learning_rate", "0.05"), check=True,
                   capture_output=True)  # --resume keeps the flags of the run it continues
    rng = random.Random(0)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for _ in range(2):
        # a high learning rate keeps valid accuracy moving, so checkpoint.pth is rewritten now and then too
        proc = subprocess.Popen(_train_cmd(image_folder, save, "--epochs", "400", "--learning_rate", "0.05",
                                           "--resume"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        _wait_for(proc, b"epoch ")  # the epochs, and their saves, have begun
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        code, out, err = _main(predict, [os.path.join(image_folder, "test", "1", "1_0.png"),
                                         str(save / "checkpoint.pth"), "--json"])
        assert code == 0, err
        assert len(json.loads(out)[0]["predictions"]) == 3
        assert torch.load(save / "checkpoint_last.pth", weights_only=True)["epoch"] >= 1


@pytest.mark.slow
def test_ctrl_c_exits_cleanly_and_keeps_checkpoints(image_folder, tmp_path):
    save = tmp_path / "s"
    proc = subprocess.Popen(_train_cmd(image_folder, save, "--epochs", "100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    _wait_for(proc, b"epoch 3/")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert b"Traceback" not in err and b"--resume" in err
    load_model(str(save / "checkpoint.pth"))
    assert torch.load(save / "checkpoint_last.pth", weights_only=True)["epoch"] >= 2


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(image_folder, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_train_cmd(image_folder, full, "--epochs", "12"), check=True, capture_output=True)
    proc = subprocess.Popen(_train_cmd(image_folder, cut, "--epochs", "12"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    _wait_for(proc, b"epoch 5/")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped = torch.load(cut / "checkpoint_last.pth", weights_only=True)["epoch"]
    assert 4 <= stopped < 12  # the kill may land before epoch 5 was saved
    run = subprocess.run(_train_cmd(image_folder, cut, "--epochs", "12", "--resume"), capture_output=True,
                         text=True, check=True)
    assert f"resuming after epoch {stopped}" in run.stdout
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(cut / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] and a["history"][-1]["valid_loss"] == b["history"][-1]["valid_loss"]
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


@pytest.mark.parametrize("cut", [1, 2])  # 1: killed right after the head phase, resumed from epoch 0
def test_finetune_resume_restores_optimizer_schedule_and_random_streams(image_folder, tmp_path, monkeypatch, cut):
    base = tiny_config(image_folder, ".", batch_size=6, epochs=3, unfreeze=1)
    trainer.train(replace_cfg(base, save_dir=str(tmp_path / "full")), log=lambda s: None)

    real = format_epoch

    def interrupt(epoch, *a):
        if epoch == cut:
            raise KeyboardInterrupt  # after epoch `cut`'s training, before its checkpoints
        return real(epoch, *a)
    monkeypatch.setattr(trainer, "format_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(replace_cfg(base, save_dir=str(tmp_path / "cut")), log=lambda s: None)
    monkeypatch.setattr(trainer, "format_epoch", real)
    monkeypatch.setattr(trainer, "head_first", lambda *a: pytest.fail("a resumed fine-tune trained its head again"))
    lines = []
    trainer.train(replace_cfg(base, save_dir=str(tmp_path / "cut"), resume=True), log=lines.append)
    assert any(line.startswith(f"resuming after epoch {cut - 1} ") for line in lines)
    a = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def replace_cfg(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_resume_refuses_other_classes(image_folder, tmp_path):
    save = tmp_path / "s"
    assert _main(train, [image_folder, "--save_dir", str(save), "--epochs", "1"] + TINY)[0] == 0
    other = make_image_folder(tmp_path / "other", classes=("a", "b", "c"))
    code, _, err = _main(train, [other, "--save_dir", str(save), "--epochs", "2", "--resume"] + TINY)
    assert code == 2 and "was made for classes ['1', '2', '3']" in err
    code, _, err = _main(train, [image_folder, "--save_dir", str(tmp_path / "none"), "--resume"] + TINY)
    assert code == 2 and "checkpoint_last.pth does not exist" in err
    code, _, err = _main(predict, [os.path.join(image_folder, "test", "1", "1_0.png"),
                                   str(save / "checkpoint_last.pth")])
    assert code == 2 and "use checkpoint.pth" in err


def test_a_resume_state_without_stateful_is_one_line(tiny_run, tmp_path):
    data, save = tiny_run
    state = torch.load(save / "checkpoint_last.pth", weights_only=True)
    del state["stateful"]
    (tmp_path / "s").mkdir()
    torch.save(torch.load(save / "checkpoint.pth", weights_only=True), tmp_path / "s" / "checkpoint.pth")
    torch.save(state, tmp_path / "s" / "checkpoint_last.pth")
    code, _, err = _main(train, [data, "--save_dir", str(tmp_path / "s"), "--epochs", "3", "--resume"] + TINY)
    assert "field 'stateful'" in one_error_line(code, err)


def test_resume_refuses_changed_training_flags_before_any_work(image_folder, tmp_path, monkeypatch):
    save = tmp_path / "s"
    assert _main(train, [image_folder, "--save_dir", str(save), "--epochs", "1"] + TINY)[0] == 0
    passes = []
    monkeypatch.setattr(passes_module, "extract_features", lambda *a, **k: passes.append(1))
    monkeypatch.setattr(passes_module, "open_store", lambda *a, **k: passes.append(1))
    code, _, err = _main(train, [image_folder, "--save_dir", str(save), "--epochs", "2", "--resume",
                                 "--learning_rate", "0.5", "--seed", "3"] + TINY)
    line = one_error_line(code, err)
    assert "--learning_rate 0.001 (now 0.5)" in line and "--seed 0 (now 3)" in line and "--overwrite" in line
    make_image_folder(image_folder, classes=("1", "2", "3", "4"))  # a new class
    code, _, err = _main(train, [image_folder, "--save_dir", str(save), "--epochs", "2", "--resume"] + TINY)
    assert "was made for classes" in one_error_line(code, err)
    assert not passes  # both refused before the feature pass
    monkeypatch.undo()
    code, out, err = _main(train, [make_image_folder(tmp_path / "d"), "--save_dir", str(save), "--epochs", "2",
                                   "--resume", "--num_workers", "0", "--no_store"] + TINY)
    assert code == 0 and "resuming after epoch 1" in out, err  # where and how fast it runs may change


def _state(scaler, tmp_path):
    """A resume state of a one-layer 'model' and `scaler`, through the file --resume reads."""
    spec = ModelSpec("mobilenet_v3_small", "none", [8], 0.0, 3)
    layer = torch.nn.Linear(2, 2)
    state = ResumeState.capture(layer.state_dict(), {"scaler": scaler}, torch.Generator(), spec, {"a": 0}, 1, [],
                                {"epoch": 1, "acc": 0.5, "loss": 1.0, "state": layer.state_dict()}, {"unfreeze": 1})
    torch.save(state.to_dict(), tmp_path / "checkpoint_last.pth")
    return ResumeState.read(str(tmp_path / "checkpoint_last.pth"), spec, {"a": 0}, 1), layer


@pytest.mark.filterwarnings("ignore::UserWarning")  # GradScaler on a CPU may say it is unusual
def test_resuming_a_bf16_run_where_fp16_is_picked_is_one_line(tmp_path):
    bf16, layer = _state(torch.amp.GradScaler("cpu", enabled=False), tmp_path)  # a bf16 run: no loss scaling
    with pytest.raises(FlowerclfError, match=r"trained with bf16 or no --amp, but this run uses fp16 with loss "
                                             r"scaling .*; resume where the same precision is picked"):
        bf16.apply(layer, {"scaler": torch.amp.GradScaler("cpu", enabled=True)}, torch.Generator(), "last")
    fp16, layer = _state(torch.amp.GradScaler("cpu", enabled=True), tmp_path)
    with pytest.raises(FlowerclfError, match="trained with fp16 with loss scaling, but this run uses bf16"):
        fp16.apply(layer, {"scaler": torch.amp.GradScaler("cpu", enabled=False)}, torch.Generator(), "last")
    assert fp16.apply(layer, {"scaler": torch.amp.GradScaler("cpu", enabled=True)}, torch.Generator(),
                      "last")[0] == 2


def test_resume_saves_and_restores_the_cuda_random_state(tmp_path, monkeypatch):
    gpu_state = torch.full((16,), 7, dtype=torch.uint8)  # the training GPU's generator
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: gpu_state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(state))
    state, layer = _state(torch.amp.GradScaler("cpu", enabled=False), tmp_path)
    state.apply(layer, {"scaler": torch.amp.GradScaler("cpu", enabled=False)}, torch.Generator(), "last")
    assert len(restored) == 1 and torch.equal(restored[0], gpu_state)
    torch.save(dict(state.to_dict(), cuda_rng="junk"), tmp_path / "bad.pth")
    with pytest.raises(FlowerclfError, match="field 'cuda_rng'"):
        ResumeState.read(str(tmp_path / "bad.pth"), ModelSpec("mobilenet_v3_small", "none", [8], 0.0, 3),
                         {"a": 0}, 1)
