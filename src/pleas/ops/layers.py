"""Handlers for ops that mix units: Linear (and its functional and ATen forms, Hugging Face ``Conv1D``),
convolutions (dense, depthwise, grouped) and embeddings."""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .context import ParamRef
from .linear_maps import ConvMap, LinearMap
from .registry import function_handler, module_handler

aten = torch.ops.aten


def _per_sample(ctx, weight: ParamRef, units: int) -> int:
    """Output positions per sample of an op producing ``units`` units (its FLOPs factor)."""
    shape = ctx.shape()
    return max(math.prod(shape) // (ctx.batch * units), 1) if shape else 1


# ------------------------------------------------------------------------------------------ dense maps

def _resize_linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def dense(ctx, x_arg, weight: ParamRef, bias: ParamRef | None, *, transposed: bool = False):
    """y = x W^T + b over the last dimension (W stored (out, in), or (in, out) when ``transposed``)."""
    if not isinstance(weight, ParamRef):
        raise ctx.fail("a linear map with a computed weight; only parameters are supported as weights")
    x = ctx.units(x_arg)
    last = ctx.ndim() - 1
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    out_features = weight.shape[out_axis]
    if x is not None and last not in x.dims:
        return x  # the map mixes a dimension without units (tokens): the units pass through untouched
    if x is not None:
        if x.dims != (last,):
            raise ctx.fail(f"input units on dimensions {x.dims}; a linear map reads them on its last dimension only")
        ctx.attach(weight, in_axis, "in", x)
        ctx.read_site(x_arg, x)
    out = ctx.new(out_features, last)
    ctx.attach(weight, out_axis, "out", out)
    ctx.attach(bias, 0, "out", out)
    ctx.cost(weight.name, _per_sample(ctx, weight, out_features))
    ctx.linear_map(LinearMap(ctx.owner or ctx.node.name, weight.name, bias.name if bias else None, x_arg.name,
                             ctx.node.name, transposed=transposed))
    return out


@module_handler(nn.Linear, resize=_resize_linear)
def linear(ctx):
    return dense(ctx, ctx.arg(0, "input"), ctx.param("weight"), ctx.param("bias"))


@function_handler(F.linear, aten.linear)
def linear_function(ctx):
    """``F.linear(x, weight, bias)`` / ``aten.linear`` with parameter tensors."""
    bias = ctx.value(ctx.arg(2, "bias"))
    return dense(ctx, ctx.arg(0, "input"), ctx.value(ctx.arg(1, "weight")), bias if isinstance(bias, ParamRef) else None)


@function_handler(aten.addmm)
def addmm(ctx):
    """``addmm(bias, x, W)`` = x W + b: a linear map whose weight is stored (in, out) (Hugging Face
    ``Conv1D``), when W is a parameter."""
    bias, x, weight = ctx.arg(0), ctx.arg(1), ctx.value(ctx.arg(2))
    if isinstance(weight, ParamRef):
        b = ctx.value(bias)
        return dense(ctx, x, weight, b if isinstance(b, ParamRef) else None, transposed=True)
    return products(ctx, [x, ctx.arg(2)])


@function_handler(torch.matmul, torch.mm, torch.bmm, aten.mm, aten.bmm, aten.matmul, operator.matmul,
                  methods=("matmul", "mm", "bmm"))
def matmul(ctx):
    """x @ W with a parameter W stored (in, out) is a linear map; a product of two activations (attention
    scores, attention-weighted values) is not: the units it multiplies are fixed."""
    a, b = ctx.arg(0), ctx.arg(1)
    if isinstance(ctx.value(b), ParamRef) and ctx.ndim(b) == 2:
        return dense(ctx, a, ctx.value(b), None, transposed=True)
    ua, ub = ctx.units(a), ctx.units(b)
    if ua is None and ub is None:
        return None
    if ctx.ndim(a) >= 3 and ctx.ndim(b) >= 3 and ua is not None and ub is not None:
        return batched_product(ctx, ua, ub)
    return products(ctx, [a, b])


def batched_product(ctx, a, b):
    """a (..., M, K) @ b (..., K, N) of two activations with units, as attention writes it: q @ k^T (units
    on the heads and on K, the head dimensions) and weights @ v (units on the heads and on N). The product
    is a symmetry of a permutation of whole heads (see :mod:`pleas.ops.attention`): each head becomes one
    unit, carried by the output along the head dimension (and along N, for v's)."""
    from .attention import head_units
    from .units import Units

    ndim = ctx.ndim()
    a = Units(a.ids.reshape((1,) * (ndim - a.ndim) + a.ids.shape), tuple(d + ndim - a.ndim for d in a.dims))
    b = Units(b.ids.reshape((1,) * (ndim - b.ndim) + b.ids.shape), tuple(d + ndim - b.ndim for d in b.dims))
    m, n = ndim - 2, ndim - 1
    if n in a.dims and m in b.dims:  # scores = q @ k^T: contracted over the head dimensions
        head_units(ctx, a, Units(np.swapaxes(b.ids, m, n), tuple({m: n, n: m}.get(d, d) for d in b.dims)), None)
        ids = a.ids[..., :1, :1]  # one unit per head, carried along the head dimension
        return Units(np.ascontiguousarray(ids), tuple(d for d in a.dims if d < m))
    if n not in a.dims and m not in a.dims and m not in b.dims:  # weights @ v: heads tied, v's units carried
        ctx.table.union(b.ids, a.ids)  # broadcast: head h of v joins head h of the weights
        ctx.table.union(b.ids, b.ids[..., :1])
        return b
    raise ctx.fail("a product of two activations that is not attention-shaped; only q @ k^T and weights @ v are "
                   "supported")


def products(ctx, args: list):
    """A product of activations that contracts or mixes entries (no permutation of their units is known
    to be a symmetry of it): its operands' units are fixed and its output carries none."""
    for a in args:
        v = ctx.value(a)
        if v is not None and not isinstance(v, ParamRef):
            ctx.fix(v, "read by a product of activations, such as attention")
    return None


# ------------------------------------------------------------------------------------------ convolutions

def _is_depthwise(groups: int, c_in: int, c_out: int) -> bool:
    return groups > 1 and groups == c_in == c_out


def _resize_conv(m: nn.Module) -> None:
    if m.groups > 1 and m.groups == m.in_channels == m.out_channels:
        m.in_channels = m.out_channels = m.groups = m.weight.shape[0]
    else:
        m.out_channels = m.weight.shape[0]
        m.in_channels = m.weight.shape[1] * m.groups


def _pair(v, dims: int) -> tuple[int, int]:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
    return (1, *v) if dims == 1 else tuple(v)


def convolution(ctx, x_arg, weight: ParamRef, bias: ParamRef | None, *, stride, padding, dilation, groups: int,
                zero_padding: bool = True):
    """A convolution over channel dimension 1. W: (out, in/groups, *kernel)."""
    if not isinstance(weight, ParamRef):
        raise ctx.fail("a convolution with a computed weight; only parameters are supported as weights")
    x = ctx.units(x_arg)
    c_out, per_group = weight.shape[0], weight.shape[1]
    c_in = per_group * groups
    spatial = len(weight.shape) - 2
    if x is not None and x.dims != (1,):
        raise ctx.fail(f"input units are on dimensions {x.dims}, a convolution reads channels on dimension 1")
    ctx.cost(weight.name, _per_sample(ctx, weight, c_out))
    if _is_depthwise(groups, c_in, c_out):
        # Each output channel reads only its own input channel: the units pass through.
        if x is None:
            raise ctx.fail("depthwise convolution of an input without channel units")
        ctx.attach(weight, 0, "out", x)
        ctx.attach(bias, 0, "out", x)
        return x
    out = ctx.new(c_out, 1)
    if groups > 1:
        if x is None or c_out % groups:
            raise ctx.fail(f"grouped convolution (groups={groups}) of an input without channel units")
        # Units move only inside their convolution group, and every group keeps one width; the weight is
        # read as the block-diagonal dense weight it stands for (pleas.rewrite.views).
        ctx.tag(x, (np.arange(c_in) // per_group).reshape(x.ids.shape))
        ctx.tag(out, (np.arange(c_out) // (c_out // groups)).reshape(out.ids.shape))
        ctx.tie(x)
        ctx.tie(out)
        ctx.view(weight.name, "blockdiag", groups)
    if x is not None:
        ctx.attach(weight, 1, "in", x)
        ctx.read_site(x_arg, x)
    ctx.attach(weight, 0, "out", out)
    ctx.attach(bias, 0, "out", out)
    if groups == 1 and zero_padding and spatial in (1, 2):
        ctx.linear_map(ConvMap(ctx.owner or ctx.node.name, weight.name, bias.name if bias else None, x_arg.name,
                               ctx.node.name, kernel=_pair(weight.shape[2:], spatial), stride=_pair(stride, spatial),
                               padding=_pair(padding, spatial), dilation=_pair(dilation, spatial)))
    return out


@module_handler(nn.Conv1d, nn.Conv2d, nn.Conv3d, resize=_resize_conv)
def conv(ctx):
    m = ctx.module
    explicit = isinstance(m.padding, tuple)  # "same"/"valid" padding: the refit's patches need numbers
    return convolution(ctx, ctx.arg(0, "input"), ctx.param("weight"), ctx.param("bias"), stride=m.stride,
                       padding=m.padding if explicit else 0, dilation=m.dilation, groups=m.groups,
                       zero_padding=explicit and m.padding_mode == "zeros")


@function_handler(F.conv1d, F.conv2d, F.conv3d, aten.conv1d, aten.conv2d, aten.conv3d)
def conv_function(ctx):
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` and its ATen forms."""
    bias = ctx.value(ctx.arg(2, "bias"))
    padding = ctx.arg(4, "padding", 0)
    return convolution(ctx, ctx.arg(0, "input"), ctx.value(ctx.arg(1, "weight")),
                       bias if isinstance(bias, ParamRef) else None, stride=ctx.arg(3, "stride", 1),
                       padding=padding, dilation=ctx.arg(5, "dilation", 1), groups=ctx.arg(6, "groups", 1),
                       zero_padding=not isinstance(padding, str))


@function_handler(aten.convolution)
def convolution_op(ctx):
    """``aten.convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)``."""
    if ctx.arg(6):
        raise ctx.fail("transposed convolution is not supported")
    bias = ctx.value(ctx.arg(2))
    return convolution(ctx, ctx.arg(0), ctx.value(ctx.arg(1)), bias if isinstance(bias, ParamRef) else None,
                       stride=ctx.arg(3), padding=ctx.arg(4), dilation=ctx.arg(5), groups=ctx.arg(8))


# ------------------------------------------------------------------------------------------ embeddings

def _resize_embedding(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def embedding_table(ctx, weight: ParamRef):
    """Token ids -> rows of ``weight`` (num, dim): the embedding dimension is a new set of units."""
    if not isinstance(weight, ParamRef):
        raise ctx.fail("an embedding of a computed table; only parameters are supported")
    out = ctx.new(weight.shape[1], ctx.ndim() - 1)
    ctx.attach(weight, 1, "out", out)
    return out


@module_handler(nn.Embedding, resize=_resize_embedding)
def embedding(ctx):
    return embedding_table(ctx, ctx.param("weight"))


@function_handler(F.embedding)
def embedding_function(ctx):
    return embedding_table(ctx, ctx.value(ctx.arg(1, "weight")))


@function_handler(aten.embedding)
def embedding_op(ctx):
    """``aten.embedding(weight, ids)``."""
    return embedding_table(ctx, ctx.value(ctx.arg(0)))
