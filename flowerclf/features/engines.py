"""The frozen backbone's forward on an engine: torch on any device, or ONNX Runtime on the CPU."""
from __future__ import annotations

import hashlib
import os
from typing import Callable

import torch
from torch import nn

from flowerclf.base.errors import FlowerclfError, brief
from flowerclf.features.store import store_dir
from flowerclf.models.onnx import backbone_session
from flowerclf.runtime import ddp
from flowerclf.runtime.devices import autocast, to_channels_last

Forward = Callable[[torch.Tensor], torch.Tensor]  # a CPU batch of images -> CPU float32 features


def torch_forward(backbone: nn.Module, device: torch.device, amp: bool = False, batch_size: int = 0) -> Forward:
    """The backbone in eval mode and channels-last, on `device`.

    On CUDA a batch smaller than `batch_size` (the pass's configured one: a split's last batch, or
    the few misses of a warm store) is padded to it, so cuDNN autotunes one shape per pass.
    """
    to_channels_last(backbone.eval())

    def forward(x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        x = x.to(device, non_blocking=True)
        if device.type == "cuda" and n < batch_size:
            x = torch.cat([x, x.new_zeros((batch_size - n,) + tuple(x.shape[1:]))])
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            return backbone(x)[:n].float().cpu()
    return forward


class OnnxForward:
    """The backbone through an ONNX Runtime session; `close()` ends the session.

    A session holds its model, its memory arena and its intra-op threads: the feature pass
    closes it when it ends, so the rest of the run gets those cores and that memory back.
    """

    def __init__(self, session):
        self.session = session
        self.input = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])

    def close(self) -> None:
        self.session = None


def onnx_forward(backbone: nn.Module, arch: str, crop_size: int, fingerprint: str) -> OnnxForward:
    """The backbone through ONNX Runtime's CPU provider, exported once per weights and library versions."""
    return OnnxForward(backbone_session(backbone, arch, crop_size, fingerprint, os.path.join(store_dir(), "onnx")))


def feature_forward(backbone: nn.Module, arch: str, crop_size: int, engine: str, device: torch.device,
                    amp: bool, fingerprint: str, log: Callable[[str], None],
                    batch_size: int = 0) -> tuple[Forward, str]:
    """The frozen backbone's forward on the chosen engine, and the engine actually used.

    auto: ONNX Runtime on a CPU (3.2x torch for efficientnet_lite0 on 2 cores), torch elsewhere and
    under torchrun (where the processes already share the cores).
    A failed export falls back to torch with one line. `batch_size`: the pass's, which torch pads to on CUDA.
    """
    use_ort = engine == "onnxruntime" or (engine == "auto" and device.type == "cpu" and not amp
                                          and not ddp.launched())
    if use_ort and ddp.launched():
        raise FlowerclfError("--engine onnxruntime is for single-process runs; under torchrun use --engine torch")
    if use_ort and device.type != "cpu":
        raise FlowerclfError(f"the onnxruntime engine runs on the CPU, but the device is {device}; "
                             f"train.py: pass --device cpu, or --engine auto or torch")
    if use_ort:
        try:
            return onnx_forward(backbone, arch, crop_size, fingerprint), "onnxruntime"
        except Exception as e:  # exporter and runtime failures are many; every one means "use torch"
            log(f"ONNX Runtime unavailable for {arch} ({brief(e, 150)}); using torch")
    return torch_forward(backbone, device, amp, batch_size), "torch"


def state_fingerprint(module: nn.Module) -> str:
    """Hash of a module's weights: identifies the network a stored vector came from, whatever its origin."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]
