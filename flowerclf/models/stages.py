"""Backbone stages for --unfreeze N: the blocks of any backbone that hold convolutions or attention, last first.

A lone layer (a stem or head convolution, a norm) is never a stage of its own: it goes with the block
next to it, so `--unfreeze 1` always trains the backbone's last block, whatever the architecture.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from flowerclf.models.registry import freeze

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Stage:
    """One unit of --unfreeze: a block and the lone layers that go with it, by qualified name."""

    parts: tuple[tuple[str, nn.Module], ...]

    @property
    def name(self) -> str:
        return ", ".join(name for name, _ in self.parts)

    def parameters(self):
        return (p for _, module in self.parts for p in module.parameters())


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_block(module: nn.Module) -> bool:
    """A module with children holding a convolution or attention (torchvision names its attention classes so:
    MultiheadAttention, swin's ShiftedWindowAttention, maxvit's RelativePositionalMultiHeadAttention)."""
    return any(True for _ in module.children()) and any(
        isinstance(m, _CONV) or "Attention" in type(m).__name__ for m in module.modules())


def opened_children(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's children, wrappers opened, by qualified name.

    A child holding at least 60% of its parent's parameters is a wrapper (densenet's `features`,
    vit's `encoder.layers`) and is opened into its own children, repeatedly.
    """
    layers = list(backbone.named_children())
    while True:
        total = sum(_n_params(m) for _, m in layers)
        big = next((i for i, (_, m) in enumerate(layers)
                    if total and _n_params(m) >= 0.6 * total and any(True for _ in m.children())), None)
        if big is None:
            return layers
        name, module = layers[big]
        layers[big:big + 1] = [(f"{name}.{n}", m) for n, m in module.named_children()]


def _layers(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's parameterised children in forward order, wrappers opened (opened_children)."""
    return [(n, m) for n, m in opened_children(backbone) if _n_params(m) > 0]


def _is_norm(module: nn.Module) -> bool:
    return all(isinstance(m, _NORMS) or not any(True for _ in m.parameters(recurse=False)) for m in module.modules())


def backbone_stages(backbone: nn.Module) -> list[Stage]:
    """The stages in forward order: each block, with the lone layers before the first block joining it and every
    other lone layer joining the block before it. A backbone of fewer than two blocks (vgg and alexnet are plain
    stacks of layers) has a stage per layer instead, its norm layers joining the layer before them."""
    layers = _layers(backbone)
    blocks = sum(_is_block(m) for _, m in layers)
    joins = (lambda m: not _is_block(m)) if blocks >= 2 else _is_norm
    groups: list[list[tuple[str, nn.Module]]] = []
    leading: list[tuple[str, nn.Module]] = []
    for name, module in layers:
        if not joins(module):
            groups.append(leading + [(name, module)])
            leading = []
        elif groups:
            groups[-1].append((name, module))
        else:
            leading.append((name, module))
    if leading:  # nothing but norms: each its own stage
        groups += [[layer] for layer in leading]
    return [Stage(tuple(group)) for group in groups]


def unfreeze_last(backbone: nn.Module, n: int | str) -> list[str]:
    """Make the last `n` stages (or 'all') trainable; the rest stay frozen. Returns their names."""
    if n == "all":
        for p in backbone.parameters():
            p.requires_grad_(True)
        return ["all"]
    freeze(backbone)
    chosen = backbone_stages(backbone)[-n:] if n > 0 else []
    for stage in chosen:
        for p in stage.parameters():
            p.requires_grad_(True)
    return [stage.name for stage in chosen]


def describe_stages(backbone: nn.Module) -> list[str]:
    """train.py --list_stages: one line per stage, numbered as --unfreeze counts them (1 = the last)."""
    stages = backbone_stages(backbone)
    sizes = [sum(p.numel() for p in stage.parameters()) for stage in stages]
    return [f"{len(stages) - i:3d}  {f'{n / 1e6:.2f} M' if n >= 1e5 else f'{n / 1e3:.1f} K':>9s}  {stage.name}"
            for i, (stage, n) in enumerate(zip(stages, sizes))]
