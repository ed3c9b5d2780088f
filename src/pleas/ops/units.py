"""Hidden units as integers, and the ties between them (the vocabulary of the op handlers).

Every op that makes new units (a Linear's outputs, a Conv's channels, a network input's channels) draws
fresh integer ids from a :class:`UnitTable`. A tensor's :class:`Units` says which id each of its entries
holds along the dimensions that carry units. Ops that identify units (a residual add, a norm applied to
them, a tensor used twice) *tie* ids entry by entry (union-find). A parameter axis that indexes units is
recorded with the id of each of its entries, and so is every activation a layer reads (a *site*).

:func:`pleas.groups.grouping.group_units` turns this into permutation groups. Tied ids form *classes* (one hidden unit,
wherever it appears). Two classes are interchangeable when they appear in exactly the same parameter
axes and sites, the same number of times, and carry the same tags (a grouped convolution tags each
unit with its convolution group; units may only move within it); each set of interchangeable classes
is one group. A class met by a network input or output is not permutable. Where a class appears several
times along one axis (a Linear reading flattened conv features: each channel spans H*W entries), its
copies are numbered in order of position; a permutation moves copy t of one unit onto copy t of another.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SpecError


class Units:
    """Unit ids of a tensor's entries: ``ids`` has the tensor's number of dimensions, size 1 on the
    dimensions in which no unit varies, and the dimensions in ``dims`` carry the units."""

    __slots__ = ("ids", "dims")

    def __init__(self, ids: np.ndarray, dims: tuple[int, ...]):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.dims = tuple(sorted(dims))
        for d in range(self.ids.ndim):
            if d not in self.dims and self.ids.shape[d] != 1:
                raise SpecError(f"internal: units vary along dimension {d}, which is not among {self.dims}")

    @classmethod
    def along(cls, ids: np.ndarray, dim: int, ndim: int) -> "Units":
        """Units laid out along one dimension ``dim`` of an ``ndim``-dimensional tensor."""
        dim = dim % ndim
        shape = [1] * ndim
        shape[dim] = len(ids)
        return cls(np.asarray(ids, dtype=np.int64).reshape(shape), (dim,))

    @property
    def ndim(self) -> int:
        return self.ids.ndim

    @property
    def dim(self) -> int:
        """The one dimension carrying units (an error if there are several)."""
        if len(self.dims) != 1:
            raise SpecError(f"internal: units are spread over dimensions {self.dims}")
        return self.dims[0]

    def vector(self, dim: int | None = None) -> np.ndarray:
        """The ids along one carrying dimension, as a 1-D array (other carrying dimensions must be 1 wide)."""
        dim = self.dim if dim is None else dim % self.ndim
        return np.moveaxis(self.ids, dim, -1).reshape(-1, self.ids.shape[dim])[0].copy() if self.ids.size else \
            np.zeros(0, dtype=np.int64)

    def flat(self) -> np.ndarray:
        """The ids over the carrying dimensions, flattened in row-major order."""
        return np.ascontiguousarray(self.ids).reshape(-1)

    def __repr__(self) -> str:
        return f"Units(dims={self.dims}, shape={self.ids.shape})"


@dataclass
class Record:
    param: str
    axis: int
    role: str
    ids: np.ndarray


class UnitTable:
    """Union-find over unit ids, with everything recorded about them during one capture's analysis."""

    def __init__(self):
        self._parent: list[int] = []
        self._fixed: list[bool] = []
        self._output: list[bool] = []
        self._origins: list[tuple[int, str]] = []  # (first id, origin name), in creation order
        self.members: dict[tuple[str, int], Record] = {}
        self.sites: list[tuple[str, Units]] = []
        self.tags: list[tuple[np.ndarray, np.ndarray]] = []
        self.ties: list[np.ndarray] = []
        self.notes: list[str] = []

    # --- ids ---------------------------------------------------------------------------------------
    def new(self, count: int, origin: str, *, fixed: bool = False) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + count))
        self._fixed.extend([fixed] * count)
        self._output.extend([False] * count)
        self._origins.append((start, origin))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self._parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie ``a[i]`` to ``b[i]`` for every entry (arrays of equal shape; entries < 0 are skipped)."""
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        pairs = np.unique(np.stack([a.reshape(-1), b.reshape(-1)], 1), axis=0)
        for x, y in pairs.tolist():
            if x < 0 or y < 0:
                continue
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                keep, drop = min(rx, ry), max(rx, ry)  # the earlier unit names the class: topological order
                self._parent[drop] = keep

    def fix(self, ids: np.ndarray) -> None:
        """Make these units non-permutable (they meet a network input, or no symmetry holds for them)."""
        for u in np.unique(ids).tolist():
            if u >= 0:
                self._fixed[u] = True

    def mark_output(self, ids: np.ndarray) -> None:
        """These units are (part of) the network's output: not permutable, kept apart with separate heads."""
        for u in np.unique(ids).tolist():
            if u >= 0:
                self._output[u] = True

    # --- records -----------------------------------------------------------------------------------
    def attach(self, param: str, axis: int, role: str, ids: np.ndarray) -> None:
        """Parameter ``param``'s stored axis ``axis`` holds units ``ids`` (one per entry, in order). A
        tensor used twice (a module called twice, tied weights) ties its users' units together."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        key = (param, axis)
        if key in self.members:
            known = self.members[key]
            if len(known.ids) != len(ids):
                raise SpecError(f"{param} axis {axis} is used with {len(known.ids)} and with {len(ids)} entries")
            self.union(known.ids, ids)  # (an output layer tied to the input embedding keeps the embedding's role)
            return
        self.members[key] = Record(param, axis, role, ids)

    def add_site(self, node: str, units: Units) -> None:
        """Activation ``node`` holds ``units`` (recorded once per node, however many layers read it)."""
        if not any(n == node and u.dims == units.dims for n, u in self.sites):
            self.sites.append((node, units))

    def tag(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Units ``ids[i]`` may only be permuted among units of equal tag ``values[i]``."""
        self.tags.append((np.asarray(ids, dtype=np.int64).reshape(-1), np.asarray(values).reshape(-1)))

    def tie(self, ids: np.ndarray) -> None:
        """The groups of all these units must keep their proportions in any rewritten model."""
        self.ties.append(np.unique(np.asarray(ids, dtype=np.int64).reshape(-1)))

    # --- reading ---------------------------------------------------------------------------------
    def roots(self) -> np.ndarray:
        """The class (smallest tied id) of every unit."""
        return np.array([self.find(u) for u in range(len(self._parent))], dtype=np.int64)

    def origin(self, unit: int) -> str:
        """The name of the op that made ``unit``."""
        starts = [s for s, _ in self._origins]
        return self._origins[int(np.searchsorted(starts, unit, side="right")) - 1][1]

    @property
    def fixed(self) -> np.ndarray:
        return np.array(self._fixed, dtype=bool)

    @property
    def output(self) -> np.ndarray:
        return np.array(self._output, dtype=bool)
