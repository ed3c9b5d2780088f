"""Pure functions that rewrite state dicts group by group: permute, widen, merge.

Every rewrite is one :class:`GroupMap` per group, over the *stacked* units of n source models
(model k's unit i is stacked unit ``k*d + i``), in the formulation of ZipIt!:

- ``merge``   (m, n*d): new unit j = sum_u merge[j, u] * stacked unit u. Applied to ``out`` members.
- ``unmerge`` (n*d, m): stacked unit u is read as sum_j unmerge[u, j] * new unit j. Applied to ``in``
  members (a layer's input axis), so a layer that read unit u now reads the new units it became.

A tensor's new value is  sum_k  T_k  x_{out axes} merge[:, block k]  x_{in axes} unmerge[block k, :]^T.
Because each model's tensor only meets its own blocks, a weight whose output and input groups are both
kept apart gets zero cross blocks (A-only rows never read B-only inputs), and with merge = unmerge^T = I
the result is the two models side by side. A tensor with no ``out`` member (a shared classifier head,
a scalar) is averaged over the models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import SpecError
from .spec import Member, PermutationSpec


@dataclass(frozen=True)
class GroupMap:
    """The merge (m, n*d) and unmerge (n*d, m) matrices of one group."""

    merge: torch.Tensor
    unmerge: torch.Tensor

    def __post_init__(self):
        if self.merge.dim() != 2 or self.unmerge.dim() != 2 or self.merge.shape != self.unmerge.shape[::-1]:
            raise SpecError(
                f"merge must be (m, n*d) and unmerge (n*d, m); got {tuple(self.merge.shape)} and "
                f"{tuple(self.unmerge.shape)}"
            )

    @property
    def width(self) -> int:
        """m, the number of units in the new model."""
        return self.merge.shape[0]


def permutation_map(perm: torch.Tensor) -> GroupMap:
    """New unit j is old unit ``perm[j]``: merge = P with P[j, perm[j]] = 1, unmerge = P^T."""
    d = len(perm)
    p = torch.zeros(d, d, dtype=torch.float64)
    p[torch.arange(d), perm.long()] = 1.0
    return GroupMap(p, p.T.clone())


def duplication_map(width: int, factor: int = 2) -> GroupMap:
    """Widen a group by repeating each unit ``factor`` times in place (unit i -> i*factor + r).

    Outputs are copied and each copy's outgoing weights are divided by ``factor`` (Net2Net widening),
    so the widened model computes the same function.
    """
    merge = torch.zeros(width * factor, width, dtype=torch.float64)
    merge[torch.arange(width * factor), torch.arange(width).repeat_interleave(factor)] = 1.0
    return GroupMap(merge, merge.T / factor)


def transform_state_dicts(
    spec: PermutationSpec,
    state_dicts: list[dict[str, torch.Tensor]],
    maps: dict[str, GroupMap],
) -> dict[str, torch.Tensor]:
    """Rewrite ``n`` state dicts of one architecture into one, group by group (see module docstring).

    With one state dict, groups missing from ``maps`` are left as they are; with several, every group
    needs a map. Tensors are combined in float64 (or in their own dtype where that is bit-identical:
    permutations, partial merges and ensembles of two models) and returned in their original dtype.
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
        spec.check_state_dict(sd, what=f"state dict {i}")
    for g in spec:
        if g.name not in maps:
            if n > 1:
                raise SpecError(f"no map for group {g.name!r}; merging {n} models needs one for every group")
            continue
        if maps[g.name].merge.shape[1] != n * g.width:
            raise SpecError(
                f"map of group {g.name!r} acts on {maps[g.name].merge.shape[1]} stacked units; "
                f"{n} models of width {g.width} give {n * g.width}"
            )
    exact = {name: _exact_in_any_dtype(m, n) for name, m in maps.items()}
    out = {}
    for key in keys:
        out[key] = _combine(key, spec, [sd[key] for sd in state_dicts], maps, exact)
    return out


def _exact_in_any_dtype(gm: GroupMap, n: int) -> bool:
    """Whether rewriting with ``gm`` rounds once at most, in any floating dtype: each model's block of
    the merge and unmerge matrices picks at most one unit per new unit, scaled by 1 or 1/2 (permutations,
    partial merges, ensembles), and at most two models' rewrites are added. Then computing in the
    tensor's own dtype gives the float64 result rounded to it, bit for bit."""
    if n > 2:
        return False
    for mat, along in ((gm.merge, 1), (gm.unmerge, 0)):
        if not bool(((mat == 0) | (mat == 1) | (mat == 0.5)).all()):
            return False
        for k in range(n):
            d = mat.shape[along] // n
            block = mat.narrow(along, k * d, d)
            if block.numel() and int((block != 0).sum(along).max()) > 1:
                return False
    return True


