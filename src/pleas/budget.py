"""From a size budget to per-group merge counts k_g."""
from __future__ import annotations


import torch

from .errors import MergeInputError
from .size import SizeModel
from .spec import PermutationSpec


def uniform_merge_counts(
    spec: PermutationSpec, sizes: SizeModel, metric: str, target: float, *, steps: int = 50
) -> dict[str, int]:
    """One merge fraction f for every group (k_g = round(f * d_g)), the least merging whose size in
    ``metric`` is at most ``target``. The size decreases as f grows, so f is found by bisection."""

    def counts(f: float) -> dict[str, int]:
        return {g.name: round(f * g.width) for g in spec}

    def size_at(f: float) -> int:
        return sizes.measure(metric, {g.name: 2 * g.width - k for g, k in zip(spec, counts(f).values())})

    if size_at(1.0) > target:
        raise MergeInputError(
            f"budget unreachable: merging every unit gives {size_at(1.0)} parameters, more than the {int(target)} asked"
        )
    if size_at(0.0) <= target:
        return counts(0.0)
    lo, hi = 0.0, 1.0  # size_at(lo) > target >= size_at(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if size_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return counts(hi)


def allocate_merge_counts(
    spec: PermutationSpec,
    similarity: dict[str, torch.Tensor],
    sizes: SizeModel,
    metric: str,
    target: float,
    *,
    steps: int = 64,
    weights: dict[str, float] | None = None,
) -> dict[str, int]:
    """Choose every group's merge count k_g together: the least proxy loss whose size is <= target.

    The proxy loss of merging the k most similar pairs of group g is w_g * sum_{i<k} (1 - s_g,(i)),
    with s_g,(i) the pair similarities in decreasing order (ALGORITHM.md section 3) and w_g, by
    default, the size one merged pair of g saves (measured with nothing merged): a pair's loss is its
    dissimilarity times the parameters (or FLOPs) it holds. On the demo task this weighting beats
    both one uniform fraction and the unweighted sum (benchmarks/allocation.py). Starting from no
    merge at all, a greedy marginal-cost rule repeatedly merges the next chunk of pairs (d_g / steps,
    at least one) of the group whose added loss per unit of size saved is smallest, until the size
    meets the target; the last step is then undone one pair at a time while the target still holds,
    so each group is within one pair of the boundary. Deterministic (ties go to the earlier group).
    The loss per group is convex in k (similarities sorted), which is what makes the greedy rule sound.
    """
    groups = list(spec)
    full = {g.name: g.width for g in groups}
    if weights is None:
        apart = {g.name: 2 * g.width for g in groups}
        weights = {g.name: float(-sizes.change(metric, apart, g.name, 2 * g.width - 1)) for g in groups}
    if sizes.measure(metric, full) > target:
        raise MergeInputError(
            f"budget unreachable: merging every unit gives {sizes.measure(metric, full)} {metric}, more than the "
            f"{int(target)} asked"
        )
    cost = {}
    for g in groups:
        s = torch.sort(similarity[g.name].double().clamp(-1, 1), descending=True).values
        cost[g.name] = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(1 - s, 0)]) * weights.get(g.name, 1.0)
    k = {g.name: 0 for g in groups}
    widths = {g.name: 2 * g.width for g in groups}
    current = sizes.measure(metric, widths)
    last = None
    while current > target:
        best = None
        for g in groups:
            if k[g.name] == g.width:
                continue
            k2 = min(g.width, k[g.name] + max(1, g.width // steps))
            saved = -sizes.change(metric, widths, g.name, 2 * g.width - k2)
            if saved <= 0:
                continue
            ratio = float(cost[g.name][k2] - cost[g.name][k[g.name]]) / saved
            if best is None or ratio < best[0]:
                best = (ratio, g, k2)
        if best is None:
            break
        _, g, k2 = best
        current += sizes.change(metric, widths, g.name, 2 * g.width - k2)
        k[g.name], widths[g.name] = k2, 2 * g.width - k2
        last = g
    while last is not None and k[last.name] > 0:  # undo the overshoot of the last chunk
        step = sizes.change(metric, widths, last.name, widths[last.name] + 1)
        if current + step > target:
            break
        current += step
        k[last.name] -= 1
        widths[last.name] += 1
    return k


def prefix_merge_counts(spec: PermutationSpec, sizes: SizeModel, metric: str, target: float) -> dict[str, int]:
    """The ZipIt!-style schedule: merge the groups fully in graph order, keep the rest of both models,
    and stop inside the group where the size crosses the target (so the budget is met to one pair)."""
    k = {g.name: 0 for g in spec}
    widths = {g.name: 2 * g.width for g in spec}
    current = sizes.measure(metric, widths)
    for g in spec:
        while current > target and k[g.name] < g.width:
            current += sizes.change(metric, widths, g.name, widths[g.name] - 1)
            k[g.name] += 1
            widths[g.name] -= 1
        if current <= target:
            break
    if current > target:
        raise MergeInputError(f"budget unreachable: merging every unit gives {current} {metric}, more than {int(target)}")
    return k


def group_sensitivity(job, matching, *, max_batches: int = 2) -> dict[str, float]:
    """Measured weight of each group for :func:`allocate_merge_counts`: with every other group kept
    apart (the exact ensemble), merge all of group g's pairs and measure the relative squared change
    of the model's outputs on a few calibration batches, spread over g's pairs by their
    dissimilarity: w_g = change_g / sum_i (1 - s_g,i). One model build and forward per group."""
    from .plans import ensemble_map, partial_merge_map

    n = len(job.models)
    batches = [x for _, x in zip(range(max_batches), job.data)]
    apart = {g.name: ensemble_map(g.width, n) for g in job.spec}

    def outputs(maps):
        model = job.build(maps)
        with torch.no_grad():
            outs = [model(x) for x in batches]
        return torch.cat([torch.cat(o, -1) if isinstance(o, tuple) else o for o in outs]).double()

    reference = outputs(apart)
    scale = float((reference - reference.mean(0)).pow(2).mean()) or 1.0
    weights = {}
    for g in job.spec:
        perm, sim = matching.perms[g.name], matching.similarity[g.name]
        change = float((outputs({**apart, g.name: partial_merge_map(perm, sim, g.width)}) - reference).pow(2).mean())
        total = float((1 - sim.double().clamp(-1, 1)).sum()) or 1.0
        weights[g.name] = change / scale / total
    return weights
