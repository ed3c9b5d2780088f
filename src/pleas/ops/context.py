"""What a handler sees of one captured node, and how it records what it knows about the op."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.fx as fx
from torch import nn

from ..errors import UnsupportedOpError
from .units import Units


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer used as a tensor in ``forward``: state-dict key ``name``, its shape as used
    (``shape``), and for each used dimension the stored axis behind it (None for an inserted size-1
    dimension). Reshapes that add or drop size-1 dimensions and transposes keep track of the axes."""

    name: str
    shape: tuple[int, ...]
    axes: tuple[int | None, ...]

    @classmethod
    def stored(cls, name: str, shape: tuple[int, ...]) -> "ParamRef":
        return cls(name, tuple(shape), tuple(range(len(shape))))

    def stored_axis(self, dim: int) -> int | None:
        return self.axes[dim % len(self.axes)]


def target_name(node: fx.Node) -> str:
    """A readable name for what a node calls: ``torch.flatten``, ``Tensor.view``, ``aten.linear``."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        if hasattr(node.target, "overloadpacket"):
            return f"aten.{node.target.overloadpacket.__name__}"
        mod = getattr(node.target, "__module__", None) or ""
        name = getattr(node.target, "__qualname__", None) or getattr(node.target, "__name__", str(node.target))
        if mod in ("_operator", "operator"):
            mod = "operator"
        return f"{mod}.{name}" if mod else name
    return str(node.target)


class OpContext:
    """One node under analysis: its arguments' values (units, parameter references), shapes, and the
    record-keeping calls a handler makes (see :mod:`pleas.ops.registry`)."""

    def __init__(self, analysis, node: fx.Node, module: nn.Module | None):
        """``analysis`` is the walk in progress (:class:`pleas.groups.analysis.Analysis`)."""
        self._analysis = analysis
        self.node = node
        self.module = module
        self.table = analysis.table

    # --- reading the node ------------------------------------------------------------------------
    @property
    def where(self) -> str:
        owner = self._analysis.program.owner.get(self.node.name, "")
        if self.module is not None:
            return f"module {self.node.target!r} ({type(self.module).__name__})"
        inside = f" inside {owner!r}" if owner else ""
        return f"{target_name(self.node)} (graph node {self.node.name!r}{inside})"

    @property
    def owner(self) -> str:
        """The module path this node belongs to ("" for the model itself)."""
        if self.module is not None:
            return str(self.node.target)
        return self._analysis.program.owner.get(self.node.name, "")

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
        """What a node argument carries (Units, ParamRef, None, or a tuple of them)."""
        if isinstance(x, fx.Node):
            return self._analysis.values.get(x.name)
        if isinstance(x, (tuple, list)):
            return type(x)(self.value(v) for v in x)
        return None

    def units(self, x: Any) -> Units | None:
        v = self.value(x)
        return v if isinstance(v, Units) else None

    def shape(self, x: Any = None) -> tuple[int, ...] | None:
        """The example shape of a node argument's tensor (or of this node's output when ``x`` is None)."""
        node = self.node if x is None else x
        if not isinstance(node, fx.Node):
            return None
        return self._analysis.program.shape(node)

    def ndim(self, x: Any = None) -> int | None:
        s = self.shape(x)
        return None if s is None else len(s)

    def param(self, local: str) -> ParamRef | None:
        """This module's tensor ``local`` (None if the module has none)."""
        if self.module is None:
            return None
        t = getattr(self.module, local, None)
        if t is None:
            return None
        return ParamRef.stored(f"{self.node.target}.{local}", tuple(t.shape))

    # --- recording -------------------------------------------------------------------------------
    def fail(self, problem: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.where}: {problem}")

    def new(self, width: int, dim: int, *, fixed: bool = False, ndim: int | None = None) -> Units:
        """Fresh units for this node's output, along dimension ``dim``."""
        ids = self.table.new(width, self.owner or self.node.name, fixed=fixed)
        return Units.along(ids, dim, self.ndim() if ndim is None else ndim)

    def attach(self, param: ParamRef | None, dim: int, role: str, units: Units, units_dim: int | None = None) -> None:
        """Record that ``param``'s used dimension ``dim`` indexes ``units`` (along their dimension
        ``units_dim``, by default their only one)."""
        if param is None or units is None:
            return
        axis = param.stored_axis(dim)
        if axis is None:
            raise self.fail(f"parameter {param.name} has no stored axis for its dimension {dim}")
        ids = units.vector(units_dim)
        self.table.attach(param.name, axis, role, ids)

    def read_site(self, x: Any, units: Units | None) -> None:
        """Record that this op reads ``units`` from node ``x`` (an activation statistics can be taken at)."""
        if units is None or not isinstance(x, fx.Node):
            return
        self.table.add_site(x.name, units)

    def unite(self, a: Units, b: Units) -> None:
        """Tie the units of ``a`` and ``b`` entry by entry (they must broadcast to one shape)."""
        try:
            np.broadcast_shapes(a.ids.shape, b.ids.shape)
        except ValueError:
            raise self.fail(f"cannot align unit layouts {a.ids.shape} and {b.ids.shape}") from None
        self.table.union(a.ids, b.ids)

    def fix(self, units: Units | None, why: str | None = None) -> None:
        if units is not None:
            self.table.fix(units.ids)
            if why:
                self.table.notes.append(f"{self.where}: units fixed ({why})")

    def tag(self, units: Units, values: np.ndarray) -> None:
        """Units may move only among units of equal tag (``values`` broadcast like ``units.ids``)."""
        ids, vals = np.broadcast_arrays(units.ids, np.asarray(values))
        self.table.tag(ids, vals)

    def tie(self, units: Units) -> None:
        """The groups these units belong to must keep their proportions in a rewritten model."""
        self.table.tie(units.ids)

    @property
    def batch(self) -> int:
        """The example's batch size (to turn an output's shape into positions per sample)."""
        return self._analysis.batch

    def view(self, param: str, kind: str, groups: int) -> None:
        """``param`` is stored compressed: ``"blockdiag"`` with ``groups`` blocks is a grouped
        convolution's weight, read as the block-diagonal dense weight it stands for."""
        self._analysis.views[param] = (kind, int(groups))

    def linear_map(self, layer) -> None:
        """Declare this op a linear map of its input that the least-squares refit can fit (see
        :mod:`pleas.ops.linear_maps`)."""
        self._analysis.layers.append(layer)

    def norm_statistics(self, norm) -> None:
        """Declare running statistics of this op that are recomputed after a merge."""
        self._analysis.norms.append(norm)

    def cost(self, weight: str, positions: int) -> None:
        """The op multiplies ``weight`` at ``positions`` output positions per sample (its FLOPs factor)."""
        self._analysis.positions[weight] = self._analysis.positions.get(weight, 0) + int(positions)

    def note(self, text: str) -> None:
        self.table.notes.append(f"{self.where}: {text}")
