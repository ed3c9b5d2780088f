"""Handlers for ops that move, pool, reshape, join, split or index dimensions without mixing units."""
from __future__ import annotations

import builtins
import math
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .units import Units
from .context import ParamRef
from .registry import function_handler, module_handler

aten = torch.ops.aten

_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)
_SPATIAL_ATEN = (
    aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d,
    aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten._adaptive_avg_pool2d,
    aten.upsample_nearest2d, aten.upsample_bilinear2d, aten.constant_pad_nd, aten.pad, aten.reflection_pad2d,
    aten.replication_pad2d,
)


def _channels(ctx, x: Units | None) -> Units | None:
    if x is not None and x.dims != (1,):
        raise ctx.fail(f"units are on dimensions {x.dims}; this op pools or pads the dimensions after dimension 1")
    return x


@module_handler(*_SPATIAL_MODULES)
@function_handler(
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.pad, *_SPATIAL_ATEN,
)
def spatial(ctx):
    """Pooling, resampling and padding act on the dimensions after the channels (dimension 1)."""
    return _channels(ctx, ctx.units(ctx.arg(0, "input")))


@function_handler(aten.max_pool2d_with_indices, aten.max_pool1d_with_indices, aten.max_pool3d_with_indices,
                  aten.adaptive_max_pool2d, aten.adaptive_max_pool1d)
def spatial_with_indices(ctx):
    """Max pooling that also returns the indices: (output, indices)."""
    return _channels(ctx, ctx.units(ctx.arg(0))), None


# ------------------------------------------------------------------------------------------ reshapes

def _param_reshaped(ref: ParamRef, shape: tuple) -> ParamRef:
    """A parameter reshaped by adding or dropping size-1 dimensions (other reshapes lose the axes)."""
    used = [i for i, n in enumerate(shape) if n != 1]
    kept = [i for i, n in enumerate(ref.shape) if n != 1]
    axes: list = [None] * len(shape)
    if [shape[i] for i in used] == [ref.shape[i] for i in kept]:
        for i, k in zip(used, kept):
            axes[i] = ref.axes[k]
    return ParamRef(ref.name, tuple(shape), tuple(axes))


def _constant_along(a: np.ndarray, d: int) -> bool:
    return bool((a == a.take([0], axis=d)).all())


def reshape_units(ctx, x: Units, shape_in: tuple, shape_out: tuple) -> Units:
    """The units of a reshaped tensor, read off the reshaped id array: dimensions whose entries merge
    into a unit dimension make copies of each unit (flatten after conv features); a unit dimension split
    in two carries the units on both."""
    full = np.broadcast_to(x.ids, shape_in).reshape(shape_out)
    dims = {d for d in range(len(shape_out)) if shape_out[d] > 1 and not _constant_along(full, d)}
    for d in x.dims:  # a unit dimension one unit wide does not vary: locate the output dimension that
        if shape_in[d] == 1:  # starts where it starts and holds it together with the dimensions after it
            before = math.prod(shape_in[:d])
            for j in range(len(shape_out)):
                if math.prod(shape_out[:j]) == before and any(
                        math.prod(shape_out[: j + 1]) == before * math.prod(shape_in[d:q])
                        for q in range(d + 1, len(shape_in) + 1)):
                    dims.add(j)
                    break
    if 0 in dims and shape_in[0] != shape_out[0]:
        raise ctx.fail(f"reshape {shape_in} -> {shape_out} mixes the batch dimension with units")
    compact = full[tuple(slice(None) if d in dims else slice(0, 1) for d in range(len(shape_out)))]
    return Units(np.ascontiguousarray(compact), tuple(sorted(dims)))


@module_handler(nn.Flatten, nn.Unflatten)
@function_handler(torch.flatten, torch.reshape, torch.unflatten, aten.view, aten.reshape, aten._unsafe_view,
                  aten.flatten, aten.unflatten, methods=("flatten", "view", "reshape", "unflatten"))
