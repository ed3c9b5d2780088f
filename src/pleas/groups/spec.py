"""The permutation spec: which entries of which parameter axes move together, as plain data.

A :class:`Group` is one set of ``width`` interchangeable hidden units. Every parameter axis that indexes
them is a :class:`Member`; permuting the group permutes every member the same way. ``Member.index`` is
an integer array (width, copies): the positions along the axis of each unit's entries. Most members are
*regular*: unit i owns the ``copies`` consecutive entries ``offset + i*copies + t`` (a Linear reading
flattened conv features: channel c owns ``c*H*W ... (c+1)*H*W-1``), or, copy-major, ``offset + t*width
+ i``. Others (a channel shuffle interleaves two groups) list their positions.

``role`` says how a member enters a layer: ``"out"`` for axes that produce or scale a unit (a weight's
output axis, a bias, norm parameters and statistics), ``"in"`` for axes summed over by the next layer (a
weight's input axis). Merging averages ``out`` members and copies ``in`` members; widening duplicates
``out`` members and splits ``in`` members. A :class:`Site` is an activation that a layer reads the
group's units from: statistics for matching and least squares are taken there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SpecError

ROLES = ("out", "in")
FORMAT = "pleas.spec/2"


def _regular(index: torch.Tensor) -> dict | None:
    """The compact form of a member's positions, if it has one: {"offset", "copies", "major"}."""
    width, copies = index.shape
    if index.numel() == 0:
        return None
    offset = int(index.min())
    unit_major = offset + torch.arange(width * copies).view(width, copies)
    if torch.equal(index, unit_major):
        return {"offset": offset, "copies": copies, "major": "unit"}
    copy_major = offset + torch.arange(width * copies).view(copies, width).T
    if torch.equal(index, copy_major):
        return {"offset": offset, "copies": copies, "major": "copy"}
    return None


def regular_index(offset: int, width: int, copies: int, major: str = "unit") -> torch.Tensor:
    """Positions (width, copies) of a regular layout (see the module docstring)."""
    if major == "unit":
        return offset + torch.arange(width * copies).view(width, copies)
    return offset + torch.arange(width * copies).view(copies, width).T.contiguous()


@dataclass(eq=False)
class Member:
    """One parameter axis that indexes a group's units: ``index[i, t]`` is the position of copy t of
    unit i along axis ``axis`` of state-dict entry ``param``."""

    param: str
    axis: int
    role: str
    index: torch.Tensor

    def __post_init__(self):
        if self.role not in ROLES:
            raise SpecError(f"member {self.param}:{self.axis} has role {self.role!r}; allowed: {ROLES}")
        self.index = torch.as_tensor(self.index, dtype=torch.long).reshape(self.index.shape[0], -1)

    @property
    def copies(self) -> int:
        return self.index.shape[1]

    @property
    def regular(self) -> dict | None:
        return _regular(self.index)

    def describe(self) -> str:
        text = f"{self.param}:{self.axis}" + ("(in)" if self.role == "in" else "")
        reg = self.regular
        if reg is None:
            return text + "[listed]"
        if reg["offset"]:
            text += f"@{reg['offset']}"
        if reg["copies"] != 1:
            text += f"x{reg['copies']}" + ("T" if reg["major"] == "copy" else "")
        return text

    def to_dict(self) -> dict:
        out = {"param": self.param, "axis": self.axis, "role": self.role}
        reg = self.regular
        if reg is None:
            out["index"] = self.index.tolist()
        else:
            out.update(reg)
        return out

    @classmethod
    def from_dict(cls, d: dict, width: int) -> "Member":
        if "index" in d:
            index = torch.tensor(d["index"], dtype=torch.long).reshape(width, -1)
        else:
            index = regular_index(d.get("offset", 0), width, d.get("copies", d.get("repeat", 1)), d.get("major", "unit"))
        return cls(d["param"], d["axis"], d["role"], index)


@dataclass(eq=False)
class Site:
    """An activation (captured node ``node``) whose dimensions ``dims`` carry the group's units:
    ``index[i, t]`` is the position of copy t of unit i among the entries of those dimensions,
    flattened in row-major order. Every other entry of the tensor (batch, positions, tokens) is a sample."""

    node: str
    dims: tuple[int, ...]
    index: torch.Tensor

    def __post_init__(self):
        self.dims = tuple(self.dims)
        self.index = torch.as_tensor(self.index, dtype=torch.long).reshape(self.index.shape[0], -1)

    def to_dict(self) -> dict:
        out = {"node": self.node, "dims": list(self.dims)}
        reg = _regular(self.index)
        if reg is None:
            out["index"] = self.index.tolist()
        else:
            out.update(reg)
        return out

    @classmethod
    def from_dict(cls, d: dict, width: int) -> "Site":
        if "index" in d:
            index = torch.tensor(d["index"], dtype=torch.long).reshape(width, -1)
        else:
            index = regular_index(d.get("offset", 0), width, d.get("copies", 1), d.get("major", "unit"))
        return cls(d["node"], tuple(d["dims"]), index)


