"""Exact size accounting of a rewritten model from its group widths (no model is built)."""
from __future__ import annotations

import math

import torch

from .spec import PermutationSpec


def param_shape(spec: PermutationSpec, name: str, shape: tuple[int, ...], widths: dict[str, int]) -> tuple[int, ...]:
    """The shape tensor ``name`` takes when every group g has ``widths[g]`` units (others unchanged)."""
    new = list(shape)
    for g, m in spec.members_of(name):
        if g.name in widths:
            new[m.axis] += (widths[g.name] - g.width) * m.repeat
    return tuple(new)


def dense_param_count(spec: PermutationSpec, state_dict: dict[str, torch.Tensor], widths: dict[str, int]) -> int:
    """Number of floating-point entries of the rewritten state dict (parameters and float buffers
    such as BatchNorm statistics are both counted: they are what the saved file holds)."""
    return sum(
        math.prod(param_shape(spec, k, tuple(t.shape), widths))
        for k, t in state_dict.items()
        if t.dtype.is_floating_point
    )


def model_param_count(model: torch.nn.Module) -> int:
    """The same count on a built model: floating-point entries of its state dict."""
    return sum(t.numel() for t in model.state_dict().values() if t.dtype.is_floating_point)
