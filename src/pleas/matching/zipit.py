"""ZipIt!-style greedy merging of the stacked units of n models into fewer units (Stoica et al. 2024).

Unlike a permutation, which only pairs A's units with B's, ZipIt! may also merge two units of the *same*
model when they are redundant. Here the stacked units (model k's unit i is stacked unit ``k*d + i``) are
clustered agglomeratively with complete linkage on their correlation:

    W[u, v]   = corr[u, v] * (alpha if model(u) == model(v) else 1)      (same-model pairs damped)
    sim(C, D) = min_{u in C, v in D} W[u, v]                              (complete linkage)

and the most similar pair of current clusters is merged until ``target`` clusters remain. The result is a
:class:`~pleas.rewrite.GroupMap`: ``merge`` averages each cluster's units and ``unmerge`` lets every
stacked unit read the cluster it joined (docs/algorithm.md sections 2-3; pleas.rewrite.transform for how maps are used).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import MergeInputError
from ..rewrite.maps import GroupMap

__all__ = ["zip_units"]


def zip_units(
    corr: torch.Tensor,
    *,
    n_models: int,
    target: int,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> GroupMap:
    """Greedily merge n*d stacked units into ``target`` clusters (ZipIt!, complete linkage).

    Args:
        corr: (n*d, n*d) correlation between the stacked units of ``n_models`` models of width d (model k's
            unit i is index ``k*d + i``), e.g. Pearson correlations of their activations. Symmetrised as
            (corr + corr^T) / 2; the diagonal is ignored. Must be finite.
        n_models: n, the number of stacked models.
        target: m in [1, n*d], the number of units after merging. ``target == n*d`` gives the identity.
        alpha: factor applied to the correlation of two units of the same model (a same-model merge);
            it scales the value, so alpha < 1 pulls it toward 0 (a penalty for positive correlations).
            ``alpha=0`` forbids same-model merges altogether (a pure cross-model matching).
        beta: each model may take part in at most ``floor(beta * (n*d - target) / n)`` same-model merges
            (a merge of two clusters that both hold units of model k counts once for model k);
            ``beta=0`` forbids them.

    Each step merges the pair of current clusters with the highest linkage similarity; ties go to the
    pair whose smallest members come first (lowest cluster index, then lowest partner index), so the
    result is deterministic. A step costs O((n d)^2), so n*d = 1024 takes well under a second or two.

    Returns:
        GroupMap with ``merge`` (target, n*d): row c is 1/|c| on the members of cluster c (rows sum to 1),
        and ``unmerge`` (n*d, target): the 0/1 membership indicator (one 1 per row). Clusters are ordered
        by their smallest stacked index. Both float64.

    Raises:
        MergeInputError: bad shapes, non-finite correlations, target out of range, negative alpha/beta,
            or no allowed merge left before reaching ``target`` (alpha/beta forbid every remaining one,
            e.g. ``alpha=0`` with target < d for two models).
    """
    if isinstance(n_models, bool) or not isinstance(n_models, int) or n_models < 1:
        raise MergeInputError(f"n_models must be a positive int; got {n_models!r}")
    corr = torch.as_tensor(corr)
    if corr.dim() != 2 or corr.shape[0] != corr.shape[1]:
        raise MergeInputError(f"corr must be a square (n*d, n*d) matrix; got shape {tuple(corr.shape)}")
    total = corr.shape[0]
    if total == 0 or total % n_models:
        raise MergeInputError(f"corr has {total} rows, which is not n_models={n_models} times a positive width d")
    d = total // n_models
    if isinstance(target, bool) or not isinstance(target, int) or not 1 <= target <= total:
        raise MergeInputError(f"target must be an int in [1, n*d] = [1, {total}]; got {target!r}")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise MergeInputError(f"{name} must be a finite number >= 0; got {value!r}")
    c = corr.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(c).all():
        bad = int((~np.isfinite(c)).sum())
        raise MergeInputError(f"corr has {bad} non-finite entries (NaN or inf); e.g. a constant unit")

    model = np.repeat(np.arange(n_models), d)  # model of each stacked unit
    same = model[:, None] == model[None, :]
    sim = (c + c.T) / 2
    if alpha == 0:
        sim[same] = -np.inf
    else:
        sim[same] *= alpha
    np.fill_diagonal(sim, -np.inf)

    # members[k, r]: cluster r (indexed by its smallest member) holds a unit of model k.
    members = np.zeros((n_models, total), dtype=bool)
    members[model, np.arange(total)] = True
    budget = math.floor(beta * (total - target) / n_models + 1e-9)
    used = np.zeros(n_models, dtype=np.int64)
    label = np.arange(total)  # stacked unit -> its cluster's smallest member

    def close(k: int) -> None:
        """Model k's budget is spent: forbid any merge of two clusters that both contain model k."""
        rows = np.flatnonzero(members[k])
        sim[np.ix_(rows, rows)] = -np.inf

    if budget == 0:
        for k in range(n_models):
            close(k)

    for _ in range(total - target):
        flat = int(np.argmax(sim))  # first maximum in row-major order: lowest (i, j), and i < j
        i, j = divmod(flat, total)
        if sim[i, j] == -np.inf:
            n_now = int((label == np.arange(total)).sum())
            raise MergeInputError(
                f"cannot reach target={target}: stuck at {n_now} clusters because alpha={alpha} / beta={beta} "
                f"forbid every remaining merge (same-model merges allowed per model: {budget})"
            )
        shared = np.flatnonzero(members[:, i] & members[:, j])
        # complete linkage: the merged cluster's similarity to any other is the minimum of the two
        row = np.minimum(sim[i], sim[j])
        sim[i, :] = row
        sim[:, i] = row
        sim[i, i] = -np.inf
        sim[j, :] = -np.inf
        sim[:, j] = -np.inf
        members[:, i] |= members[:, j]
        members[:, j] = False
        label[label == j] = i
        for k in shared:
            used[k] += 1
            if used[k] >= budget:
                close(int(k))

    reps = np.unique(label)  # sorted: clusters ordered by their smallest member
    col = np.searchsorted(reps, label)
    unmerge = torch.zeros(total, len(reps), dtype=torch.float64)
    unmerge[torch.arange(total), torch.from_numpy(col)] = 1.0
    merge = unmerge.T / unmerge.sum(0)[:, None]
    return GroupMap(merge.contiguous(), unmerge)
