"""From a size budget to per-group merge counts k_g (docs/algorithm.md section 3).

Groups of one *tie* (the blocks of a grouped convolution, the pieces of a channel shuffle) merge the same
fraction of their units, so the code's own split of the new widths finds them again: each tie is one
decision :class:`Item` with G = gcd of its widths steps, step j merging j * d_g / G units of group g.
An untied group is an item of its own, with d steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import MergeInputError
from ..groups.spec import Group, PermutationSpec
from .size import SizeModel


@dataclass
class Item:
    """Groups that merge the same fraction of their units: ``steps`` = gcd of their widths."""

    groups: list[Group]
    steps: int

    def counts(self, j: int) -> dict[str, int]:
        return {g.name: j * g.width // self.steps for g in self.groups}


def items_of(spec: PermutationSpec) -> list[Item]:
    """Every group's decision item, in graph order of their first group."""
    by_tie: dict[str, list[Group]] = {}
    order = []
    for g in spec:
        key = g.tie or g.name
        if key not in by_tie:
            by_tie[key] = []
            order.append(key)
        by_tie[key].append(g)
    return [Item(by_tie[k], math.gcd(*(g.width for g in by_tie[k]))) for k in order]


def merged_widths(counts: dict[str, int], spec: PermutationSpec, n: int = 2) -> dict[str, int]:
    """Widths of PLeaS's layout: k merged units plus d - k units of each of the n models alone."""
    return {g.name: n * g.width - (n - 1) * counts[g.name] for g in spec}


def _unreachable(size: int, metric: str, target: float) -> MergeInputError:
    return MergeInputError(f"budget unreachable: merging every unit gives {size} {metric}, more than the "
                           f"{int(target)} asked")


def uniform_merge_counts(spec: PermutationSpec, sizes: SizeModel, metric: str, target: float, *,
                         steps: int = 50) -> dict[str, int]:
    """One merge fraction f for every group (k_g = round(f * d_g); a tie rounds its common step), the least
    merging whose size in ``metric`` is at most ``target``. The size decreases as f grows, so f is found by
    bisection."""
    items = items_of(spec)

    def counts(f: float) -> dict[str, int]:
        return {name: k for item in items for name, k in item.counts(round(f * item.steps)).items()}

    def size_at(f: float) -> int:
        return sizes.measure(metric, merged_widths(counts(f), spec, sizes.n))

    if size_at(1.0) > target:
        raise _unreachable(size_at(1.0), metric, target)
    if size_at(0.0) <= target:
        return counts(0.0)
    lo, hi = 0.0, 1.0  # size_at(lo) > target >= size_at(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if size_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return _top_up(items, counts(hi), spec, sizes, metric, target)


def _top_up(items: list[Item], counts: dict[str, int], spec: PermutationSpec, sizes: SizeModel, metric: str,
            target: float) -> dict[str, int]:
    """Unmerge one step at a time of the tied items (coarse: a tie's steps are the gcd of its widths, so
    one fraction may overshoot the budget by a lot) while the size stays within ``target``, in graph
    order."""
    n = sizes.n
    widths = merged_widths(counts, spec, n)
    current = sizes.measure(metric, widths)
    changed = True
    while changed:
        changed = False
        for item in items:
            if len(item.groups) < 2:
                continue
            g0 = item.groups[0]
            j = counts[g0.name] * item.steps // g0.width
            if j == 0:
                continue
            update = {name: n * g.width - (n - 1) * k for g, (name, k) in zip(item.groups, item.counts(j - 1).items())}
            step = sizes.change(metric, widths, update)
            if current + step <= target:
                current += step
                widths.update(update)
                counts.update(item.counts(j - 1))
                changed = True
    return counts


def similarity_loss_tables(spec: PermutationSpec, similarity: dict[str, torch.Tensor], sizes: SizeModel,
                           metric: str, weights: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """The proxy loss of merging the k most similar pairs of group g: w_g * sum_{i<k} (1 - s_g,(i)), with
    s_g,(i) the pair similarities in decreasing order and w_g, by default, the size one merged pair of g
    saves (measured with nothing merged): a pair's loss is its dissimilarity times what it holds."""
    apart = {g.name: 2 * g.width for g in spec}
    if weights is None:
        weights = {g.name: float(-sizes.change(metric, apart, g.name, 2 * g.width - 1)) for g in spec}
    losses = {}
    for g in spec:
        s = torch.sort(similarity[g.name].double().clamp(-1, 1), descending=True).values
        losses[g.name] = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(1 - s, 0)]) * weights.get(g.name, 1.0)
    return losses


