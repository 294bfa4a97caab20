"""The device decision."""
import pytest
import torch

from flowerclf.base.errors import FlowerclfError
from flowerclf.runtime import devices


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("cpu").type == "cpu"
    with pytest.raises(FlowerclfError, match="no CUDA device"):
        devices.resolve_device("auto", gpu=True)
    with pytest.raises(FlowerclfError, match="--gpu asks for CUDA"):
        devices.resolve_device("cpu", gpu=True)


def test_num_workers_auto_follows_device_and_cores(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert devices.resolve_num_workers(3, torch.device("cpu")) == 3
    for cores, cpu, cuda in ((2, 0, 1), (4, 0, 3), (16, 4, 15), (64, 16, 16)):
        monkeypatch.setattr(devices, "cpu_cores", lambda: cores)
        assert devices.resolve_num_workers("auto", torch.device("cpu")) == cpu
        assert devices.resolve_num_workers("auto", torch.device("cuda")) == cuda
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes share the node's 64 cores
    assert devices.resolve_num_workers("auto", torch.device("cuda")) == 15