def reshape(ctx):
    """A reshape keeps, merges or splits the unit dimensions; which is read off the ids."""
    src = ctx.arg(0, "input")
    v = ctx.value(src)
    if isinstance(v, ParamRef):  # e.g. a layer scale reshaped to (1, C, 1, 1)
        return _param_reshaped(v, ctx.shape())
    if not isinstance(v, Units):
        return None
    out = reshape_units(ctx, v, ctx.shape(src), ctx.shape())
    if len(out.dims) > len(v.dims):  # the units split over several dimensions (heads, a channel shuffle): the
        ctx.tie(v)  # code splits the new widths the same way only if the groups keep their proportions
    return out


@function_handler(torch.unsqueeze, aten.unsqueeze, torch.squeeze, aten.squeeze, methods=("unsqueeze", "squeeze"))
def squeeze(ctx):
    """Inserting or dropping size-1 dimensions."""
    src = ctx.arg(0, "input")
    v = ctx.value(src)
    if isinstance(v, ParamRef):
        return _param_reshaped(v, ctx.shape())
    if not isinstance(v, Units):
        return None
    shape_in, shape_out = ctx.shape(src), ctx.shape()
    if any(shape_in[d] == 1 for d in v.dims) and len(shape_out) < len(shape_in):
        ctx.fix(v, "a one-unit dimension squeezed away")
        return None
    return reshape_units(ctx, v, shape_in, shape_out)


@function_handler(torch.permute, aten.permute, methods=("permute",))
def permute(ctx):
    v = ctx.value(ctx.arg(0, "input"))
    order = ctx.arg(1, "dims")
    if isinstance(order, int):
        order = ctx.args[1:]
    order = [d % len(order) for d in order]
    return _transposed(v, order)


@function_handler(torch.transpose, aten.transpose, aten.t, torch.t, methods=("transpose", "t"))
def transpose(ctx):
    v = ctx.value(ctx.arg(0, "input"))
    ndim = ctx.ndim()
    order = list(range(ndim))
    if ndim >= 2:
        a, b = (ctx.arg(1, "dim0", 0) % ndim, ctx.arg(2, "dim1", 1) % ndim) if len(ctx.args) > 1 else (0, 1)
        order[a], order[b] = order[b], order[a]
    return _transposed(v, order)


def _transposed(v, order: list[int]):
    if isinstance(v, ParamRef):
        return ParamRef(v.name, tuple(v.shape[d] for d in order), tuple(v.axes[d] for d in order))
    if not isinstance(v, Units):
        return None
    return Units(np.transpose(v.ids, order), tuple(order.index(d) for d in v.dims))


@function_handler(aten.expand, methods=("expand", "expand_as"))
def expand(ctx):
    """Broadcasting to a larger shape: a unit dimension expanded from size 1 makes copies."""
    v = ctx.value(ctx.arg(0, "input"))
    shape = ctx.shape()
    if isinstance(v, ParamRef):
        pad = len(shape) - len(v.shape)
        return ParamRef(v.name, tuple(shape), (None,) * pad + tuple(
            a if n != 1 or shape[pad + i] == 1 else None for i, (a, n) in enumerate(zip(v.axes, v.shape))))
    if not isinstance(v, Units):
        return None
    pad = len(shape) - v.ndim
    ids = v.ids.reshape((1,) * pad + v.ids.shape)
    dims = tuple(d + pad for d in v.dims)
    target = tuple(shape[d] if d in dims else 1 for d in range(len(shape)))
    return Units(np.ascontiguousarray(np.broadcast_to(ids, target)), dims)


# ------------------------------------------------------------------------------------------ joining

