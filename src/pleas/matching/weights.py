"""Git Re-Basin weight matching (Ainsworth et al. 2023), and the cosine similarity of matched units.

Conventions: a member's ``index`` (d, copies) gives the positions of each unit's entries along its
axis; "unfolding" a tensor along a member gives a (d, everything else) matrix whose row i gathers all of
unit i's entries (its copies times every other axis). Similarities are computed in float64. A tensor
stored compressed (a grouped convolution's weight) is read in its dense form.
"""
from __future__ import annotations

import torch

from ..errors import MergeInputError
from ..groups.spec import Group, Member, PermutationSpec
from ..rewrite import views
from .assignment import linear_assignment
from .result import Matching


def _permute_axes(
    t: torch.Tensor,
    gms: list[tuple[Group, Member]],
    perms: dict[str, torch.Tensor],
    *,
    skip: Member | None = None,
) -> torch.Tensor:
    """``t`` with every member in ``gms`` reordered by ``perms`` (new unit j = old unit perm[j]).

    The axis of ``skip`` is left untouched (the caller unfolds along it)."""
    by_axis: dict[int, list[tuple[Group, Member]]] = {}
    for g, m in gms:
        if skip is not None and m.axis == skip.axis:
            continue
        by_axis.setdefault(m.axis, []).append((g, m))
    for axis, ms in sorted(by_axis.items()):
        idx = torch.arange(t.shape[axis])
        for g, m in ms:
            idx[m.index.reshape(-1)] = m.index[perms[g.name]].reshape(-1)
        t = t.index_select(axis, idx)
    return t


def _unfold(t: torch.Tensor, g: Group, m: Member) -> torch.Tensor:
    """(d, rest): row i = every entry of unit i of member ``m`` (its copies x other axes)."""
    return t.movedim(m.axis, 0)[m.index].reshape(g.width, -1)


def _prepare(spec: PermutationSpec, sd_a: dict, sd_b: dict) -> tuple[dict, dict]:
    """float64 copies of the member tensors of A and B, after checking both state dicts fit the spec."""
    spec.check_state_dict({k: views.dense(spec, k, t) for k, t in sd_a.items()}, what="state dict A")
    spec.check_state_dict({k: views.dense(spec, k, t) for k, t in sd_b.items()}, what="state dict B")
    a, b = {}, {}
    for p in spec.params:
        ta, tb = views.dense(spec, p, sd_a[p]), views.dense(spec, p, sd_b[p])
        if ta.shape != tb.shape:
            raise MergeInputError(f"{p!r} has shape {tuple(ta.shape)} in A but {tuple(tb.shape)} in B")
        if not (ta.dtype.is_floating_point and tb.dtype.is_floating_point):
            raise MergeInputError(f"{p!r} is a member of a group but is not floating point ({ta.dtype}, {tb.dtype})")
        a[p] = ta.detach().to(device="cpu", dtype=torch.float64)
        b[p] = tb.detach().to(device="cpu", dtype=torch.float64)
    return a, b


