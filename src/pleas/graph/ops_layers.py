"""Handlers for layers that mix units: Linear, Conv1d/2d/3d (dense and depthwise), Embedding."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import function_handler, module_handler


def _last_dim(ctx) -> int:
    return ctx.ndim() - 1


def _resize_linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


@module_handler(nn.Linear, resize=_resize_linear)
def linear(ctx):
    """y = x W^T + b over the last dimension. W: (out, in); the output's units are new."""
    return _linear(ctx, ctx.param("weight"), ctx.param("bias"), ctx.module.out_features)


@function_handler(F.linear)
def linear_function(ctx):
    """``F.linear(x, weight, bias)`` with module tensors (timm's Linear subclasses)."""
    from .trace import ParamRef

    weight, bias = ctx.value(ctx.arg(1, "weight")), ctx.value(ctx.arg(2, "bias"))
    if not isinstance(weight, ParamRef):
        raise ctx.fail("F.linear with a computed weight; only module parameters are supported")
    bias_name = bias.name if isinstance(bias, ParamRef) else None
    return _linear(ctx, weight.name, bias_name, weight.shape[0])


def _linear(ctx, weight: str | None, bias: str | None, out_features: int):
    x = ctx.features(ctx.arg(0, "input"))
    last = _last_dim(ctx)
    if x is not None and x.dim != last and not _all_fixed(ctx, x):
        # The layer mixes a non-unit dimension (token mixing): the units pass through untouched.
        return x
    if x is not None and x.dim == last:
        ctx.attach(weight, 1, "in", x)
        ctx.read_site(ctx.arg(0, "input"), x)
    out = ctx.new(out_features, last)
    ctx.attach(weight, 0, "out", out)
    ctx.attach(bias, 0, "out", out)
    return out


def _all_fixed(ctx, f) -> bool:
    return all(ctx.sets.is_fixed(s.axis_set) for s in f.segments)


def _is_depthwise(m: nn.Module) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _resize_conv(m: nn.Module) -> None:
    if _is_depthwise(m):
        m.in_channels = m.out_channels = m.groups = m.weight.shape[0]
    else:
        m.out_channels = m.weight.shape[0]
        m.in_channels = m.weight.shape[1] * m.groups


@module_handler(nn.Conv1d, nn.Conv2d, nn.Conv3d, resize=_resize_conv)
def conv(ctx):
    """Convolution over channel dimension 1. W: (out, in/groups, *kernel)."""
    m = ctx.module
    x = ctx.features(ctx.arg(0, "input"))
    if x is not None and x.dim != 1:
        raise ctx.fail(f"input units are on dimension {x.dim}, a convolution reads channels on dimension 1")
    if _is_depthwise(m):
        # Each output channel reads only its own input channel: units pass through.
        if x is None:
            raise ctx.fail("depthwise convolution on an input without a channel dimension")
        ctx.attach(ctx.param("weight"), 0, "out", x)
        ctx.attach(ctx.param("bias"), 0, "out", x)
        return x
    if m.groups != 1:
        raise ctx.fail(
            f"grouped convolution with groups={m.groups} (in={m.in_channels}, out={m.out_channels}) is not "
            "supported; supported: groups=1 and depthwise (groups == in_channels == out_channels)"
        )
    if x is not None:
        ctx.attach(ctx.param("weight"), 1, "in", x)
        ctx.read_site(ctx.arg(0, "input"), x)
    out = ctx.new(m.out_channels, 1)
    ctx.attach(ctx.param("weight"), 0, "out", out)
    ctx.attach(ctx.param("bias"), 0, "out", out)
    return out


def _resize_embedding(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@module_handler(nn.Embedding, resize=_resize_embedding)
def embedding(ctx):
    """Token ids -> vectors; the embedding dimension is a new set of units on the last dimension."""
    out = ctx.new(ctx.module.embedding_dim, ctx.ndim() - 1)
    ctx.attach(ctx.param("weight"), 1, "out", out)
    return out
