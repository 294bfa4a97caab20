"""gpumemcheck.py: the CPU report, the tensor census and the batch-size search."""
import contextlib
import io
import json

import pytest
import torch

import gpumemcheck
import train
from flowerclf.runtime import memory
from flowerclf.training import trainer


def _run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = gpumemcheck.main(argv)
    return code, out.getvalue()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU report")
def test_cpu_only_report_and_json():
    code, out = _run([])
    assert code == 0
    assert out.startswith("no CUDA device") and "cpu: this process" in out and "available" in out
    code, out = _run(["--json"])
    report = json.loads(out)
    assert code == 0 and report["cuda"] == []
    assert 0 < report["host"]["process_rss"] < report["host"]["total"]
    assert 0 < report["host"]["available"] <= report["host"]["total"]


def test_census_counts_known_tensors():
    keep = [torch.zeros(123, 7, dtype=torch.float64) for _ in range(2)] + [torch.ones(5, dtype=torch.int16)]
    rows = {(r["device"], r["dtype"], tuple(r["shape"])): r for r in memory.tensor_census()}
    doubles = rows[("cpu", "float64", (123, 7))]
    assert doubles["count"] >= 2 and doubles["bytes"] == doubles["count"] * 123 * 7 * 8
    assert rows[("cpu", "int16", (5,))]["bytes"] == rows[("cpu", "int16", (5,))]["count"] * 10
    del keep


@pytest.mark.parametrize("capacity", [1, 2, 3, 37, 64, 100, 1000, 4095])
def test_search_finds_the_exact_limit_of_a_fake_device(capacity):
    tried = []

    def fits(batch):  # a device whose memory runs out above `capacity` images
        tried.append(batch)
        return batch <= capacity
    assert memory.largest_fitting(fits) == capacity
    assert len(tried) <= 2 * capacity.bit_length() + 2  # doubling, then bisection: logarithmic


def test_search_edges():
    assert memory.largest_fitting(lambda b: False) == 0
    assert memory.largest_fitting(lambda b: True, limit=300) == 300
    assert memory.with_margin(37) == 33 and memory.with_margin(1) == 1 and memory.with_margin(0) == 0


def test_find_batch_size_on_cpu_reports_for_ram():
    code, out = _run(["--arch", "mobilenet_v3_small", "--find_batch_size", "--json"])
    est = json.loads(out)["estimate"]
    assert code == 0 and est["device"] == "cpu"
    assert 0 < est["recommended_batch_size"] <= est["largest_batch_size"]
    assert est["fixed_bytes"] + est["per_image_bytes"] * est["largest_batch_size"] <= \
        json.loads(out)["host"]["available"]
    assert any(r["shape"] == [102, 512] for r in json.loads(out)["tensors"])  # the measured head is in the census
    assert est["measured_batch_sizes"] == [4, 16] and est["per_image_seconds"] > 0
    text = gpumemcheck.format_text(json.loads(out))
    assert "extrapolated from real steps of 4 and 16 images" in text and "s on this CPU" in text


def test_bad_arguments(capsys):
    assert gpumemcheck.main(["--find_batch_size"]) == 2
    assert capsys.readouterr().err == "error: --find_batch_size, --unfreeze and --amp need --arch\n"
    assert gpumemcheck.main(["--arch", "nonet"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown --arch 'nonet'")


def test_train_out_of_memory_hint(image_folder, monkeypatch, capsys):
    def oom(cfg, log=print):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(trainer, "train", oom)
    assert train.main([image_folder, "--arch", "resnet50", "--batch_size", "256", "--unfreeze", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: CUDA out of memory at --batch_size 256 (feature batch auto); python gpumemcheck.py "
                   "--arch resnet50 --unfreeze 2 --find_batch_size finds one that fits"]
