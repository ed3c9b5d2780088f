"""Activation matching: pair units by the Pearson correlation of their activations (docs/algorithm.md
section 2), from streamed moments."""
from __future__ import annotations

import torch

from ..errors import MergeInputError
from ..groups.spec import PermutationSpec
from ..statistics import CrossMoments, Moments
from .assignment import assign_all
from .result import Matching


# ----------------------------------------------------------------------------------------------------


def activation_matching(spec: PermutationSpec, moments: dict) -> Matching:
    """Match B's units to A's by the Pearson correlation of their activations (docs/algorithm.md section 2).

    Args:
        spec: the permutation groups.
        moments: per group name, the streamed statistics of the stacked units ``[A's d | B's d]`` over all
            calibration batches: ``pleas.statistics.Moments`` or ``CrossMoments``, another object whose
            ``.correlation()`` returns (2d, 2d), or that (2d, 2d) correlation matrix itself.

    For group g, S_g = corr[:d, d:] (A's unit i vs B's unit j), pi_g = ``linear_assignment(S_g)`` and
    ``similarity[g][i] = S_g[i, pi_g(i)]`` (float64). ``sweeps`` is 0.
    """
    sims = {}
    for g in spec:
        if g.name not in moments:
            raise MergeInputError(f"no activation statistics for group {g.name!r}")
        stat = moments[g.name]
        if getattr(stat, "count", 1) == 0:
            raise MergeInputError(f"activation statistics of group {g.name!r} hold no samples (does it have sites?)")
        d = g.width
        streamed = isinstance(stat, (Moments, CrossMoments))  # then only the block of A's units against B's is computed
        if streamed:
            shape = (len(stat.sum), len(stat.sum))
        else:
            stat = stat.correlation() if hasattr(stat, "correlation") else torch.as_tensor(stat)
            shape = tuple(stat.shape)
        if shape != (2 * d, 2 * d):
            raise MergeInputError(
                f"correlation of group {g.name!r} has shape {shape}; two models of width {d} need ({2 * d}, {2 * d})"
            )
        s = stat.correlation(rows=slice(0, d), cols=slice(d, 2 * d)) if streamed else stat[:d, d:]
        s = s.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(s).all():
            raise MergeInputError(f"correlation of group {g.name!r} has non-finite entries")
        sims[g.name] = s
    perms = assign_all({g.name: (sims[g.name], 1) for g in spec})
    sims = {name: s[torch.arange(len(s)), perms[name]].clone() for name, s in sims.items()}
    return Matching(perms=perms, similarity=sims, sweeps=0, converged=True)


def activation_matching_to_first(spec: PermutationSpec, moments: dict, n: int) -> Matching:
    """N models: every model's units matched to model 0's by the correlation of their activations, one
    assignment per model (docs/algorithm.md section 2, with model 0 as the pivot). ``moments[g]`` holds the
    stacked units of all n models (:class:`~pleas.statistics.Moments`). ``perms[g]`` is (n - 1, d) and
    ``similarity[g][i]`` the mean correlation of model 0's unit i with its matches."""
    perms, sims = {}, {}
    for g in spec:
        stat, d = moments[g.name], g.width
        blocks = [stat.correlation(rows=slice(0, d), cols=slice(m * d, (m + 1) * d)).double() for m in range(1, n)]
        for s in blocks:
            if not torch.isfinite(s).all():
                raise MergeInputError(f"correlation of group {g.name!r} has non-finite entries")
        found = assign_all({f"{g.name}#{m}": (s, 1) for m, s in enumerate(blocks)})
        rows = [found[f"{g.name}#{m}"] for m in range(len(blocks))]
        perms[g.name] = torch.stack(rows)
        sims[g.name] = torch.stack([s[torch.arange(d), p] for s, p in zip(blocks, rows)]).mean(0)
    return Matching(perms=perms, similarity=sims, sweeps=0, converged=True)
