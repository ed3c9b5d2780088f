"""Pure functions that rewrite state dicts group by group: permute, widen, merge (see :mod:`.maps`).

A tensor's new value is  sum_k  T_k  x_{out axes} merge[:, block k]  x_{in axes} unmerge[block k, :]^T,
read at the source spec's positions and written at the target spec's (:mod:`.layout`). Because each
model's tensor only meets its own blocks, a weight whose output and input groups are both kept apart gets
zero cross blocks (A-only rows never read B-only inputs), and with merge = unmerge^T = I the result is the
models side by side. Entries of an axis outside every group (network inputs, a shared class axis) are
averaged where the axis produces values and kept where it reads them; a tensor with no ``out`` member (a
shared classifier head, a scalar) is averaged over the models. A tensor stored compressed (a grouped
convolution's weight) is rewritten as the dense tensor it stands for (:mod:`.views`), and tied tensors
(spec aliases) take the value of the tensor they share.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..groups.spec import Member, PermutationSpec
from . import views
from .layout import resized
from .maps import GroupMap, duplication_map, permutation_map


def transform_state_dicts(
    spec: PermutationSpec,
    state_dicts: list[dict[str, torch.Tensor]],
    maps: dict[str, GroupMap],
    *,
    target: PermutationSpec | None = None,
) -> dict[str, torch.Tensor]:
    """Rewrite ``n`` state dicts of one architecture into one, group by group.

    ``spec`` gives the source positions (its groups and outputs), ``target`` the positions at the new
    widths (default: :func:`~pleas.rewrite.layout.resized`). With one state dict, groups missing from
    ``maps`` are left as they are; with several, every group needs a map. Tensors are combined in float64
    (or in their own dtype where that is bit-identical: permutations, partial merges and ensembles of two
    models) and returned in their original dtype.
    """
    n = len(state_dicts)
    if n == 0:
        raise ValueError("transform_state_dicts needs at least one state dict")
    keys = list(state_dicts[0])
    for k, sd in enumerate(state_dicts[1:], start=1):
        if list(sd) != keys:
            missing = set(keys) ^ set(sd)
            raise SpecError(f"state dict {k} has different entries than state dict 0: {sorted(missing)[:5]}")
    for i, sd in enumerate(state_dicts):
        spec.check_state_dict(_dense(spec, sd), what=f"state dict {i}")
    groups = spec.groups + spec.outputs
    for g in groups:
        if g.name not in maps:
            if n > 1 and g in spec.groups:
                raise SpecError(f"no map for group {g.name!r}; merging {n} models needs one for every group")
            continue
        if maps[g.name].shape[1] != n * g.width:
            raise SpecError(
                f"map of group {g.name!r} acts on {maps[g.name].shape[1]} stacked units; "
                f"{n} models of width {g.width} give {n * g.width}"
            )
    if target is None:
        target = resized(spec, {name: gm.width for name, gm in maps.items()})
    tgt = {g.name: g for g in target.groups + target.outputs}
    exact = {name: _exact_in_any_dtype(m, n) for name, m in maps.items()}
    out = {}
    for key in keys:
        if key in spec.aliases and spec.aliases[key] in state_dicts[0]:
            continue
        tensors = [views.dense(spec, key, sd[key]) for sd in state_dicts]
        pairs = [(g, m, _twin(tgt[g.name], m)) for g, m in spec.members_of(key) if g.name in maps]
        pairs += [(g, m, _twin(tgt[g.name], m)) for g in spec.outputs if g.name in maps
                  for m in g.members if m.param == key]
        out[key] = views.stored(spec, key, _combine(tensors, pairs, maps, exact, n))
    for key, canonical in spec.aliases.items():
        if key in state_dicts[0]:
            out[key] = out[canonical]
    return {k: out[k] for k in keys}


def _twin(group, member: Member) -> Member:
    for m in group.members:
        if m.param == member.param and m.axis == member.axis:
            return m
    raise SpecError(f"the target spec's group {group.name} has no member {member.param}:{member.axis}")


def _dense(spec: PermutationSpec, sd: dict) -> dict:
    return {k: views.dense(spec, k, t) if k in spec.views else t for k, t in sd.items()}


def _exact_in_any_dtype(gm: GroupMap, n: int) -> bool:
    """Whether rewriting with ``gm`` rounds once at most, in any floating dtype: each model's block of
    the merge and unmerge matrices picks at most one unit per new unit, scaled by 1 or 1/2 (permutations,
    partial merges, ensembles), and at most two models' rewrites are added. Then computing in the
    tensor's own dtype gives the float64 result rounded to it, bit for bit."""
    if n > 2:
        return False
    for which, new_axis in (("merge", 0), ("unmerge", 1)):
        entries = gm.entries(which)
        v = entries[2]
        if not bool(((v == 1) | (v == 0.5)).all()):
            return False
        d = gm.shape[1] // n
        new, old = entries[new_axis], entries[1 - new_axis]
        for k in range(n):
            picked = new[(old >= k * d) & (old < (k + 1) * d)]
            if len(picked) and int(torch.bincount(picked).max()) > 1:
                return False
    return True


