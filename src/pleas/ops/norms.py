"""Handlers for normalisation layers: BatchNorm (with running statistics), LayerNorm, GroupNorm, RMSNorm."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .context import ParamRef
from .linear_maps import NormStats
from .registry import function_handler, module_handler, register_resizer

aten = torch.ops.aten


def _attach_all(ctx, refs, dim: int, units) -> None:
    for ref in refs:
        if isinstance(ref, ParamRef):
            ctx.attach(ref, dim, "out", units)


def batch_norm(ctx, x_arg, weight, bias, mean, var, eps: float = 1e-5):
    """Per-channel affine and statistics on dimension 1: every tensor follows the units, and the running
    statistics are recomputed after a merge."""
    x = ctx.units(x_arg)
    if x is None or x.dims != (1,):
        raise ctx.fail("BatchNorm needs its channels on dimension 1 of an activation with units")
    _attach_all(ctx, (weight, bias, mean, var), 0, x)
    if isinstance(mean, ParamRef) and isinstance(var, ParamRef):
        ctx.norm_statistics(NormStats(ctx.owner or ctx.node.name, x_arg.name, ctx.node.name, mean.name, var.name,
                                      weight.name if isinstance(weight, ParamRef) else None,
                                      bias.name if isinstance(bias, ParamRef) else None, float(eps)))
    return x


def _resize_batchnorm(m: nn.modules.batchnorm._BatchNorm) -> None:
    t = m.weight if m.weight is not None else m.running_mean
    if t is not None:
        m.num_features = t.shape[0]


@module_handler(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, resize=_resize_batchnorm)
def batchnorm(ctx):
    return batch_norm(ctx, ctx.arg(0, "input"), ctx.param("weight"), ctx.param("bias"),
                      ctx.param("running_mean") if ctx.module.track_running_stats else None,
                      ctx.param("running_var") if ctx.module.track_running_stats else None, ctx.module.eps)


@function_handler(F.batch_norm)
def batchnorm_function(ctx):
    """``F.batch_norm(x, running_mean, running_var, weight, bias, ...)``."""
    v = [ctx.value(ctx.arg(i, n)) for i, n in ((3, "weight"), (4, "bias"), (1, "running_mean"), (2, "running_var"))]
    return batch_norm(ctx, ctx.arg(0, "input"), *v, ctx.arg(7, "eps", 1e-5))


@function_handler(aten.batch_norm)
def batchnorm_op(ctx):
    """``aten.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)``."""
    return batch_norm(ctx, ctx.arg(0), *[ctx.value(ctx.arg(i)) for i in (1, 2, 3, 4)], ctx.arg(7, default=1e-5))


@function_handler(aten._native_batch_norm_legit_no_training)
def batchnorm_legit(ctx):
    """``aten._native_batch_norm_legit_no_training(x, weight, bias, mean, var, momentum, eps)``: a tuple
    whose first value is the output."""
    return (batch_norm(ctx, ctx.arg(0), *[ctx.value(ctx.arg(i)) for i in (1, 2, 3, 4)], ctx.arg(6, default=1e-5)),
            None, None)


def _resize_layernorm(m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def layer_norm(ctx, x_arg, normalized: int, weight, bias):
    """Normalises over the trailing ``normalized`` dimensions, which must hold the units (if any)."""
    x = ctx.units(x_arg)
    if x is None:
        return None
    ndim = ctx.ndim(x_arg)
    if any(d < ndim - normalized for d in x.dims):
        raise ctx.fail(f"normalises the last {normalized} dimensions but the units are on dimensions {x.dims}")
    for ref in (weight, bias):
        if isinstance(ref, ParamRef):
            ctx.attach(ref, x.dim - (ndim - normalized), "out", x)
    return x


@module_handler(nn.LayerNorm, resize=_resize_layernorm)
def layernorm(ctx):
    return layer_norm(ctx, ctx.arg(0, "input"), len(ctx.module.normalized_shape), ctx.param("weight"),
                      ctx.param("bias"))


@function_handler(F.layer_norm, aten.layer_norm)
def layernorm_function(ctx):
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)`` and ``aten.layer_norm``."""
    return layer_norm(ctx, ctx.arg(0, "input"), len(ctx.arg(1, "normalized_shape")),
                      ctx.value(ctx.arg(2, "weight")), ctx.value(ctx.arg(3, "bias")))


def _resize_rmsnorm(m: nn.Module) -> None:
    if getattr(m, "weight", None) is not None:
        if hasattr(m, "normalized_shape"):
            m.normalized_shape = tuple(m.weight.shape)
        if hasattr(m, "hidden_size"):
            m.hidden_size = m.weight.shape[0]


@module_handler(nn.RMSNorm, resize=_resize_rmsnorm)
def rmsnorm(ctx):
    return layer_norm(ctx, ctx.arg(0, "input"), len(ctx.module.normalized_shape), ctx.param("weight"), None)


@function_handler(F.rms_norm, aten.rms_norm)
def rmsnorm_function(ctx):
    """``F.rms_norm(x, normalized_shape, weight, eps)``."""
    return layer_norm(ctx, ctx.arg(0, "input"), len(ctx.arg(1, "normalized_shape")), ctx.value(ctx.arg(2, "weight")),
                      None)


def _resize_groupnorm(m: nn.GroupNorm) -> None:
    if m.weight is None:
        return
    channels = m.weight.shape[0]
    if channels % m.num_groups:
        raise ValueError(f"GroupNorm with {m.num_groups} groups cannot have {channels} channels (not divisible)")
    m.num_channels = channels


def group_norm(ctx, x_arg, groups: int, weight, bias):
    """Normalises blocks of channels: units move only inside their block, and blocks keep one width."""
    x = ctx.units(x_arg)
    if x is None or x.dims != (1,):
        raise ctx.fail("GroupNorm needs its channels on dimension 1 of an activation with units")
    channels = x.ids.shape[1]
    if 1 < groups:
        ctx.tag(x, (np.arange(channels) // (channels // groups)).reshape(x.ids.shape))
        ctx.tie(x)
    _attach_all(ctx, (weight, bias), 0, x)
    return x


@module_handler(nn.GroupNorm, resize=_resize_groupnorm)
def groupnorm(ctx):
    return group_norm(ctx, ctx.arg(0, "input"), ctx.module.num_groups, ctx.param("weight"), ctx.param("bias"))


@function_handler(F.group_norm, aten.group_norm)
def groupnorm_function(ctx):
    """``F.group_norm(x, num_groups, weight, bias, eps)`` and ``aten.group_norm``."""
    return group_norm(ctx, ctx.arg(0, "input"), ctx.arg(1, "num_groups"), ctx.value(ctx.arg(2, "weight")),
                      ctx.value(ctx.arg(3, "bias")))


def _register_optional() -> None:
    """Resizers of normalisation modules of optional packages that torch.export inlines."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return
    register_resizer(LlamaRMSNorm, _resize_rmsnorm)


_register_optional()