@function_handler(torch.cat, torch.concat, torch.concatenate, aten.cat, aten.concat)
def cat(ctx):
    """Concatenation along a unit dimension lays the operands' units side by side (an operand without
    units contributes fixed units); along any other dimension it ties the operands' units."""
    tensors = list(ctx.arg(0, "tensors"))
    ndim = ctx.ndim()
    dim = ctx.arg(1, "dim", 0) % ndim
    values = [ctx.value(t) for t in tensors]
    units = [v for v in values if isinstance(v, Units)]
    if not units:
        return None
    if any(dim in u.dims for u in units):
        carried = sorted({d for u in units for d in u.dims})
        pieces = []
        for t, v in zip(tensors, values):
            shape = ctx.shape(t)
            if isinstance(v, Units):
                target = tuple(shape[d] if d in carried else 1 for d in range(ndim))
                pieces.append(np.broadcast_to(v.ids, target))
            else:  # no units: its entries along the unit dimension are fixed units
                fresh = ctx.new(shape[dim], dim, fixed=True)
                target = tuple(shape[d] if d in carried else 1 for d in range(ndim))
                pieces.append(np.broadcast_to(fresh.ids, target))
        return Units(np.concatenate(pieces, axis=dim), tuple(carried))
    first = units[0]
    for t, v in zip(tensors, values):
        if isinstance(v, Units):
            ctx.unite(first, v)
        elif isinstance(v, ParamRef):  # a learned token prepended to the units' sequence (a class token)
            shape = ctx.shape(t)
            for d in first.dims:
                if shape[d] != 1:
                    ctx.attach(v, d, "out", first, d)
        else:
            shape = ctx.shape(t)
            if any(shape[d] != 1 for d in first.dims):
                ctx.fix(first, "concatenated with a tensor without units along another dimension")
    return first


# ------------------------------------------------------------------------------------------ splitting and indexing

def _slice(v: Units, dim: int, start: int, stop: int, step: int = 1) -> Units:
    index = [slice(None)] * v.ndim
    index[dim] = slice(start, stop, step)
    return Units(np.ascontiguousarray(v.ids[tuple(index)]), v.dims)


def _select(ctx, v: Units, dim: int, i: int) -> Units | None:
    """Entry ``i`` of dimension ``dim``: a unit dimension is indexed; if no unit dimension is left, the
    selected unit is read by position and so cannot move."""
    if dim not in v.dims:
        return Units(np.take(v.ids, [0], axis=dim).squeeze(dim), tuple(d - (d > dim) for d in v.dims))
    picked = np.take(v.ids, [i], axis=dim)
    rest = tuple(d - (d > dim) for d in v.dims if d != dim)
    if not rest:
        ctx.fix(Units(picked, v.dims), "one unit selected by its position")
        return None
    return Units(picked.squeeze(dim), rest)


def _split_sizes(size: int, spec) -> list[int]:
    if isinstance(spec, int):
        return [min(spec, size - i) for i in range(0, size, spec)]
    return list(spec)


@function_handler(torch.split, torch.chunk, torch.tensor_split, aten.split, aten.split_with_sizes, aten.chunk,
                  aten.unsafe_split, methods=("split", "chunk"))
def split(ctx):
    """Pieces of a tensor along one dimension. Split along a unit dimension, every piece keeps its units,
    and the groups involved keep their proportions (the pieces' sizes come from the code)."""
    src = ctx.arg(0, "input")
    v = ctx.value(src)
    shape = ctx.shape(src)
    dim = ctx.arg(2, "dim", 0) % len(shape)
    target = ctx.node.target
    name = getattr(target, "__name__", "") if not isinstance(target, str) else target
    if "chunk" in str(name) or "chunk" in str(target):
        n = ctx.arg(1, "chunks")
        step = math.ceil(shape[dim] / n)
        sizes = [min(step, shape[dim] - i) for i in range(0, shape[dim], step)]
    else:
        sizes = _split_sizes(shape[dim], ctx.arg(1, "split_size_or_sections"))
    if not isinstance(v, Units):
        return tuple(None for _ in sizes)
    if dim not in v.dims:
        return tuple(v for _ in sizes)
    ctx.tie(v)
    edges = np.cumsum([0] + sizes)
    return tuple(_slice(v, dim, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]))


@function_handler(torch.unbind, aten.unbind, methods=("unbind",))
def unbind(ctx):
    src = ctx.arg(0, "input")
    v = ctx.value(src)
    shape = ctx.shape(src)
    dim = ctx.arg(1, "dim", 0) % len(shape)
    if not isinstance(v, Units):
        return tuple(None for _ in range(shape[dim]))
    return tuple(_select(ctx, v, dim, i) for i in range(shape[dim]))


