"""A captured model: a runnable fx graph, the shapes of its values on an example, and who owns each node.

Both front-ends (:mod:`pleas.capture.fx_frontend`, :mod:`pleas.capture.export_frontend`) produce a
:class:`Program`. Every later stage reads the same object: the grouping pass walks its nodes, statistics
run it with *taps* (the values of chosen nodes, kept as the program runs), and the propagated refit walks
it node by node (:class:`Walk`). Programs run on any batch size: fx graphs are shape-generic, exported
graphs are captured with a dynamic batch dimension.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

#: Node ops that carry no computation of their own.
_STRUCTURAL = ("placeholder", "get_attr", "output")


def as_call(batch: Any) -> tuple[tuple, dict]:
    """A calibration batch as positional and keyword arguments of ``forward``: a tensor is one positional
    input, a tuple or list several, a dict (as a tokenizer returns) keyword inputs."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    raise TypeError(f"a batch must be a tensor, a tuple of tensors or a dict of tensors, got {type(batch).__name__}")


@dataclass
class Program:
    """One capture of a model.

    - ``gm``: the fx ``GraphModule`` that runs it (for torch.fx it shares the model's modules; for
      torch.export it is the exported program's module, holding its own parameters).
    - ``frontend``: ``"fx"`` or ``"export"``.
    - ``flatten``: turns a batch (a tensor, a tuple of tensors, or a dict of keyword inputs) into the
      graph's placeholder values, in order.
    - ``meta``: per node name, the example value's shape and dtype (``torch.fx`` ``TensorMetadata`` or
      a tuple of them), from running the example through the graph once.
    - ``owner``: per node name, the path of the innermost module the node belongs to ("" for the model).
    - ``params``: per ``get_attr`` target, the model's state-dict key of that tensor.
    """

    gm: fx.GraphModule
    frontend: str
    flatten: Callable[[Any], list]
    meta: dict[str, Any]
    owner: dict[str, str]
    params: dict[str, str]
    example: Any = None
    _order: list[fx.Node] = field(default_factory=list, repr=False)
    _last_use: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._order = list(self.gm.graph.nodes)
        position = {n.name: i for i, n in enumerate(self._order)}
        self._last_use = {n.name: max((position[u.name] for u in n.users), default=-1) for n in self._order}
        self._modules = dict(self.gm.named_modules())
        self._placeholder_index = {n.name: i for i, n in enumerate(n for n in self._order if n.op == "placeholder")}

    # --- structure -------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[fx.Node]:
        """Every node in topological order, the output node last."""
        return self._order

    def node(self, name: str) -> fx.Node:
        for n in self._order:
            if n.name == name:
                return n
        raise KeyError(f"the captured graph has no node {name!r}")

    def shape(self, node: fx.Node | str) -> tuple[int, ...] | None:
        meta = self.meta.get(node if isinstance(node, str) else node.name)
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def module(self, path: str) -> nn.Module:
        return self._modules[path]

    def signature(self) -> list[tuple]:
        """A comparable description of the graph (ops, targets, argument structure, shapes): two captures
        of one architecture with the same ``forward`` have equal signatures."""
        out = []
        for n in self._order:
            args = fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{a.name}")
            out.append((n.op, str(n.target), repr(args), self.shape(n)))
        return out

    def bind(self, model: nn.Module) -> "Program":
        """This capture running another model of the same architecture: for torch.fx the graph bound to
        ``model``'s modules, for torch.export a copy of the program holding ``model``'s tensors."""
        import copy

        if self.frontend == "fx":
            gm = fx.GraphModule(model, self.gm.graph)
        else:
            gm = copy.deepcopy(self.gm)
            gm.load_state_dict(model.state_dict(), strict=False)
        return Program(gm, self.frontend, self.flatten, self.meta, self.owner, self.params, self.example)

    # --- running ---------------------------------------------------------------------------------
    def run(self, batch: Any, taps: Iterable[str] = ()) -> tuple[Any, dict[str, torch.Tensor]]:
        """The graph's output on ``batch`` and the values of the nodes named in ``taps``."""
        walk = Walk(self, [batch], keep=set(taps))
        for node in self._order:
            walk.advance(node)
        return walk.output[0], {name: walk.kept[0][name] for name in taps}

    def run_node(self, node: fx.Node, env: dict[str, Any], inputs: list) -> Any:
        """The value of ``node`` given the values ``env`` of the nodes before it and the placeholder
        values ``inputs``."""
        if node.op == "placeholder":
            return inputs[self._placeholder_index[node.name]]
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        args = fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        if node.op == "call_module":
            return self._modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "output":
            return args[0]
        raise ValueError(f"cannot run node {node.name} ({node.op})")

    def last_use(self, name: str) -> int:
        return self._last_use[name]


