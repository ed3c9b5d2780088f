"""Where a rewritten model's units sit: the spec of a model whose groups have new widths.

A rewrite reads the source units at the positions of the source spec and writes the new units at the
positions of a *target* spec, the same groups at their new widths. :func:`resized` computes it for
regular layouts (each member and site a contiguous run, unit-major or copy-major: everything but
interleaved channels); a model whose code interleaves groups (a channel shuffle) gets its target spec by
capturing the rewritten architecture itself (:func:`pleas.rewrite.rebuild.target_spec`).
"""
from __future__ import annotations

from ..errors import SpecError
from ..groups.spec import Group, Member, PermutationSpec, Site, regular_index


def _runs(items: list[tuple[str, object]], what: str) -> list[tuple[int, int, str, object]]:
    """(start, size, group name, item) of each regular run along one axis, in order, checked disjoint."""
    runs = []
    for name, item in items:
        reg = _regularity(item)
        if reg is None:
            raise SpecError(f"{what}: group {name}'s entries are interleaved with others'; this layout is "
                            "resized by capturing the rewritten model (pleas.rewrite.rebuild.target_spec)")
        runs.append((reg["offset"], item.index.numel(), name, item))
    runs.sort(key=lambda r: r[0])
    for (s0, n0, g0, _), (s1, _, g1, _) in zip(runs, runs[1:]):
        if s0 + n0 > s1:
            raise SpecError(f"{what}: groups {g0} and {g1} overlap or interleave; this layout is resized by "
                            "capturing the rewritten model (pleas.rewrite.rebuild.target_spec)")
    return runs


def _regularity(item) -> dict | None:
    from ..groups.spec import _regular

    return _regular(item.index)


def resized(spec: PermutationSpec, widths: dict[str, int]) -> PermutationSpec:
    """``spec`` with group g at width ``widths[g]`` (groups not named keep theirs): every axis keeps its
    runs in order, each run growing or shrinking with its group, and the entries outside every group in
    place between them."""
    groups = spec.groups + spec.outputs
    new_width = {g.name: widths.get(g.name, g.width) for g in groups}
    by_axis: dict[tuple[str, int], list] = {}
    for g in groups:
        for m in g.members:
            by_axis.setdefault((m.param, m.axis), []).append((g.name, m))
    new_members: dict[int, Member] = {}
    for (param, axis), items in by_axis.items():
        shift = 0
        for start, size, name, m in _runs(items, f"{param} axis {axis}"):
            reg = _regularity(m)
            new_members[id(m)] = Member(param, axis, m.role, regular_index(start + shift, new_width[name], m.copies,
                                                                          reg["major"]))
            shift += (new_width[name] - _width(groups, name)) * m.copies
    by_site: dict[tuple[str, tuple], list] = {}
    for g in groups:
        for s in g.sites:
            by_site.setdefault((s.node, s.dims), []).append((g.name, s))
    new_sites: dict[int, Site] = {}
    for (node, dims), items in by_site.items():
        shift = 0
        for start, size, name, s in _runs(items, f"activation {node}"):
            reg = _regularity(s)
            new_sites[id(s)] = Site(node, dims, regular_index(start + shift, new_width[name], s.index.shape[1],
                                                              reg["major"]))
            shift += (new_width[name] - _width(groups, name)) * s.index.shape[1]

    def rebuilt(g: Group) -> Group:
        return Group(g.name, new_width[g.name], [new_members[id(m)] for m in g.members],
                     [new_sites[id(s)] for s in g.sites], g.tie)

    return PermutationSpec([rebuilt(g) for g in spec.groups], input_shape=spec.input_shape,
                           outputs=[rebuilt(g) for g in spec.outputs], positions=spec.positions,
                           aliases=spec.aliases, notes=spec.notes, views=spec.views)


def _width(groups: list[Group], name: str) -> int:
    for g in groups:
        if g.name == name:
            return g.width
    raise KeyError(name)


def axis_length(spec: PermutationSpec, param: str, axis: int, length: int, widths: dict[str, int]) -> int:
    """The length axis ``axis`` of ``param`` (``length`` entries in the source) takes at new widths."""
    total = length
    for g in spec.groups + spec.outputs:
        for m in g.members:
            if m.param == param and m.axis == axis:
                total += (widths.get(g.name, g.width) - g.width) * m.copies
    return total