def allocate_by_loss(spec: PermutationSpec, losses: dict[str, torch.Tensor], sizes: SizeModel, metric: str,
                     target: float, *, steps: int = 64, convex: bool = False) -> dict[str, int]:
    """Merge counts that meet ``target`` at a small total of ``losses[g][k_g]`` (tables over k = 0..d; they
    need not be convex). Greedy on added loss per unit of size saved, looking ahead over every larger step
    of each item (on a grid of about ``steps`` values), so a non-convex table is judged by its best chord
    (with ``convex`` tables the next step is the best chord, and only it is looked at); then the overshoot
    of the last move is undone one step at a time, and whatever size is left is spent on unmerging single
    steps, the most loss removed per unit of size first, while the target holds. Deterministic (ties go to
    the earlier item)."""
    items = items_of(spec)
    n = sizes.n

    def widths_of(item: Item, j: int) -> dict[str, int]:
        return {name: n * g.width - (n - 1) * k for g, (name, k) in zip(item.groups, item.counts(j).items())}

    def table(item: Item, j: int) -> float:
        return float(sum(losses[name][k] for name, k in item.counts(j).items()))

    full = merged_widths({g.name: g.width for g in spec}, spec, n)
    if sizes.measure(metric, full) > target:
        raise _unreachable(sizes.measure(metric, full), metric, target)
    j = [0] * len(items)
    widths = merged_widths({g.name: 0 for g in spec}, spec, n)
    current = sizes.measure(metric, widths)
    last = None
    while current > target:
        best = None
        for i, item in enumerate(items):
            step, j0 = max(1, item.steps // steps), j[i]
            ahead = sorted(set(range(j0 + step, item.steps + 1, step)) | ({item.steps} if j0 < item.steps else set()))
            for j2 in ahead[:1] if convex else ahead:
                saved = -sizes.change(metric, widths, widths_of(item, j2))
                if saved <= 0:
                    continue
                ratio = (table(item, j2) - table(item, j0)) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, i, j2)
        if best is None:
            break
        _, i, j2 = best
        update = widths_of(items[i], j2)
        current += sizes.change(metric, widths, update)
        widths.update(update)
        j[i] = j2
        last = i
    while last is not None and j[last] > 0:  # undo the overshoot of the last move
        update = widths_of(items[last], j[last] - 1)
        step = sizes.change(metric, widths, update)
        if current + step > target:
            break
        current += step
        j[last] -= 1
        widths.update(update)
    while True:  # spend what is left on the steps whose unmerging removes the most loss per unit of size
        best = None
        for i, item in enumerate(items):
            if j[i] == 0:
                continue
            update = widths_of(item, j[i] - 1)
            step = sizes.change(metric, widths, update)
            if step <= 0 or current + step > target:
                continue
            gain = (table(item, j[i]) - table(item, j[i] - 1)) / step
            if best is None or gain > best[0]:
                best = (gain, i, step, update)
        if best is None:
            break
        _, i, step, update = best
        current += step
        j[i] -= 1
        widths.update(update)
    return {name: k for item, ji in zip(items, j) for name, k in item.counts(ji).items()}


def allocate_merge_counts(spec: PermutationSpec, similarity: dict[str, torch.Tensor], sizes: SizeModel,
                          metric: str, target: float, *, steps: int = 64,
                          weights: dict[str, float] | None = None) -> dict[str, int]:
    """The ``"greedy"`` allocation: :func:`allocate_by_loss` on :func:`similarity_loss_tables` (convex in
    k: the similarities are sorted), so each item is within one step of the budget's boundary."""
    losses = similarity_loss_tables(spec, similarity, sizes, metric, weights)
    return allocate_by_loss(spec, losses, sizes, metric, target, steps=steps, convex=True)


def prefix_merge_counts(spec: PermutationSpec, sizes: SizeModel, metric: str, target: float) -> dict[str, int]:
    """The ZipIt!-style schedule: merge the groups fully in graph order, keep the rest of both models,
    and stop inside the item where the size crosses the target (so the budget is met to one step)."""
    items = items_of(spec)
    n = sizes.n
    counts = {g.name: 0 for g in spec}
    widths = merged_widths(counts, spec, n)
    current = sizes.measure(metric, widths)
    for item in items:
        for j in range(1, item.steps + 1):
            if current <= target:
                break
            update = {name: n * g.width - (n - 1) * k for g, (name, k) in zip(item.groups, item.counts(j).items())}
            current += sizes.change(metric, widths, update)
            widths.update(update)
            counts.update(item.counts(j))
        if current <= target:
            break
    if current > target:
        raise _unreachable(current, metric, target)
    return counts