def permute_state_dict(
    state_dict: dict[str, torch.Tensor], spec: PermutationSpec, perms: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Apply ``perms[g]`` (new unit j = old unit ``perms[g][j]``) to every member of every group."""
    return transform_state_dicts(spec, [state_dict], {g: permutation_map(p) for g, p in perms.items()})


def combine_activations(
    tensors: list[torch.Tensor],
    dim: int,
    members: list[tuple],
    maps: dict[str, GroupMap],
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The merged model's view of one activation, from the n source models' copies of it.

    ``members`` are (group, member) pairs locating groups on dimension ``dim`` (offsets and repeats as
    in the weights that read the activation). Each group's slice becomes ``merge @ stacked units``
    (ALGORITHM.md section 4: X~ = [(X_A[merged] + X_B^pi[merged]) / 2, X_A[A-only], X_B^pi[B-only]]);
    entries outside every group (network inputs, a shared output) are averaged. Computed in ``dtype``
    (the merge matrices hold 0, 1/2 and 1, so float32 loses nothing beyond the inputs' own precision).
    """
    n = len(tensors)
    as_out = [(g, Member(m.param, dim, "out", m.offset, m.repeat)) for g, m in members if g.name in maps]
    if not as_out:
        return sum(t.to(dtype) for t in tensors) / n
    dim = dim % tensors[0].dim()
    return sum(_rewrite_axis(t.to(dtype), dim, as_out, k, n, maps) for k, t in enumerate(tensors))


def _combine(key: str, spec: PermutationSpec, tensors: list[torch.Tensor], maps: dict[str, GroupMap],
             exact: dict[str, bool]):
    n = len(tensors)
    members = [(g, m) for g, m in spec.members_of(key) if g.name in maps]
    dtype = tensors[0].dtype
    if not dtype.is_floating_point:
        return tensors[0].clone()  # counters such as num_batches_tracked
    if not members:
        return (sum(t.double() for t in tensors) / n).to(dtype)
    # float64 unless every map involved rounds at most once (then the tensor's own dtype is exact)
    work = dtype if all(exact[g.name] for g, _ in members) else torch.float64
    by_axis: dict[int, list] = {}
    for g, m in members:
        by_axis.setdefault(m.axis, []).append((g, m))
    has_out = any(m.role == "out" for _, m in members)
    total = None
    for k, t in enumerate(tensors):
        t = t.to(work)
        for axis, ms in sorted(by_axis.items()):
            t = _rewrite_axis(t, axis, ms, k, n, maps)
        total = t if total is None else total + t
    if not has_out:
        total = total / n
    return total.to(dtype)


def _rewrite_axis(t: torch.Tensor, axis: int, members: list, k: int, n: int, maps: dict[str, GroupMap]):
    """Rewrite the slices of ``axis`` that belong to groups with model ``k``'s block of each map."""
    roles = {m.role for _, m in members}
    if len(roles) > 1:
        raise SpecError(f"axis {axis} of {members[0][1].param} is both an input and an output axis")
    role = roles.pop()
    moved = t.movedim(axis, 0)
    pieces, pos = [], 0
    for g, m in sorted(members, key=lambda gm: gm[1].offset):
        lo, hi = m.span(g.width)
        if lo > pos:  # a slice of fixed (non-permutable) entries, e.g. concatenated input channels
            pieces.append(moved[pos:lo] / n if role == "out" else moved[pos:lo])
        gm = maps[g.name]
        d = g.width
        block = gm.merge[:, k * d : (k + 1) * d] if role == "out" else gm.unmerge[k * d : (k + 1) * d, :].T
        pieces.append(_apply_units(moved[lo:hi], block, m))
        pos = hi
    if pos < moved.shape[0]:
        pieces.append(moved[pos:] / n if role == "out" else moved[pos:])
    return torch.cat(pieces, 0).movedim(0, axis)


def _apply_units(seg: torch.Tensor, block: torch.Tensor, m: Member) -> torch.Tensor:
    """(d*repeat, *rest) -> (m*repeat, *rest): new unit j = sum_i block[j, i] * unit i."""
    d, rest = block.shape[1], seg.shape[1:]
    flat = seg.reshape(d, m.repeat * math.prod(rest))
    block = block.to(seg.dtype)
    if block.shape[0] > 64 and int(torch.count_nonzero(block)) <= 2 * block.shape[0]:
        # Permutation-like maps (a unit or a pair per row): gather the units each row reads and add
        # them up, skipping the zeros.
        rows, cols = block.nonzero(as_tuple=True)  # sorted by row
        picked = flat[cols] * block[rows, cols][:, None]
        if len(rows) > 1 and bool((rows[1:] == rows[:-1]).any()):  # some row adds several units
            out = flat.new_zeros(block.shape[0], flat.shape[1]).index_add_(0, rows, picked)
        elif len(rows) == block.shape[0]:  # one unit per row: the gather is the result
            out = picked
        else:
            out = flat.new_zeros(block.shape[0], flat.shape[1]).index_copy_(0, rows, picked)
    else:
        out = block @ flat
    return out.reshape(block.shape[0] * m.repeat, *rest)
