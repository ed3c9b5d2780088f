"""Handlers for normalisation layers: BatchNorm, LayerNorm, GroupNorm (per-unit parameters)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import function_handler, module_handler

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


def _attach_refs(ctx, refs, axis_of, x) -> None:
    from .trace import ParamRef

    for ref in refs:
        v = ctx.value(ref)
        if isinstance(v, ParamRef):
            ctx.attach(v.name, axis_of(v), "out", x)


@function_handler(F.batch_norm)
def batchnorm_function(ctx):
    """``F.batch_norm(x, running_mean, running_var, weight, bias, ...)`` with module tensors."""
    x = ctx.features(ctx.arg(0, "input"))
    if x is None or x.dim != 1:
        raise ctx.fail("batch_norm needs its channels on dimension 1 of a traced activation")
    refs = [ctx.arg(i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    _attach_refs(ctx, refs, lambda ref: 0, x)
    return x


@function_handler(F.layer_norm)
def layernorm_function(ctx):
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)``; the units must be normalised over."""
    x = ctx.features(ctx.arg(0, "input"))
    if x is None:
        return None
    k, ndim = len(ctx.arg(1, "normalized_shape")), ctx.ndim()
    axis = x.dim - (ndim - k)
    if axis < 0:
        raise ctx.fail(f"layer_norm over the last {k} dims does not cover the unit dimension {x.dim}")
    _attach_refs(ctx, [ctx.arg(2, "weight"), ctx.arg(3, "bias")], lambda ref: axis, x)
    return x