def merge_loss_tables(spec: PermutationSpec, state_dicts: list[dict[str, torch.Tensor]],
                      covariances: dict[str, torch.Tensor], perms: dict[str, torch.Tensor],
                      similarity: dict[str, torch.Tensor], *, steps: int = 64, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """Downstream loss L_g(k), k = 0..d, of merging group g's k most similar pairs.

    With the pairs (i, pi(i)) written as sums s_i = (a_i + b_pi(i))/2 and differences delta_i = a_i -
    b_pi(i), the merged layout keeps every s_i and the differences of the unmerged pairs; what is lost
    are the differences delta_S of the merged set S. Their part that the kept units cannot predict
    (linearly, from the activation covariance ``covariances[g]`` of the stacked units [A's d | B's d])
    is Sigma_S = Cov(delta_S | s, delta_kept) = (P_SS)^-1, P the precision of (s, delta). Unit i of A then
    moves by delta_i/2 and so does its twin in B, and the layers reading the group see the outputs move by
    L_g(k) = 1/4 tr((Q_A + Q_B^pi)_SS Sigma_S), Q = sum over the reading weights (and their kernel taps)
    of W^T W: the consumers' output energy that no refit of theirs can recover from the merged group,
    in each source's own scale. Evaluated at about ``steps`` values of k per group (linear in between);
    every S is a prefix of the similarity order, as in :func:`pleas.rewrite.partial_merge_map`.
    """
    from ..rewrite import views

    tables = {}
    for g in spec:
        d = g.width
        perm = perms[g.name]
        q = [torch.zeros(d, d, dtype=torch.float64) for _ in state_dicts]
        for m in g.members:
            if m.role != "in" or state_dicts[0][m.param].dim() < 2:
                continue
            for qi, sd in zip(q, state_dicts):
                w = views.dense(spec, m.param, sd[m.param].detach().double()).movedim(m.axis, 0)[m.index]
                w = w.movedim(0, -1).reshape(-1, d)  # every (row, copy, tap) reading the d units
                qi += w.T @ w
        q = q[0] + q[1][perm][:, perm]  # B's in A's order: entry i belongs to pair (i, pi(i))
        c = covariances[g.name].double()
        eye = torch.eye(d, dtype=torch.float64)
        pb = torch.zeros(d, d, dtype=torch.float64)
        pb[torch.arange(d), perm] = 1.0  # B's units in A's order: (pb @ b)_i = b_pi(i)
        t = torch.cat([torch.cat([eye / 2, pb / 2], 1), torch.cat([eye, -pb], 1)])  # z -> (s, delta)
        cov = t @ c @ t.T
        cov = cov + eps * float(cov.diagonal().mean().clamp_min(1e-30)) * torch.eye(2 * d, dtype=torch.float64)
        cov = cov + _shifted_cholesky(cov, eps)[1] * torch.eye(2 * d, dtype=torch.float64)  # few samples
        prec = torch.linalg.inv(cov)[d:, d:]  # precision of the differences, given everything else
        prec = (prec + prec.T) / 2
        order = torch.argsort(similarity[g.name].double(), descending=True, stable=True)
        grid = sorted(set(range(0, d + 1, max(1, d // steps))) | {d})
        values = [0.0]
        for k in grid[1:]:
            idx = order[:k]
            chol = _shifted_cholesky(prec[idx][:, idx], 1e-12)[0]
            sigma = torch.cholesky_inverse(chol)
            values.append(float((q[idx][:, idx] * sigma).sum()) / 4)
        table = torch.empty(d + 1, dtype=torch.float64)
        for (k0, v0), (k1, v1) in zip(zip(grid, values), zip(grid[1:], values[1:])):
            table[k0 : k1 + 1] = torch.linspace(v0, v1, k1 - k0 + 1, dtype=torch.float64)
        tables[g.name] = table
    return tables


def _shifted_cholesky(m: torch.Tensor, start: float) -> tuple[torch.Tensor, float]:
    """Cholesky factor of the symmetric ``m`` + shift I, and the least shift that allows it (0, else ``start``
    x the mean diagonal, times 10 until it works): a covariance from fewer samples than units is singular,
    and rounding in its moments can leave it slightly indefinite."""
    scale = float(m.diagonal().abs().mean().clamp_min(1e-30))
    eye = torch.eye(len(m), dtype=m.dtype)
    shift = 0.0
    while True:
        chol, info = torch.linalg.cholesky_ex(m + shift * eye if shift else m)
        if not int(info):
            return chol, shift
        shift = start * scale if shift == 0.0 else shift * 10
        if not shift <= 1e6 * scale:
            raise MergeInputError("the activation covariance is not finite or far from positive definite")
