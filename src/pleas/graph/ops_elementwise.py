"""Handlers for ops that act on each unit separately: activations, dropout, and arithmetic."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from .axes import Features
from .registry import function_handler, module_handler


def _resize_prelu(m: nn.PReLU) -> None:
    m.num_parameters = m.weight.shape[0]


_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)


@module_handler(*_UNARY_MODULES)
@function_handler(
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.elu, F.selu, F.leaky_relu, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.mish, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.sigmoid, F.tanh,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clip, torch.abs, torch.exp,
    torch.square, torch.sqrt, torch.rsqrt, operator.neg, operator.pow, torch.pow, torch.erf,
    methods=(
        "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "abs", "exp",
        "neg", "square", "sqrt", "rsqrt", "pow", "erf", "contiguous", "clone", "detach", "float", "double",
        "half", "to", "type_as",
    ),
)
def unary(ctx):
    """y_i = f(x_i): the output carries the input's units unchanged."""
    return ctx.value(ctx.arg(0, "input"))


@module_handler(nn.PReLU, resize=_resize_prelu)
def prelu(ctx):
    x = ctx.features(ctx.arg(0, "input"))
    if ctx.module.num_parameters > 1:
        if x is None or x.dim != 1:
            raise ctx.fail("PReLU with per-channel slopes needs channels on dimension 1")
        ctx.attach(ctx.param("weight"), 0, "out", x)
    return x


@module_handler(nn.Softmax, nn.LogSoftmax)
@function_handler(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, methods=("softmax", "log_softmax"))
def softmax(ctx):
    """Softmax is permutation-equivariant along any dimension, the unit dimension included."""
    return ctx.value(ctx.arg(0, "input"))


@function_handler(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
    methods=("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"),
)
def binary(ctx):
    """Broadcasting elementwise arithmetic: operands that carry units along the same output dimension
    are tied unit to unit (a residual add ties both branches into one group); a parameter broadcast
    along the units (a layer scale, a learned bias) becomes a member; scalars pass."""
    from .trace import ParamRef  # local import: trace imports the handler modules

    out_shape = ctx.shape()
    if out_shape is None:
        return None  # arithmetic on sizes
    operands = [ctx.arg(0, "input"), ctx.arg(1, "other")]
    result: Features | None = None
    params: list[ParamRef] = []
    plain: list = []
    for a in operands:
        v = ctx.value(a)
        if isinstance(v, Features):
            dim = v.dim + len(out_shape) - ctx.ndim(a)
            if ctx.shape(a)[v.dim] == 1 and out_shape[dim] != 1:
                continue  # broadcast along the units: e.g. a one-channel spatial gate
            f = v.with_dim(dim)
            if result is None:
                result = f
            elif result.dim != f.dim:
                raise ctx.fail(f"operands carry units on different dimensions ({result.dim} and {f.dim})")
            else:
                ctx.unite(result, f)
        elif isinstance(v, ParamRef):
            params.append(v)
        elif ctx.shape(a) is not None:
            plain.append(a)
    if result is None:
        return None
    for ref in params:
        axis = result.dim - (len(out_shape) - len(ref.shape))
        if axis < 0 or ref.shape[axis] == 1:
            continue
        stored_axis = ref.stored_axis(axis)
        if ref.shape[axis] != result.size or stored_axis is None:
            raise ctx.fail(f"parameter {ref.name} of shape {ref.shape} does not broadcast along the units")
        ctx.attach(ref.name, stored_axis, "out", result)
    for a in plain:
        shape = ctx.shape(a)
        axis = result.dim - (len(out_shape) - len(shape))
        if axis >= 0 and shape[axis] != 1:
            raise ctx.fail(
                f"a tensor computed without units (shape {shape}) varies along the unit dimension; its "
                "entries would not follow a permutation"
            )
    return result


def _register_optional() -> None:
    """Elementwise ops of optional packages (torchvision's stochastic depth is identity per unit)."""
    try:
        from torchvision.ops import stochastic_depth
        from torchvision.ops.stochastic_depth import StochasticDepth
    except ImportError:
        return
    function_handler(stochastic_depth)(unary)
    module_handler(StochasticDepth)(unary)


_register_optional()
