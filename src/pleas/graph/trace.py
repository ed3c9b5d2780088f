"""Derive a :class:`~pleas.spec.PermutationSpec` from any ``nn.Module`` by tracing it with torch.fx.

Each node of the traced graph is dispatched to one handler (see :mod:`pleas.graph.registry`), which
describes its output's units in terms of union-find axis sets. An op without a handler is an error
that names the op and where it sits in the model, never a silent skip.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import SpecError, UnsupportedOpError
from ..spec import Group, Member, PermutationSpec, Site
from . import registry
from .axes import AxisSets, Features, Segment


@dataclass(frozen=True)
class ParamRef:
    """The value of a ``get_attr`` node: a parameter or buffer used directly in ``forward``.

    ``shape`` is the shape as used (after reshapes that only add or drop size-1 dimensions),
    ``stored`` the shape in the state dict.
    """

    name: str
    shape: tuple[int, ...]
    stored: tuple[int, ...] | None = None

    def stored_axis(self, axis: int) -> int | None:
        """The state-dict axis behind axis ``axis`` of the used shape (None if it is size 1)."""
        stored = self.stored if self.stored is not None else self.shape
        if self.shape[axis] == 1:
            return None
        used = [i for i, n in enumerate(self.shape) if n != 1]
        kept = [i for i, n in enumerate(stored) if n != 1]
        if [self.shape[i] for i in used] != [stored[i] for i in kept]:
            return None
        return kept[used.index(axis)]


class _LeafTracer(fx.Tracer):
    """A tracer that stops at every module with a registered handler."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if registry.find_module_handler(m) is not None:
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return super().is_leaf_module(m, qualname)


def target_name(node: fx.Node) -> str:
    """A readable name for what a node calls: ``torch.flatten``, ``Tensor.view``, ``layer1.0.conv1``."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", None) or ""
        name = getattr(node.target, "__qualname__", None) or getattr(node.target, "__name__", str(node.target))
        if mod in ("_operator", "operator"):
            mod = "operator"
        return f"{mod}.{name}" if mod else name
    return str(node.target)


class TraceContext:
    """What a handler sees of one node: its arguments' units and shapes, and how to record groups."""

    def __init__(self, state: "_TraceState", node: fx.Node, module: nn.Module | None):
        self._state = state
        self.node = node
        self.module = module
        self.sets: AxisSets = state.sets

    # --- reading the node -------------------------------------------------------------------
    @property
    def where(self) -> str:
        if self.module is not None:
            return f"module {self.node.target!r} ({type(self.module).__name__})"
        stack = self.node.meta.get("nn_module_stack") or {}
        inside = f" inside {list(stack)[-1]!r}" if stack else ""
        return f"{target_name(self.node)} (graph node {self.node.name!r}{inside})"

    @property
    def args(self) -> tuple:
        return self.node.args

    @property
    def kwargs(self) -> dict:
        return self.node.kwargs

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def value(self, x: Any) -> Any:
        """The traced value (Features, ParamRef, None, or a tuple of them) of a node argument."""
        if isinstance(x, fx.Node):
            return self._state.values[x]
        if isinstance(x, (tuple, list)):
            return type(x)(self.value(v) for v in x)
        return None

    def features(self, x: Any) -> Features | None:
        v = self.value(x)
        return v if isinstance(v, Features) else None

    def shape(self, x: Any = None) -> tuple[int, ...] | None:
        """The shape of a node argument's tensor (or of this node's output when ``x`` is None)."""
        node = self.node if x is None else x
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def ndim(self, x: Any = None) -> int | None:
        s = self.shape(x)
        return None if s is None else len(s)

    # --- recording --------------------------------------------------------------------------
    def fail(self, problem: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.where}: {problem}")

    def new(self, width: int, dim: int, *, fixed: bool = False) -> Features:
        origin = str(self.node.target) if self.module is not None else self.node.name
        return Features(dim, (Segment(self.sets.new(width, origin, fixed=fixed), width),))

    def param(self, local: str) -> str | None:
        """The state-dict name of this module's tensor ``local`` (None if the module has none)."""
        if self.module is None or getattr(self.module, local, None) is None:
            return None
        return f"{self.node.target}.{local}"

    def attach(self, param: str | None, axis: int, role: str, features: Features) -> None:
        """Record that ``param``'s axis ``axis`` indexes ``features``' units, segment by segment."""
        if param is None:
            return
        offset = 0
        for seg in features.segments:
            self._state.add_member(seg.axis_set, Member(param, axis, role, offset, seg.repeat), self.where)
            offset += seg.size

    def read_site(self, x: Any, features: Features | None) -> None:
        """Record that this layer reads ``features``' units from node ``x`` (its input activation)."""
        if features is None or not isinstance(x, fx.Node):
            return
        offset = 0
        for seg in features.segments:
            site = Site(x.name, target_name(x), features.dim, offset, seg.repeat)
            self.sets.add_site(seg.axis_set, site)
            offset += seg.size

    def unite(self, a: Features, b: Features) -> None:
        """Tie the units of ``a`` and ``b`` one to one (a residual add, an elementwise product)."""
        if len(a.segments) != len(b.segments) or any(
            x.width != y.width or x.repeat != y.repeat for x, y in zip(a.segments, b.segments)
        ):
            raise self.fail(
                f"cannot align unit layouts {_layout(a)} and {_layout(b)}; both operands must have the same "
                "channel structure"
            )
        for x, y in zip(a.segments, b.segments):
            self.sets.union(x.axis_set, y.axis_set, self.where)

    def fix(self, features: Features | None) -> None:
        if features is not None:
            for seg in features.segments:
                self.sets.fix(seg.axis_set)


