"""Handlers for normalisation layers: BatchNorm, LayerNorm, GroupNorm (per-unit parameters)."""
from __future__ import annotations

from torch import nn

from .registry import module_handler

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _resize_batchnorm(m: nn.modules.batchnorm._BatchNorm) -> None:
    t = m.weight if m.weight is not None else m.running_mean
    if t is not None:
        m.num_features = t.shape[0]


@module_handler(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, resize=_resize_batchnorm)
def batchnorm(ctx):
    """Per-channel affine and statistics on dimension 1: every tensor follows the units."""
    x = ctx.features(ctx.arg(0, "input"))
    if x is None or x.dim != 1:
        raise ctx.fail("BatchNorm needs its channels on dimension 1 of a traced activation")
    for name in _BN_TENSORS:
        ctx.attach(ctx.param(name), 0, "out", x)
    return x


def _resize_layernorm(m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@module_handler(nn.LayerNorm, resize=_resize_layernorm)
def layernorm(ctx):
    """Normalises over the trailing ``len(normalized_shape)`` dims, which must include the units."""
    x = ctx.features(ctx.arg(0, "input"))
    ndim, k = ctx.ndim(), len(ctx.module.normalized_shape)
    if x is None:
        return None
    axis = x.dim - (ndim - k)
    if axis < 0:
        raise ctx.fail(
            f"normalized_shape={tuple(ctx.module.normalized_shape)} does not cover the unit dimension {x.dim} "
            f"of a {ndim}-d input"
        )
    ctx.attach(ctx.param("weight"), axis, "out", x)
    ctx.attach(ctx.param("bias"), axis, "out", x)
    return x


def _resize_groupnorm(m: nn.GroupNorm) -> None:
    if m.weight is None:
        return
    channels = m.weight.shape[0]
    if channels % m.num_groups:
        raise ValueError(f"GroupNorm with {m.num_groups} groups cannot have {channels} channels (not divisible)")
    m.num_channels = channels


@module_handler(nn.GroupNorm, resize=_resize_groupnorm)
def groupnorm(ctx):
    """Normalises contiguous blocks of channels: with 1 < groups < channels, units move only in blocks."""
    m = ctx.module
    x = ctx.features(ctx.arg(0, "input"))
    if x is None or x.dim != 1:
        raise ctx.fail("GroupNorm needs its channels on dimension 1 of a traced activation")
    if 1 < m.num_groups < m.num_channels:
        if len(x.segments) != 1 or x.segments[0].repeat != 1:
            raise ctx.fail("GroupNorm over concatenated channel blocks is not supported")
        ctx.sets.set_block(x.segments[0].axis_set, m.num_channels // m.num_groups, ctx.where)
    ctx.attach(ctx.param("weight"), 0, "out", x)
    ctx.attach(ctx.param("bias"), 0, "out", x)
    return x
