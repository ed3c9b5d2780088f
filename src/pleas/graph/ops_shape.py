"""Handlers for ops that move, pool, reshape, join or index dimensions without mixing units."""
from __future__ import annotations

import builtins
import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from .axes import Features, Segment
from .registry import function_handler, module_handler

_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)


@module_handler(*_SPATIAL_MODULES)
@function_handler(
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.pad,
)
def spatial(ctx):
    """Pooling, resampling and padding act on the dimensions after the channels (dimension 1)."""
    x = ctx.features(ctx.arg(0, "input"))
    if x is not None and x.dim != 1:
        raise ctx.fail(f"units are on dimension {x.dim}; this op pools or pads the dimensions after dimension 1")
    return x


@module_handler(nn.Flatten, nn.Unflatten)
@function_handler(torch.flatten, torch.reshape, torch.unflatten, methods=("flatten", "view", "reshape", "unflatten"))
def reshape(ctx):
    """A reshape keeps, merges or splits the unit dimension; which one is read off the shapes."""
    from .trace import ParamRef

    src = ctx.arg(0, "input")
    v = ctx.value(src)
    if isinstance(v, ParamRef):  # e.g. a layer scale reshaped to (1, C, 1, 1)
        return ParamRef(v.name, ctx.shape(), v.stored if v.stored is not None else v.shape)
    if not isinstance(v, Features):
        return None
    return _reshape(ctx, v, ctx.shape(src), ctx.shape())


def _reshape(ctx, x: Features, shape_in: tuple, shape_out: tuple) -> Features:
    prefix = math.prod(shape_in[: x.dim])
    size = shape_in[x.dim]
    # Candidate output dimensions whose preceding dimensions hold exactly the same entries; size-1
    # dimensions make several candidates, and the first that fits one of the rules wins.
    candidates = [j for j in range(len(shape_out)) if math.prod(shape_out[:j]) == prefix]
    for j in candidates:
        # Merge the unit dimension with the dimensions right after it (flatten after conv features).
        for q in range(x.dim + 1, len(shape_in) + 1):
            factor = math.prod(shape_in[x.dim + 1 : q])
            if shape_out[j] == size * factor:
                return Features(j, x.segments).repeated(factor)
        # Split it back (unflatten): only whole repeats may move to the following dimensions.
        for q in range(j + 1, len(shape_out) + 1):
            factor = math.prod(shape_out[j + 1 : q])
            if shape_out[j] * factor == size and all(s.repeat % factor == 0 for s in x.segments):
                return Features(j, tuple(Segment(s.axis_set, s.width, s.repeat // factor) for s in x.segments))
    if not candidates:
        raise ctx.fail(
            f"reshape {shape_in} -> {shape_out} merges the unit dimension {x.dim} with the dimensions before it"
        )
    raise ctx.fail(
        f"reshape {shape_in} -> {shape_out} splits the unit dimension {x.dim} (e.g. into attention heads); "
        "register a handler for the enclosing module"
    )


@function_handler(torch.cat, torch.concat, torch.concatenate)
def cat(ctx):
    """Concatenation along the unit dimension lays segments side by side; along any other, it ties units."""
    tensors = ctx.arg(0, "tensors")
    ndim = ctx.ndim()
    dim = ctx.arg(1, "dim", 0)
    dim = dim % ndim
    values = [ctx.features(t) for t in tensors]
    dims = {v.dim for v in values if v is not None}
    if len(dims) > 1:
        raise ctx.fail(f"concatenated tensors carry units on different dimensions {sorted(dims)}")
    if not dims:
        return None
    unit_dim = dims.pop()
    if dim != unit_dim:
        first = next(v for v in values if v is not None)
        for v in values:
            if v is None:
                raise ctx.fail("concatenates a tensor without units to one with units along another dimension")
            ctx.unite(first, v)
        return first
    segments: list[Segment] = []
    for t, v in zip(tensors, values):
        if v is None:  # a tensor without units (e.g. the network input): its channels are fixed
            v = ctx.new(ctx.shape(t)[dim], dim, fixed=True)
        segments.extend(v.segments)
    return Features(unit_dim, tuple(segments))


@function_handler(torch.mean, torch.sum, torch.amax, torch.amin, methods=("mean", "sum", "amax", "amin"))
def reduce(ctx):
    """Reductions over dimensions other than the units keep them (shifting the unit dimension)."""
    src = ctx.arg(0, "input")
    x = ctx.features(src)
    if x is None:
        return None
    ndim = ctx.ndim(src)
    dims = ctx.arg(1, "dim")
    if dims is None:
        return None
    dims = {d % ndim for d in ((dims,) if isinstance(dims, int) else dims)}
    if x.dim in dims:
        return None  # a symmetric function of all units carries no units
    keep = ctx.arg(2, "keepdim", False)
    return x if keep else x.with_dim(x.dim - sum(d < x.dim for d in dims))


@function_handler(torch.permute, methods=("permute",))
def permute(ctx):
    x = ctx.features(ctx.arg(0, "input"))
    if x is None:
        return None
    order = ctx.arg(1, "dims")
    if isinstance(order, int):
        order = ctx.args[1:]
    order = [d % len(order) for d in order]
    return x.with_dim(order.index(x.dim))


@function_handler(torch.transpose, methods=("transpose",))
def transpose(ctx):
    x = ctx.features(ctx.arg(0, "input"))
    if x is None:
        return None
    ndim = ctx.ndim()
    a, b = ctx.arg(1, "dim0") % ndim, ctx.arg(2, "dim1") % ndim
    return x.with_dim(b if x.dim == a else a if x.dim == b else x.dim)


@function_handler(operator.getitem)
def getitem(ctx):
    """Indexing a tuple picks a value; indexing a tensor may drop or insert dimensions, never units."""
    v = ctx.value(ctx.arg(0))
    index = ctx.arg(1)
    if isinstance(v, tuple):
        return v[index]
    if not isinstance(v, Features):
        return None
    if not isinstance(index, tuple):
        index = (index,)
    ndim_in = ctx.ndim(ctx.arg(0))
    dim_in, dim_out = 0, 0
    for i, item in enumerate(index):
        if item is Ellipsis:
            rest = sum(1 for it in index[i + 1 :] if it is not None)
            skip = ndim_in - dim_in - rest
            if dim_in <= v.dim < dim_in + skip:
                return v.with_dim(dim_out + v.dim - dim_in)
            dim_in += skip
            dim_out += skip
        elif item is None:
            dim_out += 1
        elif isinstance(item, slice):
            if dim_in == v.dim:
                if item != slice(None, None, None):
                    raise ctx.fail("slicing the unit dimension selects some units; not supported")
                return v.with_dim(dim_out)
            dim_in += 1
            dim_out += 1
        elif isinstance(item, int):
            if dim_in == v.dim:
                raise ctx.fail("indexing the unit dimension selects one unit; not supported")
            dim_in += 1
        else:
            raise ctx.fail(f"advanced indexing with {type(item).__name__}; not supported")
    return v.with_dim(dim_out + v.dim - dim_in)


@function_handler(builtins.getattr, methods=("size", "dim", "numel"))
def metadata(ctx):
    """Shape, size and dtype queries return values without units."""
    if ctx.node.target is builtins.getattr and ctx.arg(1) not in ("shape", "dtype", "device", "ndim"):
        raise ctx.fail(f"reads attribute {ctx.arg(1)!r} of a tensor")
    return None
