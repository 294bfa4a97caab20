"""A backbone cut before its first trainable layer (--unfreeze N): the frozen prefix, to run apart, and the rest.

Under --unfreeze 1 the frozen layers take nearly all of a CPU training step (efficientnet_lite0 at
batch 64 on 2 cores: over 90% of it), yet they are the same function in every step: nothing there
trains and their BatchNorms stay in eval mode. So the prefix can run on another engine (ONNX Runtime)
while only the rest runs in torch with autograd. The cut is found on any backbone whose layers up to the
first trainable one form a chain (each takes exactly what the one before it gave), and is checked once
on an example against the whole backbone; a backbone where it does not hold has no prefix.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from flowerclf.models.stages import opened_children


@dataclass
class Prefix:
    """The frozen `layers` (a Sequential of the backbone's own modules), the backbone they were cut from, and the
    qualified name of the layer the cut is before."""

    layers: nn.Sequential
    backbone: nn.Module
    cut: str

    def rest(self, x: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        """The backbone's output for images `x` whose prefix output is `given`: the frozen layers are skipped."""
        with _skipped(list(self.layers), given):
            return self.backbone(x)


@contextlib.contextmanager
def _skipped(layers: list[nn.Module], given: torch.Tensor):
    """Each of `layers` returns `given` instead of computing (an instance attribute shadows the class's forward;
    the module, its weights and its state_dict stay as they are; a layer's own instance forward, a wrapper some
    library set, is put back)."""
    own = [vars(layer).get("forward") for layer in layers]
    for layer in layers:
        layer.forward = lambda *args, **kwargs: given
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _chain(backbone: nn.Module, layers: list[nn.Module], example: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The backbone's output on `example`, and each call of `layers` in it: (which, its input, its output)."""
    calls: list[tuple] = []  # the tensors themselves, not their ids (which a freed tensor's successor may reuse)
    hooks = [module.register_forward_hook(lambda m, args, out, k=k: calls.append((k, args[0] if args else None, out)))
             for k, module in enumerate(layers)]
    try:
        return backbone(example), calls
    finally:
        for hook in hooks:
            hook.remove()


def frozen_prefix(backbone: nn.Module, crop_size: int) -> Prefix | None:
    """The layers before the first one holding a trainable parameter, or None: nothing frozen comes first, or
    they are no chain, or the cut does not give the backbone's own output on an example."""
    layers = opened_children(backbone)
    first = next((k for k, (_, m) in enumerate(layers) if any(p.requires_grad for p in m.parameters())), 0)
    if first == 0:
        return None
    modes = {m: m.training for m in backbone.modules()}
    example = torch.randn(2, 3, crop_size, crop_size, generator=torch.Generator().manual_seed(0))
    example = example.contiguous(memory_format=torch.channels_last)
    try:
        backbone.eval()  # dropout and batch statistics would make two forwards differ
        with torch.no_grad():
            whole, calls = _chain(backbone, [m for _, m in layers[:first + 1]], example)
            # a chain: each layer runs once, in order, on what the one before gave (the first on the images)
            if [k for k, _, _ in calls] != list(range(first + 1)) or calls[0][1] is not example \
                    or any(calls[k][1] is not calls[k - 1][2] for k in range(1, first + 1)):
                return None
            prefix = Prefix(nn.Sequential(OrderedDict((name.replace(".", "_"), m) for name, m in layers[:first])),
                            backbone, layers[first][0])
            cut = prefix.rest(example, calls[first - 1][2])  # the prefix's output, as the chain gave it
            # float error only, relative to the output's scale (an untrained backbone's outputs can be 1e-9)
            return prefix if (cut - whole).abs().max() <= 1e-4 * whole.abs().max() else None
    finally:
        for module, training in modes.items():
            module.train(training)