@dataclass(eq=False)
class Group:
    """One permutation group: ``width`` units shared by all ``members`` and carried by ``sites``.

    ``tie`` names the groups whose widths must keep their proportions in a rewritten model (the blocks of
    a grouped convolution, the pieces of a tensor split in chunks): every group of a tie merges the same
    fraction of its units. None if the width is free.
    """

    name: str
    width: int
    members: list[Member] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    tie: str | None = None

    def random_permutation(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randperm(self.width, generator=generator)

    def to_dict(self) -> dict:
        return {"name": self.name, "width": self.width, "tie": self.tie,
                "members": [m.to_dict() for m in self.members], "sites": [s.to_dict() for s in self.sites]}

    @classmethod
    def from_dict(cls, d: dict) -> "Group":
        w = d["width"]
        return cls(d["name"], w, [Member.from_dict(m, w) for m in d["members"]],
                   [Site.from_dict(s, w) for s in d.get("sites", [])], d.get("tie"))


class PermutationSpec:
    """The groups of a model, in topological order, with look-ups by group and by parameter.

    ``outputs`` are the output axes (class axes): not permutable, but kept apart when heads are separate.
    ``positions[weight]`` is the number of output positions per sample of a linear map (tokens, pixels):
    its multiply-adds are that times the weight's size. ``aliases`` maps a state-dict key to the key it
    shares its tensor with (tied weights), ``views[key]`` says how a tensor stored compressed reads as the
dense tensor its members index (``("blockdiag", groups)``: a grouped convolution's weight), and
``notes`` says where symmetries were given up.
    """

    def __init__(self, groups: list[Group], *, input_shape: tuple[int, ...] | None = None,
                 outputs: list[Group] | None = None, positions: dict[str, int] | None = None,
                 aliases: dict[str, str] | None = None, notes: list[str] | None = None,
                 views: dict[str, tuple[str, int]] | None = None):
        names = [g.name for g in list(groups) + list(outputs or [])]
        if len(set(names)) != len(names):
            raise SpecError(f"group names must be unique, got duplicates in {names}")
        self.groups = list(groups)
        self.outputs = list(outputs or [])
        self.positions = dict(positions or {})
        self.aliases = dict(aliases or {})
        self.notes = list(notes or [])
        self.views = {k: tuple(v) for k, v in (views or {}).items()}
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
            raise KeyError(f"no group named {name!r}; groups: {list(self._by_name)[:20]}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

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

    def ties(self) -> dict[str, list[str]]:
        """Tie name -> the groups that must keep their proportions (only ties of two or more groups)."""
        out: dict[str, list[str]] = {}
        for g in self.groups:
            if g.tie is not None:
                out.setdefault(g.tie, []).append(g.name)
        return {k: v for k, v in out.items() if len(v) > 1}

    def tie(self, names: list[str]) -> None:
        """Tie the groups ``names`` (and whatever they are tied to already): they keep their proportions."""
        present = [self[n] for n in names if n in self]
        if len(present) < 2:
            return
        ties = {g.tie or g.name for g in present}
        name = next(g.tie or g.name for g in self.groups if (g.tie or g.name) in ties)
        for g in self.groups:
            if (g.tie or g.name) in ties:
                g.tie = name

    def with_outputs(self) -> "PermutationSpec":
        """This spec with the output axes as ordinary groups (for separate heads, never merged)."""
        return PermutationSpec(self.groups + self.outputs, input_shape=self.input_shape, positions=self.positions,
                               aliases=self.aliases, notes=self.notes, views=self.views)

    def random_permutations(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """One random permutation per group, reproducible from ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        return {g.name: g.random_permutation(gen) for g in self.groups}

    def __str__(self) -> str:
        lines = [f"PermutationSpec: {len(self.groups)} groups"]
        for g in self.groups:
            tie = f" tie={g.tie}" if g.tie and g.tie != g.name else ""
            members = ", ".join(m.describe() for m in g.members)
            lines.append(f"  {g.name}: width={g.width}{tie} sites={len(g.sites)} members: {members}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    __repr__ = __str__

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "groups": [g.to_dict() for g in self.groups],
            "outputs": [g.to_dict() for g in self.outputs],
            "positions": self.positions,
            "aliases": self.aliases,
            "views": {k: list(v) for k, v in self.views.items()},
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PermutationSpec":
        if data.get("format") != FORMAT:
            raise SpecError(f"not a pleas spec (format={data.get('format')!r}; expected {FORMAT!r})")
        return cls([Group.from_dict(g) for g in data["groups"]], input_shape=data.get("input_shape"),
                   outputs=[Group.from_dict(g) for g in data.get("outputs", [])], positions=data.get("positions", {}),
                   aliases=data.get("aliases", {}), notes=data.get("notes", []), views=data.get("views", {}))

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            from ..files import write_text_atomically

            write_text_atomically(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "PermutationSpec":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    def require_groups(self) -> "PermutationSpec":
        """This spec, or a SpecError if it has no permutable group (nothing to merge)."""
        if not self.groups:
            raise SpecError("the model has no permutable units (every unit axis is an input or an output)")
        return self

    def check_state_dict(self, state_dict: dict[str, torch.Tensor], what: str = "state dict") -> None:
        """Raise :class:`SpecError` unless every member fits the tensor it names."""
        for g in self.groups + self.outputs:
            for m in g.members:
                if m.param not in state_dict:
                    raise SpecError(f"{what} has no entry {m.param!r} (group {g.name})")
                t = state_dict[m.param]
                if m.axis >= t.dim() or (m.index.numel() and t.shape[m.axis] <= int(m.index.max())):
                    raise SpecError(
                        f"{what}[{m.param!r}] has shape {tuple(t.shape)}; group {g.name} of width {g.width} "
                        f"needs axis {m.axis} to hold {m.index.numel()} of its entries"
                    )