#: Rewritten tensors larger than this are built in slices of their first rewritten axis, each slice summed
#: over the models and written into the result: no model's whole rewritten copy, nor float64 copy, exists.
CHUNK_BYTES = 64 << 20


def _combine(tensors: list[torch.Tensor], pairs: list, maps: dict[str, GroupMap], exact: dict[str, bool], n: int):
    dtype = tensors[0].dtype
    if not dtype.is_floating_point:
        return tensors[0].clone()  # counters such as num_batches_tracked
    if not pairs:
        return (sum(t.double() for t in tensors) / n).to(dtype)
    # float64 unless every map involved rounds at most once (then the tensor's own dtype is exact)
    work = dtype if all(exact[g.name] for g, _, _ in pairs) else torch.float64
    by_axis: dict[int, list] = {}
    for g, m, t in pairs:
        by_axis.setdefault(m.axis, []).append((g, m, t))
    has_out = any(m.role == "out" for _, m, _ in pairs)
    axes = sorted(by_axis)
    # one sparse matrix per (model, axis): small (about one entry per new index)
    mats = [{a: axis_matrix(by_axis[a], t.shape[a], k, n, maps, _role(by_axis[a]), work) for a in axes}
            for k, t in enumerate(tensors)]
    shape = list(tensors[0].shape)
    for a in axes:
        shape[a] = mats[0][a].shape[0]
    first = axes[0]
    per_row = max(torch.Size(shape).numel() // max(shape[first], 1), 1) * torch.finfo(work).bits // 8
    step = max(CHUNK_BYTES // per_row, 1)
    out = torch.empty(shape, dtype=dtype)
    for lo in range(0, shape[first], step):
        hi = min(lo + step, shape[first])
        total = None
        for k, t in enumerate(tensors):
            rows, used = _rows(mats[k][first], lo, hi)
            if used is not None and not len(used):
                continue  # this model writes nothing in these rows
            source = t if used is None else t.index_select(first, used)
            part = _apply(source.to(work), first, rows)
            for a in axes[1:]:
                part = _apply(part, a, mats[k][a])
            total = part if total is None else total.add_(part)
        if total is None:
            total = torch.zeros(1, dtype=work)
        elif not has_out:
            total = total / n
        out.narrow(first, lo, hi - lo).copy_(total)
    return out


def _role(items: list) -> str:
    roles = {m.role for _, m, _ in items}
    if len(roles) > 1:
        raise SpecError(f"axis {items[0][1].axis} of {items[0][1].param} is both an input and an output axis")
    return roles.pop()


def _rows(matrix: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows lo:hi of a coalesced sparse COO matrix over only the columns they read, and those columns
    (None: the whole matrix, every column)."""
    if lo == 0 and hi == matrix.shape[0]:
        return matrix, None
    index, values = matrix.indices(), matrix.values()
    keep = ((index[0] >= lo) & (index[0] < hi)).nonzero().squeeze(1)
    used, cols = torch.unique(index[1, keep], return_inverse=True)
    index = torch.stack([index[0, keep] - lo, cols])
    return torch.sparse_coo_tensor(index, values[keep], (hi - lo, len(used)), check_invariants=False).coalesce(), used


def _apply(t: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """``t`` with axis ``axis`` multiplied by the sparse ``matrix`` (new length, old length)."""
    moved = t.movedim(axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    out = torch.sparse.mm(matrix, flat) if flat.numel() else flat.new_zeros((matrix.shape[0], flat.shape[1]))
    return out.reshape(matrix.shape[0], *moved.shape[1:]).movedim(0, axis)


def rewrite_axis(t: torch.Tensor, axis: int, items: list, k: int, n: int, maps: dict[str, GroupMap],
                 role: str | None = None) -> torch.Tensor:
    """Model ``k``'s tensor ``t`` with axis ``axis`` rewritten: ``items`` are (group, source member,
    target member) triples on that axis. Entries outside every group keep their order (divided by n on
    an axis that produces values, so that summing the n models' rewrites averages them).

    The rewrite of the whole axis is one sparse (new length x old length) matrix, applied in one product:
    each new entry reads a few old ones (one for a permutation, two for a merged pair)."""
    roles = {m.role for _, m, _ in items} if role is None else {role}
    if len(roles) > 1:
        raise SpecError(f"axis {axis} of {items[0][1].param} is both an input and an output axis")
    role = roles.pop()
    matrix = axis_matrix(items, t.shape[axis], k, n, maps, role, t.dtype)
    moved = t.movedim(axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    out = torch.sparse.mm(matrix, flat) if flat.numel() else flat.new_zeros((matrix.shape[0], flat.shape[1]))
    return out.reshape(matrix.shape[0], *moved.shape[1:]).movedim(0, axis)


def axis_matrix(items: list, length: int, k: int, n: int, maps: dict[str, GroupMap], role: str,
                dtype: torch.dtype) -> torch.Tensor:
    """The sparse (new length, ``length``) matrix that rewrites model ``k``'s entries of one axis."""
    rows, cols, vals = [], [], []
    src_cover = torch.cat([m.index.reshape(-1) for _, m, _ in items])
    tgt_cover = torch.cat([tm.index.reshape(-1) for _, _, tm in items])
    new_length = length + sum(tm.index.numel() - m.index.numel() for _, m, tm in items)
    src_rest, tgt_rest = _complement(src_cover, length), _complement(tgt_cover, new_length)
    if len(src_rest) != len(tgt_rest):
        raise SpecError(f"the target layout of {items[0][1].param} axis keeps {len(tgt_rest)} entries outside its "
                        f"groups, the source {len(src_rest)}")
    rows.append(tgt_rest)
    cols.append(src_rest)
    vals.append(torch.full((len(src_rest),), 1.0 / n if role == "out" else 1.0, dtype=torch.float64))
    for g, m, tm in items:
        j, i, v = maps[g.name].block(k, n, role)  # new unit j reads old unit i
        copies = m.index.shape[1]
        rows.append(tm.index[j].reshape(-1))  # (nnz, copies): copy t of new unit j ...
        cols.append(m.index[i].reshape(-1))  # ... reads copy t of old unit i
        vals.append(v.repeat_interleave(copies))
    index = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(index, torch.cat(vals).to(dtype), (new_length, length),
                                   check_invariants=False).coalesce()


def _complement(cover: torch.Tensor, length: int) -> torch.Tensor:
    mask = torch.ones(length, dtype=torch.bool)
    mask[cover] = False
    return mask.nonzero().squeeze(1)


def permute_state_dict(
    state_dict: dict[str, torch.Tensor], spec: PermutationSpec, perms: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Apply ``perms[g]`` (new unit j = old unit ``perms[g][j]``) to every member of every group."""
    return transform_state_dicts(spec, [state_dict], {g: permutation_map(p) for g, p in perms.items()}, target=spec)


def combine_activations(tensors: list[torch.Tensor], dims: tuple[int, ...], items: list, maps: dict[str, GroupMap],
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The rewritten model's view of one activation, from the n source models' copies of it.

    ``items`` are (group, source site, target site) triples locating groups in the flattened dimensions
    ``dims`` of the activation. Each group's units become ``merge @ stacked units`` (docs/algorithm.md section
    4: X~ = [(X_A[merged] + X_B^pi[merged]) / 2, X_A[A-only], X_B^pi[B-only]]); entries outside every
    group (network inputs, a shared output) are averaged. Computed in ``dtype`` (the merge matrices hold
    0, 1/2 and 1, so float32 loses nothing beyond the inputs' own precision).
    """
    n = len(tensors)
    items = [it for it in items if it[0].name in maps]
    if not items:
        return sum(t.to(dtype) for t in tensors) / n
    if len(dims) != 1:
        raise SpecError(f"activations with units on several dimensions {dims} cannot be combined yet")
    dim = dims[0] % tensors[0].dim()
    as_members = [(g, _as_member(s), _as_member(ts)) for g, s, ts in items]
    return sum(rewrite_axis(t.to(dtype), dim, as_members, k, n, maps, role="out") for k, t in enumerate(tensors))


def _as_member(site) -> Member:
    return Member("<activation>", 0, "out", site.index)


__all__ = ["GroupMap", "combine_activations", "duplication_map", "permutation_map", "permute_state_dict",
           "rewrite_axis", "transform_state_dicts"]
