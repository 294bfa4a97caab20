"""Every script's command line: one error line for bad input, --help for every flag, defaults shared with the code."""
import dataclasses
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
import torchvision
from conftest import EPS, ROOT, TINY, make_image_folder, one_error_line, run_script
from test_layout import SCRIPTS

import evaluate
import predict
import train
from flowerclf.training.config import TrainConfig


def test_train_bad_inputs_fail_in_one_line(tmp_path, capsys):
    assert train.main([str(tmp_path / "nowhere"), "--arch", "efficientnet_lite0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: data directory {tmp_path / 'nowhere'} does not exist"]
    assert train.main([str(tmp_path), "--epochs", "0"]) == 2
    assert capsys.readouterr().err == "error: argument --epochs: 0 is less than 1 (see train.py --help)\n"
    assert train.main([str(tmp_path), "--arch", "notanet"]) == 2


def test_a_number_that_is_not_finite_is_named_alone(tmp_path, capsys):
    import audit
    assert train.main([str(tmp_path), "--dropout", "nan", "--learning_rate", "inf"]) == 2
    assert capsys.readouterr().err == "error: --dropout and --learning_rate must be finite numbers\n"
    assert audit.main([str(tmp_path), "--valid_split", "nan"]) == 2  # audit.py has no --dropout to name
    assert capsys.readouterr().err == "error: --valid_split must be a finite number\n"


def test_a_postscript_photo_runs_nothing_from_any_script(tiny_run, tmp_path, fake_gs):
    from flowerclf.serving.predictor import Predictor
    ckpt = str(tiny_run[1] / "checkpoint.pth")
    photo = tmp_path / "holiday.jpg"
    photo.write_bytes(EPS)
    said = "holiday.jpg looks like EPS (Encapsulated Postscript), a format flowerclf does not open"
    assert said in one_error_line(*run_script(predict, [str(photo), ckpt])[::2])
    data = make_image_folder(tmp_path / "data")
    for split in ("train", "test"):
        shutil.copy(photo, os.path.join(data, split, "1", "holiday.jpg"))
    for argv in ([data, "--check"], [data, "--save_dir", str(tmp_path / "s")] + TINY):
        code, _, err = run_script(train, argv)
        assert code == 2 and "Traceback" not in err and said in err.splitlines()[-1], err
    assert said in one_error_line(*run_script(evaluate, [ckpt, os.path.join(data, "test")])[::2])
    results, errors = Predictor.load(ckpt).predict_bytes([("holiday.jpg", EPS)], 3)
    assert results == [] and len(errors) == 1 and errors[0].startswith(said)
    assert not fake_gs.exists()


# each script: a bad argument, then a missing file; the real processes, so a traceback would show
EDGE_CASES = {
    "train.py": (["D", "--batch_size", "x"], ["{missing}"]),
    "predict.py": (["a.jpg", "m.pth", "--top_k", "0"], ["{missing}", "{missing}.pth"]),
    "evaluate.py": (["m.pth", "D", "--batch_size", "-1"], ["{missing}.pth", "D"]),
    "export.py": (["m.pth", "--nope"], ["{missing}.pth"]),
    "serve.py": (["m.onnx", "--port", "70000"], ["{missing}.onnx"]),
    "gpumemcheck.py": (["--watch", "0"], ["--arch", "{missing}"]),
    "data_utils.py": (["flowers102", "D", "--seed", "x"], ["flowers102", "D", "--source", "{missing}"]),
    "cache.py": (["nope"], ["clear", "--arch"]),
    "audit.py": (["D", "--arch", "notanet"], ["{missing}"]),
}


def test_every_script_has_its_edge_cases():
    assert SCRIPTS <= {name[:-len(".py")] for name in EDGE_CASES}


@pytest.mark.parametrize("script", sorted(EDGE_CASES))
@pytest.mark.slow
def test_every_script_fails_in_one_line(script, tmp_path):
    env = dict(os.environ, FLOWERCLF_STORE=str(tmp_path / "cache"))
    for argv in EDGE_CASES[script]:
        argv = [a.format(missing=tmp_path / "missing") for a in argv]
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script)] + argv, capture_output=True, text=True,
                              cwd=tmp_path, env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, proc.stderr)


