"""The permutation spec: which (parameter, axis) slices move together, as plain data.

A :class:`Group` is one set of hidden units. Every tensor axis that indexes those units is a
:class:`Member`; permuting the group means permuting every member the same way. A member may cover a
slice of an axis (``torch.cat`` along channels) and each unit may span ``repeat`` consecutive entries
(a Linear reading flattened conv features: channel ``c`` owns entries ``c*H*W ... (c+1)*H*W-1``).

``role`` says how a member enters a layer: ``"out"`` for axes that produce or scale a unit (a weight's
output axis, a bias, norm parameters and statistics), ``"in"`` for axes summed over by the next layer (a
weight's input axis). Merging averages ``out`` members and copies ``in`` members; widening duplicates
``out`` members and splits ``in`` members.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import SpecError

ROLES = ("out", "in")


@dataclass(frozen=True)
class Member:
    """A slice of one axis of one state-dict tensor that indexes a group's units."""

    param: str
    axis: int
    role: str
    offset: int = 0
    repeat: int = 1

    def __post_init__(self):
        if self.role not in ROLES:
            raise SpecError(f"member {self.param}:{self.axis} has role {self.role!r}; allowed: {ROLES}")

    def span(self, width: int) -> tuple[int, int]:
        """The half-open index range this member covers on its axis for a group of ``width`` units."""
        return self.offset, self.offset + width * self.repeat

    def describe(self) -> str:
        text = f"{self.param}:{self.axis}"
        if self.role == "in":
            text += "(in)"
        if self.offset:
            text += f"@{self.offset}"
        if self.repeat != 1:
            text += f"x{self.repeat}"
        return text


@dataclass(frozen=True)
class Site:
    """An activation that a layer reads the group's units from: graph node ``node``, whose dimension
    ``dim`` holds the units in entries [offset, offset + width*repeat), each unit spanning ``repeat``
    consecutive entries. Activation statistics and least-squares inputs are taken at sites."""

    node: str
    target: str
    dim: int
    offset: int = 0
    repeat: int = 1


@dataclass
class Group:
    """One permutation group: ``width`` units shared by all ``members`` and carried by ``sites``.

    ``block`` > 1 means the units come in contiguous blocks of that size that must stay together
    (a GroupNorm with 1 < groups < channels): a valid permutation maps blocks onto blocks.
    """

    name: str
    width: int
    members: list[Member] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    block: int = 1

    def random_permutation(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniformly random permutation of the group's units that respects ``block``."""
        nblocks = self.width // self.block
        order = torch.randperm(nblocks, generator=generator)
        inner = [torch.randperm(self.block, generator=generator) for _ in range(nblocks)]
        return torch.cat([order[b] * self.block + inner[b] for b in range(nblocks)])


class PermutationSpec:
    """The groups of a model, in topological order, with look-ups by group and by parameter."""

    def __init__(
        self,
        groups: list[Group],
        *,
        input_shape: tuple[int, ...] | None = None,
        outputs: list[Group] | None = None,
        positions: dict[str, int] | None = None,
    ):
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise SpecError(f"group names must be unique, got duplicates in {names}")
        self.groups = list(groups)
        # The output axes (class axes): not permutable, but kept apart when heads are separate.
        self.outputs = list(outputs or [])
        # Output positions per sample of each Linear/Conv weight (tokens, pixels): its FLOPs factor.
        self.positions = dict(positions or {})
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self._by_name = {g.name: g for g in self.groups}
        self._by_param: dict[str, list[tuple[Group, Member]]] = {}
        for g in self.groups:
            for m in g.members:
                self._by_param.setdefault(m.param, []).append((g, m))

    def __getitem__(self, name: str) -> Group:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no group named {name!r}; groups: {list(self._by_name)}") from None

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def widths(self) -> dict[str, int]:
        return {g.name: g.width for g in self.groups}

    def members_of(self, param: str) -> list[tuple[Group, Member]]:
        """The (group, member) pairs that touch state-dict entry ``param`` (empty if none)."""
        return self._by_param.get(param, [])

    @property
    def params(self) -> list[str]:
        return list(self._by_param)

    def with_outputs(self) -> "PermutationSpec":
        """This spec with the output axes as ordinary groups (for separate heads, never merged)."""
        return PermutationSpec(self.groups + self.outputs, input_shape=self.input_shape, positions=self.positions)

    def random_permutations(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """One random (block-respecting) permutation per group, reproducible from ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        return {g.name: g.random_permutation(gen) for g in self.groups}

    def __str__(self) -> str:
        lines = [f"PermutationSpec: {len(self.groups)} groups"]
        for g in self.groups:
            extra = f" block={g.block}" if g.block > 1 else ""
            members = ", ".join(m.describe() for m in g.members)
            lines.append(f"  {g.name}: width={g.width}{extra} sites={len(g.sites)} members: {members}")
        return "\n".join(lines)

    __repr__ = __str__

    def to_dict(self) -> dict:
        return {
            "format": "pleas.spec/1",
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "groups": [asdict(g) for g in self.groups],
            "outputs": [asdict(g) for g in self.outputs],
            "positions": self.positions,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PermutationSpec":
        if data.get("format") != "pleas.spec/1":
            raise SpecError(f"not a pleas spec (format={data.get('format')!r}; expected 'pleas.spec/1')")
        def group(g: dict) -> Group:
            return Group(
                name=g["name"],
                width=g["width"],
                members=[Member(**m) for m in g["members"]],
                sites=[Site(**s) for s in g["sites"]],
                block=g.get("block", 1),
            )

        return cls(
            [group(g) for g in data["groups"]],
            input_shape=data.get("input_shape"),
            outputs=[group(g) for g in data.get("outputs", [])],
            positions=data.get("positions", {}),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "PermutationSpec":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    def check_state_dict(self, state_dict: dict[str, torch.Tensor], what: str = "state dict") -> None:
        """Raise :class:`SpecError` unless every member fits the tensor it names."""
        for g in self.groups:
            for m in g.members:
                if m.param not in state_dict:
                    raise SpecError(f"{what} has no entry {m.param!r} (group {g.name})")
                t = state_dict[m.param]
                lo, hi = m.span(g.width)
                if m.axis >= t.dim() or t.shape[m.axis] < hi:
                    raise SpecError(
                        f"{what}[{m.param!r}] has shape {tuple(t.shape)}; group {g.name} of width {g.width} "
                        f"needs axis {m.axis} to cover [{lo}, {hi})"
                    )
