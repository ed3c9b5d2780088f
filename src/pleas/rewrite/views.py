"""Tensors stored compressed, read as the dense tensors their members index.

A grouped convolution with g groups stores its weight as (out, in/g, *kernel); the dense weight it stands
for is (out, in, *kernel), block-diagonal: output channels of group b read only input channels of group
b. Rewrites act on the dense form (units never leave their block, and blocks keep equal widths: tied
groups), and :func:`stored` takes the diagonal blocks back.
"""
from __future__ import annotations

import torch

from ..errors import SpecError


def dense(spec, key: str, t: torch.Tensor) -> torch.Tensor:
    """The dense form of ``spec``'s tensor ``key`` (``t`` itself unless the spec has a view of it)."""
    view = spec.views.get(key)
    if view is None:
        return t
    kind, groups = view
    if kind != "blockdiag":
        raise SpecError(f"unknown view {kind!r} of {key}")
    out_ch, per = t.shape[0], t.shape[1]
    rows = out_ch // groups
    full = t.new_zeros((out_ch, per * groups, *t.shape[2:]))
    for b in range(groups):
        full[b * rows : (b + 1) * rows, b * per : (b + 1) * per] = t[b * rows : (b + 1) * rows]
    return full


def stored(spec, key: str, full: torch.Tensor) -> torch.Tensor:
    """The stored form of the dense tensor ``full`` (its diagonal blocks for a grouped convolution)."""
    view = spec.views.get(key)
    if view is None:
        return full
    _, groups = view
    out_ch, in_ch = full.shape[0], full.shape[1]
    if out_ch % groups or in_ch % groups:
        raise SpecError(f"{key}: widths {out_ch} x {in_ch} do not split into {groups} equal blocks")
    rows, per = out_ch // groups, in_ch // groups
    return torch.cat([full[b * rows : (b + 1) * rows, b * per : (b + 1) * per] for b in range(groups)])


def dense_shape(spec, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dense form's shape of a tensor stored with ``shape``."""
    view = spec.views.get(key)
    if view is None:
        return tuple(shape)
    return (shape[0], shape[1] * view[1], *shape[2:])


def stored_numel(spec, key: str, shape: tuple[int, ...]) -> int:
    """Entries stored for a tensor whose dense form has ``shape``."""
    import math

    view = spec.views.get(key)
    numel = math.prod(shape)
    return numel // view[1] if view is not None else numel
