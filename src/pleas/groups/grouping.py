"""From tied unit ids to permutation groups.

Tied ids form *classes* (one hidden unit, wherever it appears). Two classes are interchangeable when they
appear in exactly the same parameter axes and sites, the same number of times, and carry the same tags
(a grouped convolution tags each unit with its convolution group; units may only move within it); each
set of interchangeable classes is one group. A class met by a network input is not permutable; one that
reaches the output is an output axis. Where a class appears several times along one axis (a Linear
reading flattened conv features: each channel spans H*W entries), its copies are numbered in order of
position; a permutation moves copy t of one unit onto copy t of another. Groups whose units a shape op
splits into pieces (chunks, a channel shuffle, the blocks of a grouped convolution) are *tied*: in any
rewritten model they keep their proportions, so the code's own split of the new widths finds them again.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..errors import SpecError
from ..ops.units import UnitTable


@dataclass
class GroupData:
    """One group as found by :func:`group_units`: its name, the member and site positions, and the
    name of the tie class (groups that must keep their proportions)."""

    name: str
    width: int
    members: list  # (param, axis, role, index (width, copies))
    sites: list  # (node, dims, index (width, copies) into the site's flattened carrying dimensions)
    tie: str | None = None
    output: bool = False


def group_units(table: UnitTable) -> tuple[list[GroupData], list[GroupData]]:
    """(permutable groups, output groups) of a finished analysis, each in creation order (see the
    module docstring)."""
    roots = table.roots()
    n = len(roots)
    fixed = np.zeros(n, dtype=bool)
    output = np.zeros(n, dtype=bool)
    fixed_units = table.fixed
    output_units = table.output
    np.logical_or.at(fixed, roots, fixed_units)
    np.logical_or.at(output, roots, output_units)

    signature: dict[int, list] = defaultdict(list)
    member_classes = []
    for key, m in table.members.items():
        cls = roots[m.ids]
        member_classes.append((key, m, cls))
        values, counts = np.unique(cls, return_counts=True)
        for c, k in zip(values.tolist(), counts.tolist()):
            signature[c].append(("m", key, k))
    site_classes = []
    for i, (node, units) in enumerate(table.sites):
        cls = roots[units.flat()]
        site_classes.append((node, units, cls))
        values, counts = np.unique(cls, return_counts=True)
        for c, k in zip(values.tolist(), counts.tolist()):
            signature[c].append(("s", i, k))
    tags: dict[int, set] = defaultdict(set)
    for t, (ids, values) in enumerate(table.tags):
        for c, v in zip(roots[ids].tolist(), values.tolist()):
            tags[c].add((t, v))
    for c in list(signature):
        signature[c].append(("t", tuple(sorted(tags.get(c, ())))))

    by_signature: dict[tuple, list[int]] = defaultdict(list)
    for c in sorted(signature):
        if fixed[c]:
            continue
        if not any(kind == "m" for kind, *_ in signature[c]):
            continue  # a unit no parameter touches: nothing to permute
        by_signature[(bool(output[c]), tuple(signature[c]))].append(c)

    found = sorted(by_signature.items(), key=lambda item: item[1][0])
    used: set[str] = set()
    permutable, outputs = [], []
    group_of = np.full(n, -1, dtype=np.int64)
    datas = []
    for (is_output, _), classes in found:
        base = table.origin(classes[0])
        name, i = base, 1
        while name in used:
            i += 1
            name = f"{base}#{i}"
        used.add(name)
        rank = np.full(n, -1, dtype=np.int64)
        rank[classes] = np.arange(len(classes))
        members = []
        for (param, axis), m, cls in member_classes:
            r = rank[cls]
            if (r >= 0).any():
                members.append((param, axis, m.role, _positions(r, len(classes), f"{param} axis {axis}")))
        sites = []
        for node, units, cls in site_classes:
            r = rank[cls]
            if (r >= 0).any():
                sites.append((node, units.dims, _positions(r, len(classes), f"activation {node}")))
        data = GroupData(name, len(classes), members, sites, output=is_output)
        group_of[classes] = len(datas)
        datas.append(data)
        (outputs if is_output else permutable).append(data)
    _apply_ties(table, datas, group_of[roots])
    return permutable, outputs

def _apply_ties(table: UnitTable, datas: list[GroupData], group_of_unit: np.ndarray) -> None:
    parent = list(range(len(datas)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for ids in table.ties:
        touched = sorted({int(g) for g in group_of_unit[ids].tolist() if g >= 0})
        for g in touched[1:]:
            a, b = find(touched[0]), find(g)
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(datas)):
        members[find(i)].append(i)
    for root, idx in members.items():
        if len(idx) > 1:
            for i in idx:
                datas[i].tie = datas[root].name



def _positions(rank: np.ndarray, width: int, where: str) -> np.ndarray:
    """(width, copies) positions of every unit's entries, given each entry's unit rank (-1: not in the
    group); copies in order of position."""
    entries = np.flatnonzero(rank >= 0)
    ranks = rank[entries]
    order = np.argsort(ranks, kind="stable")
    counts = np.bincount(ranks, minlength=width)
    if counts.min() != counts.max():
        raise SpecError(f"{where}: units of one group appear a different number of times ({counts.min()} to "
                        f"{counts.max()})")
    return entries[order].reshape(width, int(counts[0]))