def _check_perms(spec: PermutationSpec, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for g in spec:
        if g.name not in perms:
            raise MergeInputError(f"no permutation for group {g.name!r}")
        p = torch.as_tensor(perms[g.name]).long().cpu()
        if p.shape != (g.width,) or not torch.equal(torch.sort(p).values, torch.arange(g.width)):
            raise MergeInputError(f"perms[{g.name!r}] is not a permutation of {g.width} units")
        out[g.name] = p
    return out


# ----------------------------------------------------------------------------------------------------
# Similarity of matched pairs
# ----------------------------------------------------------------------------------------------------


def _cosine(spec: PermutationSpec, a: dict, b: dict, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    aligned = {p: _permute_axes(b[p], spec.members_of(p), perms) for p in spec.params}
    out = {}
    for g in spec:
        dot = torch.zeros(g.width, dtype=torch.float64)
        na = torch.zeros(g.width, dtype=torch.float64)
        nb = torch.zeros(g.width, dtype=torch.float64)
        for m in g.members:
            ua, ub = _unfold(a[m.param], g, m), _unfold(aligned[m.param], g, m)
            dot += (ua * ub).sum(1)
            na += (ua * ua).sum(1)
            nb += (ub * ub).sum(1)
        denom = (na * nb).sqrt()
        out[g.name] = torch.where(denom > 0, dot / denom.clamp_min(1e-300), torch.zeros_like(dot))
    return out


def unit_cosine_similarity(
    spec: PermutationSpec,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    perms: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Cosine similarity of each matched pair's weights, per group: float64 (d,).

    similarity[g][i] = <a_i, b_i> / (|a_i| |b_i|), where a_i concatenates every entry of A's unit i over
    all members of g (each member unfolded along its axis slice) and b_i the same entries of B *aligned*
    by ``perms`` on every group (``permute_state_dict(sd_b, spec, perms)``), i.e. B's unit perms[g][i]
    with all its other axes aligned too. A pair with an all-zero side (or a group with no members) gets 0.
    """
    a, b = _prepare(spec, sd_a, sd_b)
    return _cosine(spec, a, b, _check_perms(spec, perms))


# ----------------------------------------------------------------------------------------------------
# Weight matching (Git Re-Basin)
# ----------------------------------------------------------------------------------------------------


def _self_axes(spec: PermutationSpec, g: Group) -> set[str]:
    """Params on which group g indexes two or more different axes (e.g. a d->d Linear inside a residual)."""
    axes: dict[str, set[int]] = {}
    for m in g.members:
        axes.setdefault(m.param, set()).add(m.axis)
    return {p for p, s in axes.items() if len(s) > 1}


def _group_terms(
    spec: PermutationSpec, g: Group, a: dict, b: dict, perms: dict[str, torch.Tensor], quad: set[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_lin, S_quad), both (d, d) float64: the similarity of group g given the other perms.

    S[i, j] = sum_members  unfold_m(A)[i] . unfold_m(B with every other axis permuted)[j].
    S_lin holds members whose param meets g on one axis (the objective is linear in pi_g there);
    S_quad those whose param meets g on several axes (their term is quadratic in pi_g; S_quad is its
    linearisation at the current pi_g, up to a factor, because those other axes use the current pi_g).
    """
    d = g.width
    s_lin = torch.zeros(d, d, dtype=torch.float64)
    s_quad = torch.zeros(d, d, dtype=torch.float64)
    for m in g.members:
        tb = _permute_axes(b[m.param], spec.members_of(m.param), perms, skip=m)
        term = _unfold(a[m.param], g, m) @ _unfold(tb, g, m).T
        if m.param in quad:
            s_quad += term
        else:
            s_lin += term
    return s_lin, s_quad


def _quad_objective(spec: PermutationSpec, quad: set[str], a: dict, b: dict, perms: dict) -> float:
    """sum over ``quad`` params of <A_p, B_p aligned by perms on every axis>."""
    return sum(float((a[p] * _permute_axes(b[p], spec.members_of(p), perms)).sum()) for p in sorted(quad))


def weight_matching(
    spec: PermutationSpec,
    sd_a: dict[str, torch.Tensor],
    sd_b: dict[str, torch.Tensor],
    *,
    seed: int = 0,
    max_iter: int = 100,
) -> Matching:
    """Git Re-Basin weight matching (Ainsworth et al. 2023; docs/algorithm.md section 2) by coordinate descent.

    Maximises  sum_p <A_p, B_p aligned by perms>  over one permutation per group. Starting from the
    identity, each sweep visits the groups in a random order (a ``torch.Generator`` seeded with ``seed``,
    so the result is deterministic) and for group g (width d) builds

        S_g[i, j] = sum_{members m of g} unfold_m(A)[i] . unfold_m(B^{-m})[j]              (d, d)

    where ``unfold_m`` takes member m's entries of its axis and folds each unit's copies and all
    other axes into its row (a Linear reading flattened conv features: unit c's row holds all its H*W
    columns), and B^{-m} is B's tensor permuted by the *current* perms on every member axis except m's
    own axis. The new pi_g = ``linear_assignment(S_g)``; it is kept only if it strictly
    improves the objective. Sweeps stop once a whole sweep changes no group, or after ``max_iter`` sweeps.

    Tensors with two axes in the same group (e.g. a d->d Linear whose input and output both live in one
    residual group) make the objective quadratic in pi_g. As in the reference Git Re-Basin code, the
    other axis of such a tensor is permuted with the current pi_g while one axis is unfolded, so each of
    its members contributes the linearisation of the quadratic term. Unlike a blind update, the candidate
    is accepted only if the *exact* objective (the quadratic terms re-evaluated with the candidate on all
    of the group's axes) increases, so every sweep is an ascent step and the loop terminates.

    Args:
        spec: the permutation groups of the architecture (``pleas.build_spec``).
        sd_a, sd_b: state dicts of A and B (same architecture). Not modified.
        seed: seeds the group order of every sweep.
        max_iter: maximum number of sweeps.

    Returns:
        :class:`Matching` with ``perms[g][i]`` = B's unit paired with A's unit i (so
        ``permute_state_dict(sd_b, spec, perms)`` aligns B to A) and ``similarity[g][i]`` = the cosine
        similarity of that pair over all of g's member entries after alignment
        (:func:`unit_cosine_similarity`).
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise MergeInputError(f"max_iter must be a positive int; got {max_iter!r}")
    a, b = _prepare(spec, sd_a, sd_b)
    perms = {g.name: torch.arange(g.width) for g in spec}
    quads = {g.name: _self_axes(spec, g) for g in spec}
    # S_g depends only on the perms of the groups that share a tensor with g (and on pi_g itself when g
    # meets a tensor on two axes): while none of them changed since g was last solved, solving g again
    # would give the same answer, so it is skipped. This changes the work, never the result.
    readers: dict[str, set[str]] = {g.name: set() for g in spec}
    for g in spec:
        for m in g.members:
            for h, _ in spec.members_of(m.param):
                if h.name != g.name or quads[g.name]:
                    readers[h.name].add(g.name)
    stale = {g.name for g in spec}
    groups = list(spec)
    gen = torch.Generator().manual_seed(seed)
    sweeps, converged = 0, False
    while sweeps < max_iter:
        sweeps += 1
        improved = False
        for k in torch.randperm(len(groups), generator=gen).tolist():
            g = groups[k]
            if g.width < 2 or not g.members or g.name not in stale:
                continue
            stale.discard(g.name)
            quad = quads[g.name]
            s_lin, s_quad = _group_terms(spec, g, a, b, perms, quad)
            cand = linear_assignment(s_lin + s_quad)
            old = perms[g.name]
            if torch.equal(cand, old):
                continue
            rows = torch.arange(g.width)
            lin_old, lin_new = float(s_lin[rows, old].sum()), float(s_lin[rows, cand].sum())
            gain = lin_new - lin_old
            scale = abs(lin_old) + abs(lin_new)
            if quad:
                q_old = _quad_objective(spec, quad, a, b, perms)
                q_new = _quad_objective(spec, quad, a, b, {**perms, g.name: cand})
                gain += q_new - q_old
                scale += abs(q_old) + abs(q_new)
            if gain > 1e-12 * scale:
                perms[g.name] = cand
                improved = True
                stale |= readers[g.name]
        if not improved:
            converged = True
            break
    return Matching(perms=perms, similarity=_cosine(spec, a, b, perms), sweeps=sweeps, converged=converged)


