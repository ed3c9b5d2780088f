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
            f"budget unreachable: merging every unit gives {size_at(1.0)} {metric}, more than the {int(target)} asked"
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
    dissimilarity times the parameters (or FLOPs) it holds. The counts are chosen by the greedy
    marginal-cost rule of :func:`allocate_by_loss` on these tables (convex in k: the similarities are
    sorted), so each group is within one pair of the budget's boundary. Deterministic.
    """
    apart = {g.name: 2 * g.width for g in spec}
    if weights is None:
        weights = {g.name: float(-sizes.change(metric, apart, g.name, 2 * g.width - 1)) for g in spec}
    losses = {}
    for g in spec:
        s = torch.sort(similarity[g.name].double().clamp(-1, 1), descending=True).values
        losses[g.name] = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(1 - s, 0)]) * weights.get(g.name, 1.0)
    return allocate_by_loss(spec, losses, sizes, metric, target, steps=steps, convex=True)


def merge_loss_tables(
    spec: PermutationSpec,
    state_dicts: list[dict[str, torch.Tensor]],
    covariances: dict[str, torch.Tensor],
    perms: dict[str, torch.Tensor],
    similarity: dict[str, torch.Tensor],
    *,
    steps: int = 64,
    eps: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Downstream loss L_g(k), k = 0..d, of merging group g's k most similar pairs (ALGORITHM.md section 3).

    With the pairs (i, pi(i)) written as sums s_i = (a_i + b_pi(i))/2 and differences delta_i = a_i -
    b_pi(i), the merged layout keeps every s_i and the differences of the unmerged pairs; what is lost
    are the differences delta_S of the merged set S. Their part that the kept units cannot predict
    (linearly, from the activation covariance ``covariances[g]`` of the stacked units [A's d | B's d])
    is Sigma_S = Cov(delta_S | s, delta_kept) = (P_SS)^-1, P the precision of (s, delta). Unit i of A then
    moves by delta_i/2 and so does its twin in B, and the layers reading the group see the outputs move by
    L_g(k) = 1/4 tr((Q_A + Q_B^pi)_SS Sigma_S), Q = sum over the reading weights (and their kernel taps)
    of W^T W: the consumers' output energy that no refit of theirs can recover from the merged group,
    in each source's own scale. It generalises "dissimilarity x unit variance x squared column norm of
    the next layers" to correlated units. Evaluated at about ``steps`` values of k per group (linear in
    between); every S is a prefix of the similarity order, as in :func:`pleas.plans.partial_merge_map`.
    """
    tables = {}
    for g in spec:
        d = g.width
        perm = perms[g.name]
        q = [torch.zeros(d, d, dtype=torch.float64) for _ in state_dicts]
        for m in g.members:
            if m.role != "in" or state_dicts[0][m.param].dim() < 2:
                continue
            for qi, sd in zip(q, state_dicts):
                w = sd[m.param].detach().double().movedim(m.axis, 1).narrow(1, m.offset, d * m.repeat)
                w = w.reshape(w.shape[0], d, -1).transpose(1, 2).reshape(-1, d)  # every (row, tap) reading the d units
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


def allocate_by_loss(
    spec: PermutationSpec,
    losses: dict[str, torch.Tensor],
    sizes: SizeModel,
    metric: str,
    target: float,
    *,
    steps: int = 64,
    convex: bool = False,
) -> dict[str, int]:
    """Merge counts that meet ``target`` at a small total of ``losses[g][k_g]`` (tables over k = 0..d, as
    from :func:`merge_loss_tables`; they need not be convex). Greedy on added loss per unit of size saved,
    looking ahead over every larger k of each group (on a grid of about ``steps`` values), so a
    non-convex table is judged by its best chord (with ``convex`` tables the next step is the best
    chord, and only it is looked at); then the overshoot of the last move is undone one pair at a
    time, and whatever size is left is spent on unmerging single pairs, the most loss removed per unit
    of size first, while the target holds. Deterministic (ties go to the earlier group)."""
    groups = list(spec)
    full = {g.name: g.width for g in groups}
    if sizes.measure(metric, full) > target:
        raise MergeInputError(
            f"budget unreachable: merging every unit gives {sizes.measure(metric, full)} {metric}, more than the "
            f"{int(target)} asked"
        )
    k = {g.name: 0 for g in groups}
    widths = {g.name: 2 * g.width for g in groups}
    current = sizes.measure(metric, widths)
    last = None
    while current > target:
        best = None
        for g in groups:
            step, k0, table = max(1, g.width // steps), k[g.name], losses[g.name]
            ahead = sorted(set(range(k0 + step, g.width + 1, step)) | ({g.width} if k0 < g.width else set()))
            for k2 in ahead[:1] if convex else ahead:
                saved = -sizes.change(metric, widths, g.name, 2 * g.width - k2)
                if saved <= 0:
                    continue
                ratio = float(table[k2] - table[k0]) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, g, k2)
        if best is None:
            break
        _, g, k2 = best
        current += sizes.change(metric, widths, g.name, 2 * g.width - k2)
        k[g.name], widths[g.name] = k2, 2 * g.width - k2
        last = g
    while last is not None and k[last.name] > 0:  # undo the overshoot of the last move
        step = sizes.change(metric, widths, last.name, widths[last.name] + 1)
        if current + step > target:
            break
        current += step
        k[last.name] -= 1
        widths[last.name] += 1
    while True:  # spend what is left on the pairs whose unmerging removes the most loss per unit of size
        best = None
        for g in groups:
            if k[g.name] == 0:
                continue
            step = sizes.change(metric, widths, g.name, widths[g.name] + 1)
            if step <= 0 or current + step > target:
                continue
            gain = float(losses[g.name][k[g.name]] - losses[g.name][k[g.name] - 1]) / step
            if best is None or gain > best[0]:
                best = (gain, g, step)
        if best is None:
            break
        _, g, step = best
        current += step
        k[g.name] -= 1
        widths[g.name] += 1
    return k


def downstream_merge_counts(job, matching=None, *, steps: int = 64) -> dict[str, int]:
    """The ``"downstream"`` allocation: :func:`allocate_by_loss` on :func:`merge_loss_tables`, from the
    activation moments of both sources (one pass over the calibration data, shared with the matching
    when it runs first) and their weights. Measured in benchmarks/allocation.py."""
    matching = matching or job.match()
    moments = job.moments()
    covariances = {g.name: moments[g.name].covariance() for g in job.spec}
    losses = merge_loss_tables(job.spec, job.state_dicts, covariances, matching.perms, matching.similarity,
                               steps=steps)
    return allocate_by_loss(job.spec, losses, job.sizes, job.budget_metric, job.target(), steps=steps)


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