def test_offline_download_failure_is_one_line(image_folder, monkeypatch, tmp_path, capsys):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    def torch_download(self, *a, **k):  # what torch.hub does offline: a line, then the failure
        sys.stderr.write(f'Downloading: "{self.url}" to ...\n')
        offline()
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", torch_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert train.main([image_folder, "--save_dir", str(tmp_path / "s")]) == 2  # densenet121 by default
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not download densenet121 weights")
    assert not (tmp_path / "s").exists()


def test_gpu_flag_without_cuda_is_a_clear_error(image_folder, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.main([image_folder, "--gpu", "--arch", "efficientnet_lite0"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_explains_every_flag(script):
    parser = __import__(script).build_parser()
    assert "example" in parser.format_help()  # what --help prints
    for action in parser._actions:
        assert action.help, action.dest


def test_the_parsers_defaults_are_train_configs():
    """train.py's flags and TrainConfig are one set of defaults: a run from the code is a run from the CLI."""
    args = vars(train.build_parser().parse_args(["DATA"]))
    for field in dataclasses.fields(TrainConfig):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if field.name != "data_dir":
            assert args[field.name] == default, field.name


@pytest.mark.parametrize("typed, meant", [("--epoh", "--epochs"), ("--epoch", "--epochs"), ("--lr", "--learning_rate"),
                                          ("--batchsize", "--batch_size")])
def test_a_mistyped_flag_is_refused_with_the_flag_meant(tmp_path, typed, meant, capsys):
    assert train.main([str(tmp_path), typed, "1"]) == 2  # --epoch is no abbreviation of --epochs
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"unrecognized arguments: {typed} 1; did you mean {meant}?" in err


_NO_TORCH = """
import sys
sys.path.insert(0, sys.argv[1])
import train
code = train.main(sys.argv[2:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
assert code == 2 and not heavy, (code, heavy[:5])
"""


@pytest.mark.slow
@pytest.mark.parametrize("argv, said", [
    (["{tmp}/nowhere"], "data directory {tmp}/nowhere does not exist"),
    (["{tmp}/data", "--arch", "efficientnet_lit0"], "did you mean efficientnet_lite0"),
    (["{tmp}/data", "--save_dir", "{tmp}/data/train/runs"], "is inside"),
    (["{tmp}/data", "--category_names", "{tmp}/nowhere.json"], "--category_names {tmp}/nowhere.json cannot be read"),
    (["{tmp}/two"], "{tmp}/two/ has both valid/ and val/"),
    (["{tmp}/two/train", "--save_dir", "{tmp}/two/train/1/runs"], "is inside {tmp}/two/train/"),  # class folders
])
def test_path_and_name_errors_come_before_importing_torch(tmp_path, argv, said):
    make_image_folder(tmp_path / "data")
    make_image_folder(tmp_path / "two", per_class={"train": 2, "val": 1, "valid": 1})
    argv = [a.format(tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, ROOT, *argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and said.format(tmp=tmp_path) in proc.stderr


def test_list_archs_prints_every_name_without_data(capsys):
    with pytest.raises(SystemExit) as done:
        train.main(["--list_archs"])
    assert done.value.code == 0
    names = capsys.readouterr().out.split()
    assert "efficientnet_lite0" in names and "resnet50" in names and names == sorted(names)


def test_list_stages_needs_no_data_and_names_no_lone_norm(capsys):
    assert train.main(["--list_stages", "--arch", "efficientnet_lite0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].split()[0] == "1" and lines[-1].endswith("blocks.6, conv_head, bn2")
    assert not any(line.endswith(("bn1", "bn2")) and "," not in line for line in lines)
    assert train.main([]) == 2 and "give DATA_DIR" in capsys.readouterr().err
