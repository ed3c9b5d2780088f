"""Union-find over unit axes, and the feature description attached to each traced tensor.

Every op output that creates new units (a Linear, a Conv) gets a fresh *axis set*; ops that tie units
together (a residual add, a norm layer) unite sets. At the end each root set with members is a group.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SpecError
from ..spec import Member, Site


@dataclass(frozen=True)
class Segment:
    """``width`` units of axis set ``axis_set``, each spanning ``repeat`` consecutive entries."""

    axis_set: int
    width: int
    repeat: int = 1

    @property
    def size(self) -> int:
        return self.width * self.repeat


@dataclass(frozen=True)
class Features:
    """Which dimension of a tensor indexes units, and how that dimension splits into segments."""

    dim: int
    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    def with_dim(self, dim: int) -> "Features":
        return Features(dim, self.segments)

    def repeated(self, factor: int) -> "Features":
        """The same units when each entry of the dimension is expanded into ``factor`` entries."""
        return Features(self.dim, tuple(Segment(s.axis_set, s.width, s.repeat * factor) for s in self.segments))


class AxisSets:
    """Union-find over axis sets with their width, members, sites and constraints."""

    def __init__(self):
        self._parent: list[int] = []
        self._width: list[int] = []
        self._fixed: list[bool] = []
        self._output: list[bool] = []
        self._block: list[int] = []
        self._origin: list[str] = []
        self._members: list[tuple[int, Member]] = []
        self._sites: list[tuple[int, Site]] = []

    def new(self, width: int, origin: str, *, fixed: bool = False) -> int:
        self._parent.append(len(self._parent))
        self._width.append(int(width))
        self._fixed.append(fixed)
        self._output.append(False)
        self._block.append(1)
        self._origin.append(origin)
        return len(self._parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[a] != root:
            self._parent[a], a = root, self._parent[a]
        return root

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self._width[ra] != self._width[rb]:
            raise SpecError(
                f"{where}: cannot tie units of width {self._width[ra]} ({self._origin[ra]}) "
                f"to units of width {self._width[rb]} ({self._origin[rb]})"
            )
        keep, drop = min(ra, rb), max(ra, rb)  # the earlier set names the group: topological order
        self._parent[drop] = keep
        self._fixed[keep] = self._fixed[keep] or self._fixed[drop]
        self._output[keep] = self._output[keep] or self._output[drop]
        self._block[keep] = self._merge_block(self._block[keep], self._block[drop], where)
        return keep

    def fix(self, a: int) -> None:
        """Make a set non-permutable (it meets a network input)."""
        self._fixed[self.find(a)] = True

    def mark_output(self, a: int) -> None:
        """Make a set non-permutable because it is (part of) the network's output."""
        self._output[self.find(a)] = True

    def set_block(self, a: int, block: int, where: str) -> None:
        r = self.find(a)
        self._block[r] = self._merge_block(self._block[r], block, where)

    @staticmethod
    def _merge_block(a: int, b: int, where: str) -> int:
        if a == 1 or a == b:
            return b
        if b == 1:
            return a
        raise SpecError(f"{where}: units grouped in blocks of {a} and of {b} by two GroupNorms; unsupported")

    def add_member(self, a: int, member: Member) -> None:
        self._members.append((a, member))

    def add_site(self, a: int, site: Site) -> None:
        self._sites.append((a, site))

    def is_fixed(self, a: int) -> bool:
        return self._fixed[self.find(a)]

    def origin(self, a: int) -> str:
        return self._origin[self.find(a)]

    def groups(self, *, outputs: bool = False):
        """Yield (root, width, block, members, sites) for every set with members, in order: the
        permutable ones, or with ``outputs=True`` the output axes that touch no network input."""
        members: dict[int, list[Member]] = {}
        sites: dict[int, list[Site]] = {}
        for a, m in self._members:
            members.setdefault(self.find(a), []).append(m)
        for a, s in self._sites:
            root = self.find(a)
            if s not in sites.setdefault(root, []):
                sites[root].append(s)
        for root in sorted(members):
            if self._fixed[root] or self._output[root] != outputs:
                continue
            yield root, self._width[root], self._block[root], members[root], sites.get(root, [])