@function_handler(aten.slice)
def slice_op(ctx):
    """``aten.slice(x, dim, start, end, step)``."""
    v = ctx.value(ctx.arg(0))
    if not isinstance(v, Units):
        return None
    shape = ctx.shape(ctx.arg(0))
    dim = ctx.arg(1, default=0) % len(shape)
    start, end, step = ctx.arg(2, default=None), ctx.arg(3, default=None), ctx.arg(4, default=1)
    start, end, step = slice(start, end, step).indices(shape[dim])
    if dim not in v.dims or (start, end, step) == (0, shape[dim], 1):
        return v
    ctx.tie(v)
    return _slice(v, dim, start, end, step)


@function_handler(aten.select)
def select_op(ctx):
    """``aten.select(x, dim, index)``."""
    v = ctx.value(ctx.arg(0))
    if not isinstance(v, Units):
        return None
    shape = ctx.shape(ctx.arg(0))
    dim = ctx.arg(1) % len(shape)
    return _select(ctx, v, dim, ctx.arg(2) % shape[dim])


@function_handler(operator.getitem)
def getitem(ctx):
    """Indexing a tuple picks a value; indexing a tensor slices, selects or inserts dimensions."""
    v = ctx.value(ctx.arg(0))
    index = ctx.arg(1)
    if isinstance(v, tuple):
        return v[index]
    if not isinstance(v, Units):
        return None
    if not isinstance(index, tuple):
        index = (index,)
    shape = ctx.shape(ctx.arg(0))
    out, d = v, 0  # d: position in the current (partially indexed) tensor
    for i, item in enumerate(index):
        if item is Ellipsis:
            rest = sum(1 for it in index[i + 1 :] if it is not None)
            d = out.ndim - rest
        elif item is None:
            out = Units(np.expand_dims(out.ids, d), tuple(x + (x >= d) for x in out.dims))
            d += 1
        elif isinstance(item, slice):
            start, stop, step = item.indices(shape[len(shape) - (out.ndim - d)] if out.ndim else 0)
            if d in out.dims and item != slice(None):
                ctx.tie(out)
                out = _slice(out, d, start, stop, step)
            d += 1
        elif isinstance(item, int):
            size = out.ids.shape[d] if d in out.dims else 1
            out = _select(ctx, out, d, item % max(size, 1))
            if out is None:
                return None
        else:
            raise ctx.fail(f"advanced indexing with {type(item).__name__}; not supported")
    return out


# ------------------------------------------------------------------------------------------ reductions

@function_handler(torch.mean, torch.sum, torch.amax, torch.amin, aten.mean, aten.sum, aten.amax, aten.amin,
                  methods=("mean", "sum", "amax", "amin"))
def reduce(ctx):
    """Reductions over dimensions other than the units keep them; over the units, the result is a
    symmetric function of all of them and carries none."""
    src = ctx.arg(0, "input")
    x = ctx.units(src)
    if x is None:
        return None
    ndim = ctx.ndim(src)
    dims = ctx.arg(1, "dim")
    if dims is None:
        return None
    dims = {d % ndim for d in ((dims,) if isinstance(dims, int) else dims)}
    if set(x.dims) & dims:
        if set(x.dims) - dims:
            ctx.fix(x, "reduced over some of their dimensions")
        return None
    keep = ctx.arg(2, "keepdim", False)
    if keep:
        return x
    kept = [d for d in range(ndim) if d not in dims]
    return Units(x.ids.reshape([x.ids.shape[d] for d in kept]), tuple(kept.index(d) for d in x.dims))


@function_handler(builtins.getattr, aten.sym_size, aten._assert_tensor_metadata, aten.sym_numel,
                  methods=("size", "dim", "numel"))
def metadata(ctx):
    """Shape, size and dtype queries return values without units."""
    if ctx.node.target is builtins.getattr and ctx.arg(1) not in ("shape", "dtype", "device", "ndim"):
        raise ctx.fail(f"reads attribute {ctx.arg(1)!r} of a tensor")
    return None
