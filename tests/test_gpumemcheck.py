"""gpumemcheck.py: the CPU report, the tensor census and the batch-size search."""
import contextlib
import io
import json

import pytest
import torch

import gpumemcheck
import train
from flowerclf.runtime import devices
from flowerclf.training import memory, trainer


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
    def oom(cfg, log=print, splits=None, ranker=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(trainer, "train", oom)
    assert train.main([image_folder, "--arch", "resnet50", "--batch_size", "256", "--unfreeze", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: CUDA out of memory at --batch_size 256 (feature batch auto); python gpumemcheck.py "
                   "--arch resnet50 --unfreeze 2 --find_batch_size finds one that fits"]


class FakeCuda:
    """torch.cuda's memory counters for one device of `capacity` bytes, on the CPU; fake steps call alloc()."""

    def __init__(self, monkeypatch, capacity, error=lambda: torch.cuda.OutOfMemoryError("CUDA out of memory")):
        self.capacity, self.error, self.allocated, self.peak = capacity, error, 1000, 1000  # 1000: the weights
        fakes = {
            "is_available": lambda: True, "device_count": lambda: 1, "get_device_name": lambda i=None: "Fake GPU",
            "empty_cache": lambda: None, "synchronize": lambda device=None: None,
            "reset_peak_memory_stats": lambda device=None: setattr(self, "peak", self.allocated),
            "memory_allocated": lambda device=None: self.allocated,
            "memory_reserved": lambda device=None: self.allocated,
            "max_memory_allocated": lambda device=None: self.peak,
            "mem_get_info": lambda device=None: (self.capacity - self.allocated, self.capacity),
        }
        for name, fake in fakes.items():
            monkeypatch.setattr(torch.cuda, name, fake)
        monkeypatch.setattr(memory.gc, "collect", lambda *args: 0)  # nothing of the fake's to collect, and slow

    def alloc(self, n):
        if self.allocated + n > self.capacity:
            raise self.error()
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def training_step(self, state=5000, per_image=100):
        """A step whose first call makes `state` bytes that stay (AdamW's), then `per_image` a batch image."""
        made = []

        def step(batch):
            if not made:
                self.alloc(state)
                made.append(state)
            self.alloc(per_image * batch)
            self.allocated -= per_image * batch  # activations and gradients freed after the step
        return step


def _args(argv):
    return gpumemcheck.build_parser().parse_args(["--arch", "mobilenet_v3_small"] + argv)


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
])
def test_workspace_allocation_failures_count_as_not_fitting(monkeypatch, error):
    assert devices.out_of_memory(error)
    cuda = FakeCuda(monkeypatch, capacity=1000 + 5000 + 100 * 37, error=lambda: error)
    est = gpumemcheck.estimate(_args(["--find_batch_size"]), cuda.training_step(), "fake", torch.device("cuda"))
    assert est["largest_batch_size"] == 37 and est["recommended_batch_size"] == 33


def test_other_errors_of_a_step_are_not_out_of_memory(monkeypatch):
    for error in (RuntimeError("CUDA error: an illegal memory access was encountered"),
                  RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"), ValueError("out of memory")):
        assert not devices.out_of_memory(error)
    # the warm-up step fails, with an error that is a bug, not a size
    cuda = FakeCuda(monkeypatch, capacity=1000, error=lambda: RuntimeError("CUDA error: illegal memory access"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        gpumemcheck.estimate(_args(["--find_batch_size"]), cuda.training_step(), "fake", torch.device("cuda"))


def test_batch_size_and_the_search_measure_the_same_peak(monkeypatch):
    cuda = FakeCuda(monkeypatch, capacity=1000 + 5000 + 100 * 8)
    fixed = gpumemcheck.estimate(_args(["--batch_size", "8"]), cuda.training_step(), "f", torch.device("cuda"))
    cuda = FakeCuda(monkeypatch, capacity=1000 + 5000 + 100 * 8)
    found = gpumemcheck.estimate(_args(["--find_batch_size"]), cuda.training_step(), "f", torch.device("cuda"))
    assert found["batch_size"] == fixed["batch_size"] == 8
    assert found["peak_bytes"] == fixed["peak_bytes"] == 800  # the step, above weights and AdamW's state


def test_this_process_peak_is_read_after_the_step(monkeypatch):
    cuda = FakeCuda(monkeypatch, capacity=10 ** 6)
    monkeypatch.setattr(memory, "training_step", lambda *args: (cuda.training_step(), "fake step"))
    code, out = _run(["--arch", "mobilenet_v3_small", "--batch_size", "8", "--json"])
    report = json.loads(out)
    assert code == 0 and report["estimate"]["peak_bytes"] == 800
    assert report["cuda"][0]["peak_allocated"] == 1000 + 5000 + 800  # weights, AdamW's state, the step
    assert report["cuda"][0]["allocated"] == 1000 + 5000
    text = gpumemcheck.format_text(report)
    assert "batch 8: peak 0 MiB of GPU memory above the weights and optimizer state" in text