class Walk:
    """A program run node by node over several batches at once.

    It holds each batch's live values (those a later node still reads, and those named in ``keep``), so a
    caller can change the model between nodes (refit a layer, set a norm's statistics) after everything
    before the node ran on all the batches and before anything after it runs. After the output node,
    ``output`` holds each batch's result and ``kept`` each batch's kept values.
    """

    def __init__(self, program: Program, batches: list, keep: set[str] = frozenset()):
        self.program = program
        self.batches = list(batches)
        self.inputs = [program.flatten(b) for b in self.batches]
        self.keep = set(keep)
        self.env: list[dict[str, Any]] = [{} for _ in self.batches]
        self.kept: list[dict[str, Any]] = [{} for _ in self.batches]
        self.output: list[Any] = [None for _ in self.batches]
        self._position = {n.name: i for i, n in enumerate(program.nodes)}

    def values(self, name: str) -> list:
        return [env[name] for env in self.env]

    def advance(self, node: fx.Node) -> None:
        """Run ``node`` on every batch, then drop the values no later node reads."""
        here = self._position[node.name]
        with torch.no_grad():
            for i, (env, inputs) in enumerate(zip(self.env, self.inputs)):
                value = self.program.run_node(node, env, inputs)
                if node.op == "output":
                    self.output[i] = value
                    continue
                env[node.name] = value
                if node.name in self.keep:
                    self.kept[i][node.name] = value
                for name in [k for k in env if self.program.last_use(k) <= here]:
                    del env[name]

    def peak_live_bytes(self) -> int:
        """Run the whole program on the batches and return the largest total size of the activations
        alive at once (parameters excluded)."""
        peak = 0
        for node in self.program.nodes:
            self.advance(node)
            live = sum(v.numel() * v.element_size() for env in self.env for v in env.values()
                       if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter))
            peak = max(peak, live)
        return peak


#: Samples of the first batch that a walk runs to estimate its memory per sample.
PROBE_SAMPLES = 8


def fitting_batches(program: Program, batches: list, max_bytes: int) -> list:
    """The first batches whose activations, all alive at once while the walk runs, fit in ``max_bytes``
    (estimated on a few samples of the first batch); at least one batch."""
    batches = list(batches)
    first = batches[0]
    probe = _head(first, PROBE_SAMPLES)
    size = batch_size(probe)
    per_sample = Walk(program, [probe]).peak_live_bytes() / max(size, 1)
    budget = max(int(max_bytes // max(per_sample, 1.0)), batch_size(first))
    out, used = [first], batch_size(first)
    for x in batches[1:]:
        if used + batch_size(x) > budget:
            break
        out.append(x)
        used += batch_size(x)
    return out


def batch_size(batch) -> int:
    args, kwargs = as_call(batch)
    first = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
    return first.shape[0]


def take(batch, index):
    """The samples ``index`` (a slice or an index tensor) of a calibration batch: a tensor, a tuple or list
    of them, or a dict (entries that are not tensors kept as they are)."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    if isinstance(batch, (tuple, list)):
        return type(batch)(t[index] if isinstance(t, torch.Tensor) else t for t in batch)
    return {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _head(batch, n: int):
    return take(batch, slice(None, n))
