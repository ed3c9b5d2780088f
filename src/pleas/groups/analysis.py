"""Stage 2, groups: walk a captured program once, dispatching every node to its handler, and collect
the permutation groups, the linear maps the refit can fit, the norm statistics, and the costs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx

from ..capture import Program
from ..errors import UnsupportedOpError
from ..ops import registry
from ..ops.context import OpContext, ParamRef
from .spec import Group, Member, PermutationSpec, Site
from ..ops.units import UnitTable, Units
from .grouping import group_units


@dataclass
class ModelGraph:
    """Everything the later stages read about one captured model.

    - ``spec``: the permutation groups (and output axes) with their members and sites.
    - ``layers``: the ops that are linear maps of their input (:mod:`pleas.ops.linear_maps`), in graph order.
    - ``norms``: the running statistics to recompute after a merge, in graph order.
    - ``program``: the capture it was read from.
    """

    program: Program
    spec: PermutationSpec
    layers: list = field(default_factory=list)
    norms: list = field(default_factory=list)

    def layer(self, weight: str):
        for layer in self.layers:
            if layer.weight == weight:
                return layer
        raise KeyError(f"no linear map with weight {weight!r}")


class Analysis:
    """The state of one walk over a program (what handlers see through :class:`OpContext`)."""

    def __init__(self, program: Program):
        self.program = program
        self.table = UnitTable()
        self.values: dict[str, Any] = {}
        self.layers: list = []
        self.norms: list = []
        self.positions: dict[str, int] = {}
        self.views: dict[str, tuple[str, int]] = {}
        inputs = [n for n in program.nodes if n.op == "placeholder" and program.shape(n)]
        self.batch = max(program.shape(inputs[0])[0], 1) if inputs else 1

    def run(self) -> ModelGraph:
        for node in self.program.nodes:
            self.values[node.name] = self._dispatch(node)
        permutable, outputs = group_units(self.table)
        groups = [_group(g) for g in permutable]
        out_groups = [_group(g) for g in outputs]
        inputs = [n for n in self.program.nodes if n.op == "placeholder" and self.program.shape(n) is not None]
        input_shape = self.program.shape(inputs[0]) if inputs else None
        spec = PermutationSpec(groups, input_shape=input_shape, outputs=out_groups, positions=self.positions,
                               aliases=_aliases(self.program), notes=list(dict.fromkeys(self.table.notes)),
                               views=self.views)
        return ModelGraph(self.program, spec, self.layers, self.norms)

    def _dispatch(self, node: fx.Node) -> Any:
        program = self.program
        if node.op == "placeholder":
            return self._placeholder(node)
        if node.op == "get_attr":
            meta = program.meta.get(node.name)
            if meta is None or not hasattr(meta, "shape") or not meta.dtype.is_floating_point:
                return None  # integer buffers (position ids, masks) carry no units
            return ParamRef.stored(program.params[str(node.target)], tuple(meta.shape))
        if node.op == "output":
            ctx = OpContext(self, node, None)
            for v in _flatten(ctx.value(node.args[0])):
                if isinstance(v, Units):
                    self.table.mark_output(v.ids)
            return None
        if node.op == "call_module":
            module = program.module(str(node.target))
            if str(node.target) == "_guards_fn":  # torch.export's shape guards
                return None
            handler = registry.find_module_handler(module)
            if handler is None:
                raise UnsupportedOpError(
                    f"no pleas handler for module {node.target!r} of type {type(module).__module__}."
                    f"{type(module).__name__}; register one with pleas.register_module_handler"
                )
            return handler.trace(OpContext(self, node, module))
        ctx = OpContext(self, node, None)
        if node.op == "call_function":
            handler = registry.find_function_handler(node.target)
        else:  # call_method
            handler = registry.METHOD_HANDLERS.get(node.target)
        if handler is None:
            if not any(isinstance(v, (Units, ParamRef)) for v in _flatten(ctx.value(list(node.args)))) and \
                    not any(isinstance(v, (Units, ParamRef)) for v in _flatten(ctx.value(list(node.kwargs.values())))):
                return None  # arithmetic on sizes, masks and other values that carry no units
            raise UnsupportedOpError(
                f"no pleas handler for {ctx.where}; register one with "
                + ("pleas.register_function_handler" if node.op == "call_function" else "pleas.register_method_handler")
            )
        return handler(ctx)

    def _placeholder(self, node: fx.Node) -> Units | None:
        """A network input: its channel dimension (1) holds fixed units, unless it holds integer ids."""
        meta = self.program.meta.get(node.name)
        shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        if shape is None or len(shape) < 2 or not meta.dtype.is_floating_point:
            return None
        ctx = OpContext(self, node, None)
        return ctx.new(shape[1], 1, fixed=True, ndim=len(shape))


def _flatten(v: Any) -> Iterable[Any]:
    if isinstance(v, (tuple, list)):
        for x in v:
            yield from _flatten(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _flatten(x)
    else:
        yield v


def _group(data) -> Group:
    members = [Member(p, a, r, torch.from_numpy(idx)) for p, a, r, idx in data.members]
    sites = [Site(node, dims, torch.from_numpy(idx)) for node, dims, idx in data.sites]
    return Group(data.name, data.width, members, sites, data.tie)


def _aliases(program: Program) -> dict[str, str]:
    """State-dict keys that share their tensor with another key (tied weights), mapped to the key the
    captured graph uses."""
    used = {program.params[str(n.target)] for n in program.nodes if n.op == "get_attr" and n.users}
    by_ptr: dict[int, list[str]] = {}
    for key, t in program.gm.state_dict(keep_vars=True).items():
        if t.numel():
            by_ptr.setdefault(t.data_ptr(), []).append(key)
    aliases = {}
    for keys in by_ptr.values():
        canonical = next((k for k in keys if k in used), keys[0])
        for k in keys:
            if k != canonical:
                aliases[k] = canonical
    return aliases


def analyze(program: Program) -> ModelGraph:
    """The :class:`ModelGraph` of a captured program (see :mod:`pleas.groups`)."""
    return Analysis(program).run()
