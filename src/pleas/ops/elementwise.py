"""Handlers for ops that act on each entry separately: activations, dropout, casts and arithmetic."""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .units import Units
from .context import ParamRef
from .registry import function_handler, module_handler

aten = torch.ops.aten


def _resize_prelu(m: nn.PReLU) -> None:
    m.num_parameters = m.weight.shape[0]


_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_UNARY_ATEN = (
    aten.relu, aten.relu_, aten.gelu, aten.silu, aten.silu_, aten.sigmoid, aten.tanh, aten.elu, aten.leaky_relu,
    aten.hardswish, aten.hardsigmoid, aten.hardtanh, aten.hardtanh_, aten.mish, aten.softplus, aten.dropout,
    aten.clamp, aten.clamp_min, aten.clamp_max, aten.abs, aten.exp, aten.neg, aten.sqrt, aten.rsqrt, aten.pow,
    aten.erf, aten.clone, aten.contiguous, aten.detach, aten.alias, aten.to, aten._to_copy, aten.type_as,
    aten.lift_fresh_copy, aten.relu6, aten.square, aten.log, aten.sin, aten.cos, aten.reciprocal,
)


@module_handler(*_UNARY_MODULES)
@function_handler(
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.elu, F.selu, F.leaky_relu, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.mish, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.sigmoid, F.tanh,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clip, torch.abs, torch.exp,
    torch.square, torch.sqrt, torch.rsqrt, operator.neg, torch.erf, torch.neg, *_UNARY_ATEN,
    methods=(
        "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "abs", "exp",
        "neg", "square", "sqrt", "rsqrt", "erf", "contiguous", "clone", "detach", "float", "double",
        "half", "to", "type_as",
    ),
)
def unary(ctx):
    """y_i = f(x_i): the output carries the input's units unchanged."""
    return ctx.value(ctx.arg(0, "input"))


@function_handler(operator.pow, torch.pow, methods=("pow",))
def power(ctx):
    """x ** p (or p ** x): elementwise when the other operand has no units along them."""
    return binary(ctx)


@module_handler(nn.PReLU, resize=_resize_prelu)
def prelu(ctx):
    x = ctx.units(ctx.arg(0, "input"))
    if ctx.module.num_parameters > 1:
        if x is None or x.dims != (1,):
            raise ctx.fail("PReLU with per-channel slopes needs channels on dimension 1")
        ctx.attach(ctx.param("weight"), 0, "out", x)
    return x


@module_handler(nn.Softmax, nn.LogSoftmax)
@function_handler(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, aten.softmax, aten._softmax,
                  aten.log_softmax, aten._log_softmax, methods=("softmax", "log_softmax"))
def softmax(ctx):
    """Softmax is permutation-equivariant along any dimension, the unit dimension included."""
    return ctx.value(ctx.arg(0, "input"))


@function_handler(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
    aten.add, aten.add_, aten.sub, aten.mul, aten.mul_, aten.div, aten.maximum, aten.minimum, aten.rsub,
    methods=("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"),
)
def binary(ctx):
    """Broadcasting elementwise arithmetic. Operands that carry units are tied entry by entry (a residual
    add ties both branches into one group); a parameter that varies along the units (a layer scale, a
    learned bias) becomes a member; a computed tensor without units that varies along them (a position
    encoding) pins each unit to its position there; scalars pass."""
    out_shape = ctx.shape()
    if out_shape is None:
        return None  # arithmetic on sizes
    ndim = len(out_shape)
    operands = [ctx.arg(0, "input"), ctx.arg(1, "other")]
    units: list[Units] = []
    params: list[ParamRef] = []
    plain = []
    for a in operands:
        v = ctx.value(a)
        if isinstance(v, Units):
            shift = ndim - v.ndim
            units.append(Units(v.ids.reshape((1,) * shift + v.ids.shape), tuple(d + shift for d in v.dims)))
        elif isinstance(v, ParamRef):
            params.append(v)
        elif ctx.shape(a) is not None:
            plain.append(a)
    if not units:
        return None
    units.sort(key=lambda u: -u.ids.size)  # the operand that varies most carries the result's layout
    result = units[0]
    for other in units[1:]:
        if any(other.ids.shape[d] == 1 and out_shape[d] != 1 for d in other.dims):
            continue  # broadcast along the units (a one-channel gate): nothing to tie
        ctx.unite(result, other)
    for ref in params:
        shift = ndim - len(ref.shape)
        for d in result.dims:
            if d - shift >= 0 and ref.shape[d - shift] != 1:
                if ref.shape[d - shift] != out_shape[d] or ref.stored_axis(d - shift) is None or len(result.dims) > 1:
                    raise ctx.fail(f"parameter {ref.name} of shape {ref.shape} does not broadcast along the units")
                ctx.attach(ref, d - shift, "out", result, d)
    for a in plain:
        shape = ctx.shape(a)
        shift = ndim - len(shape)
        varying = [d for d in result.dims if d - shift >= 0 and shape[d - shift] != 1]
        if varying:
            # A computed tensor without units that varies along them (a rotary position encoding): a
            # permutation must leave every entry where it is along those dimensions, so each unit is tagged
            # with its position there. Units that repeat along them (a head's dimensions, once attention
            # makes the head one unit) keep every tag in common and still move together.
            position = np.zeros(result.ids.shape, dtype=np.int64)
            for d in varying:
                index = np.arange(result.ids.shape[d]).reshape([-1 if i == d else 1 for i in range(ndim)])
                position = position * result.ids.shape[d] + index
            ctx.tag(result, position)
    return result
