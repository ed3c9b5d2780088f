"""Exact size accounting of a rewritten model from its group widths (no model is built)."""
from __future__ import annotations

import math

import torch

from .plans import unit_owners
from .spec import PermutationSpec
from .transform import GroupMap


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


def zero_block_count(
    spec: PermutationSpec, state_dict: dict[str, torch.Tensor], maps: dict[str, GroupMap], n_models: int
) -> int:
    """Entries of the merged model that are zero by construction: in a weight whose output and input
    axes are both grouped, entry (i, j) where no model owns both output unit i and input unit j (an
    A-only row reading a B-only column), times the other axes (kernel, repeat). ALGORITHM.md:
    effective cost = m_o x m_i - 2 (d_o - k_o)(d_i - k_i) per layer for two models."""
    widths = {name: gm.width for name, gm in maps.items()}
    total = 0
    for key, t in state_dict.items():
        members = [(g, m) for g, m in spec.members_of(key) if g.name in maps]
        outs = [(g, m) for g, m in members if m.axis == 0]
        ins = [(g, m) for g, m in members if m.axis == 1]
        if not outs or not ins or t.dim() < 2:
            continue
        shape = param_shape(spec, key, tuple(t.shape), widths)
        own_out = unit_owners(outs, shape[0], maps, n_models, side="out").double()
        own_in = unit_owners(ins, shape[1], maps, n_models, side="in").double()
        shared = (own_out.T @ own_in) > 0  # (m_out, m_in): some model owns both
        total += int((~shared).sum()) * math.prod(shape[2:])
    return total