def _layout(f: Features) -> str:
    return "[" + ", ".join(f"{s.width}x{s.repeat}" if s.repeat > 1 else str(s.width) for s in f.segments) + "]"


class _TraceState:
    def __init__(self):
        self.sets = AxisSets()
        self.values: dict[fx.Node, Any] = {}
        self._member_set: dict[tuple[str, int, int], int] = {}

    def add_member(self, axis_set: int, member: Member, where: str) -> None:
        # A tensor used twice (a module called twice, tied weights) ties its users' units together.
        key = (member.param, member.axis, member.offset)
        if key in self._member_set:
            self.sets.union(self._member_set[key], axis_set, where)
            return
        self._member_set[key] = axis_set
        self.sets.add_member(axis_set, member)


def _as_inputs(example_input: Any) -> tuple:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in example_input):
        return tuple(example_input)
    raise TypeError(f"example_input must be a tensor or a tuple of tensors, got {type(example_input).__name__}")


def trace_graph(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with pleas' leaf rules. The GraphModule shares ``model``'s submodules."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # torch.fx raises many types; give one clear message
        raise UnsupportedOpError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. Wrap the untraceable "
            "code in a module and register a handler for it with pleas.register_module_handler, or pass a spec."
        ) from exc
    return fx.GraphModule(model, graph)


def build_spec(model: nn.Module, example_input: Any, *, copy_model: bool = True) -> PermutationSpec:
    """Trace ``model`` on ``example_input`` and return its permutation groups.

    The caller's model is not modified (tracing and shape propagation run on a copy, in eval mode;
    ``copy_model=False`` skips the copy for a model that is private and in eval mode already).
    Network inputs and the model's outputs are not permutable; every other unit axis is grouped.
    """
    inputs = _as_inputs(example_input)
    work = copy.deepcopy(model).eval() if copy_model or any(m.training for m in model.modules()) else model
    gm = trace_graph(work)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    state = _TraceState()
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        state.values[node] = _dispatch(state, node, modules)
    spec = _collect(state, input_shape=tuple(inputs[0].shape))
    spec.positions = _layer_positions(gm, modules, batch=inputs[0].shape[0])
    return spec


def _layer_positions(gm: fx.GraphModule, modules: dict, batch: int) -> dict[str, int]:
    """Output positions per sample of every Linear/Conv weight: its multiply-adds are this times its size."""
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        meta = node.meta.get("tensor_meta")
        module = modules[node.target]
        units = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        if meta is not None and hasattr(meta, "shape"):
            out[f"{node.target}.weight"] = out.get(f"{node.target}.weight", 0) + math.prod(meta.shape) // (batch * units)
    return out


def _dispatch(state: _TraceState, node: fx.Node, modules: dict[str, nn.Module]) -> Any:
    if node.op == "placeholder":
        ctx = TraceContext(state, node, None)
        shape = ctx.shape()
        return ctx.new(shape[1], 1, fixed=True) if shape is not None and len(shape) >= 2 else None
    if node.op == "get_attr":
        meta = node.meta.get("tensor_meta")
        return ParamRef(str(node.target), tuple(meta.shape) if meta is not None else ())
    if node.op == "output":
        ctx = TraceContext(state, node, None)
        for f in _flatten_values(ctx.value(node.args[0])):
            if f is not None:
                for seg in f.segments:
                    state.sets.mark_output(seg.axis_set)
        return None
    if node.op == "call_module":
        module = modules[node.target]
        handler = registry.find_module_handler(module)
        if handler is None:
            raise UnsupportedOpError(
                f"no pleas handler for module {node.target!r} of type {type(module).__module__}."
                f"{type(module).__name__}; register one with pleas.register_module_handler"
            )
        return handler.trace(TraceContext(state, node, module))
    if node.op == "call_function":
        handler = registry.FUNCTION_HANDLERS.get(node.target)
    else:  # call_method
        handler = registry.METHOD_HANDLERS.get(node.target)
    ctx = TraceContext(state, node, None)
    if handler is None:
        if not any(isinstance(v, (Features, ParamRef)) for v in _flatten_values(ctx.value(list(node.args)))):
            return None  # arithmetic on sizes and other values that carry no units
        raise UnsupportedOpError(
            f"no pleas handler for {ctx.where}; register one with "
            + ("pleas.register_function_handler" if node.op == "call_function" else "pleas.register_method_handler")
        )
    return handler(ctx)


def _flatten_values(v: Any) -> Iterable[Any]:
    if isinstance(v, (tuple, list)):
        for x in v:
            yield from _flatten_values(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _flatten_values(x)
    else:
        yield v


def _collect(state: _TraceState, input_shape: tuple[int, ...]) -> PermutationSpec:
    used: set[str] = set()

    def named(kind: bool) -> list[Group]:
        out = []
        for root, width, block, members, sites in state.sets.groups(outputs=kind):
            base = state.sets.origin(root)
            name, i = base, 1
            while name in used:
                i += 1
                name = f"{base}#{i}"
            used.add(name)
            out.append(Group(name, width, members, sites, block))
        return out

    groups = named(False)
    spec = PermutationSpec(groups, input_shape=input_shape, outputs=named(True))
    if not groups:
        raise SpecError("the model has no permutable units (every unit axis is an input or an output)")
    return spec


