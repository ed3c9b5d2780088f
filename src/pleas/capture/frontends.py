"""The two ways pleas captures a model into a :class:`~pleas.capture.program.Program`.

- :func:`capture_fx`: ``torch.fx`` symbolic tracing. Modules with a registered handler stay leaves
  (``call_module`` nodes), so code torch.fx cannot trace can be wrapped in a module with a handler.
- :func:`capture_export`: ``torch.export`` (an ATen graph; each node names its module in
  ``meta["nn_module_stack"]``), for models torch.fx cannot trace, such as Hugging Face transformers. The
  batch dimension of every input (and the sequence dimension of token ids) is captured as dynamic, so
  the program runs on any batch.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UnsupportedOpError
from ..ops import registry
from .program import Program, as_call


class _LeafTracer(fx.Tracer):
    """A tracer that stops at every module with a registered handler."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if registry.find_module_handler(m) is not None:
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.MultiheadAttention)):
            return False  # traced into (MultiheadAttention's code defeats torch.fx: torch.export reads it)
        return super().is_leaf_module(m, qualname)


def _bind(model: nn.Module, batch: Any, extra: dict) -> dict[str, Any]:
    """Every argument of ``model.forward`` by name, for ``batch`` plus the fixed keyword arguments ``extra``."""
    args, kwargs = as_call(batch)
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs, **extra)
    return dict(bound.arguments)


def _owner_from_stack(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    value = list(stack.values())[-1]
    return value[0] if isinstance(value, tuple) else str(value)


def capture_fx(model: nn.Module, example: Any, extra: dict | None = None) -> Program:
    """Trace ``model`` (in eval mode; not modified) with torch.fx; the program shares its modules."""
    extra = dict(extra or {})
    try:
        graph = _LeafTracer().trace(model, concrete_args=extra or None)
    except Exception as exc:  # torch.fx raises many types; one clear message
        raise UnsupportedOpError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
    gm = fx.GraphModule(model, graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]

    def flatten(batch: Any) -> list:
        bound = _bind(model, batch, extra)
        values = []
        for p in placeholders:
            if p.target in bound:
                values.append(bound[p.target])
            elif p.args:  # the parameter's default
                values.append(p.args[0])
            else:
                values.append(None)
        return values

    with torch.no_grad():
        ShapeProp(gm).propagate(*flatten(example))
    meta = {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}
    owner = {n.name: str(n.target) if n.op == "call_module" else _owner_from_stack(n) for n in gm.graph.nodes}
    params = {str(n.target): str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    return Program(gm, "fx", flatten, meta, owner, params, example)


def _dynamic(value: Any) -> Any:
    """Dynamic-shape spec of one input: the batch dimension of a tensor is free, and so is the sequence
    dimension of token ids (an integer tensor of two dimensions)."""
    from torch.export import Dim

    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    spec = {0: Dim.AUTO}
    if value.dim() == 2 and not value.dtype.is_floating_point:
        spec[1] = Dim.AUTO
    return spec


def capture_export(model: nn.Module, example: Any, extra: dict | None = None) -> Program:
    """Export ``model`` with torch.export; the program holds its own copy of the parameters."""
    extra = dict(extra or {})
    kwargs = _bind(model, example, extra)
    dynamic = {k: _dynamic(v) for k, v in kwargs.items()}
    try:
        exported = torch.export.export(model, (), kwargs=kwargs, dynamic_shapes=dynamic)
    except Exception as exc:
        raise UnsupportedOpError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {str(exc)[:800]}"
        ) from exc
    gm = exported.module()
    spec = gm._in_spec

    def flatten(batch: Any) -> list:
        import torch.fx._pytree as fx_pytree

        return list(fx_pytree.tree_flatten_spec(((), _bind(model, batch, extra)), spec))

    with torch.no_grad():
        ShapeProp(gm).propagate(*flatten(example))
    meta = {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}
    owner = {n.name: _owner_from_stack(n) for n in gm.graph.nodes}
    params = {str(n.target): str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    return Program(gm, "export", flatten, meta, owner, params, example)
