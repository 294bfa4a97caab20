"""The device decision."""
from types import SimpleNamespace

import pytest
import torch

from flowerclf.base.errors import FlowerclfError
from flowerclf.features.engines import feature_forward, torch_forward
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
    # phone photos: a worker a core on a CPU, where decoding them bounds the pass; the GPU's rule stays
    monkeypatch.setattr(devices, "cpu_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    big, small = 4032 * 3024, 500 * 375
    assert [devices.resolve_num_workers("auto", torch.device("cpu"), p) for p in (big, small, 0)] == [2, 0, 0]
    assert devices.resolve_num_workers("auto", torch.device("cuda"), big) == 1
    assert devices.resolve_num_workers(0, torch.device("cpu"), big) == 0  # a number is taken as given



@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_amp_is_bf16_only_on_gpus_with_native_bf16(monkeypatch, capability, dtype):
    # a CUDA machine whose GPU can make (emulated) bf16 tensors, as an sm_75 T4 or RTX 20xx can
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=capability[0], minor=capability[1]))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)
    assert devices.amp_dtype(torch.device("cuda")) == dtype  # fp16: the GradScaler path of train.py --amp
    assert devices.amp_dtype(torch.device("cuda", 0)) == dtype
    assert devices.amp_dtype(torch.device("cpu")) == torch.bfloat16


def test_cuda_feature_batches_are_padded_to_the_configured_size_even_when_the_first_is_small(monkeypatch):
    # a fake CUDA device: moving a tensor there leaves it on the CPU
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(len(x))
            return x.flatten(1)
    # a warm store leaves a pass with 3 misses first, then a whole batch, then a split's last 5
    forward, engine = feature_forward(Recorder(), "fake", 2, "auto", torch.device("cuda"), False, "fp", print,
                                      batch_size=8)
    assert engine == "torch"
    out = [forward(torch.ones(n, 3, 2, 2)) for n in (3, 8, 5)]
    assert seen == [8, 8, 8]  # one shape for cuDNN to autotune, the configured one
    assert [len(o) for o in out] == [3, 8, 5]
    seen.clear()
    cpu = torch_forward(Recorder(), torch.device("cpu"), batch_size=8)
    cpu(torch.ones(3, 3, 2, 2))
    assert seen == [3]  # no padding on the CPU: it would only cost time
