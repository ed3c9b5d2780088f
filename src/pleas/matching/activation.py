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


def activation_matching_to_first(spec: PermutationSpec, moments: dict, n: int, *, sweeps: int = 10) -> Matching:
    """N models: every model's units matched to model 0's by the correlation of their activations, one
    assignment per model (docs/algorithm.md section 2, with model 0 as the pivot). ``moments[g]`` holds the
    stacked units of all n models (:class:`~pleas.statistics.Moments`). ``perms[g]`` is (n - 1, d) and
    ``similarity[g][i]`` the mean correlation of model 0's unit i with its matches. The matches to model 0
    start a coordinate descent that matches each model to the mean of the others (``sweeps`` rounds at
    most; 0 keeps the matches to model 0)."""
    perms, sims = {}, {}
    for g in spec:
        stat, d = moments[g.name], g.width
        blocks = [stat.correlation(rows=slice(0, d), cols=slice(m * d, (m + 1) * d)).double() for m in range(1, n)]
        for s in blocks:
            if not torch.isfinite(s).all():
                raise MergeInputError(f"correlation of group {g.name!r} has non-finite entries")
        found = assign_all({f"{g.name}#{m}": (s, 1) for m, s in enumerate(blocks)})
        rows = [found[f"{g.name}#{m}"] for m in range(len(blocks))]
        matches = _refine(stat.covariance(), torch.stack([torch.arange(d), *rows]), d, sweeps) if sweeps else \
            torch.stack([torch.arange(d), *rows])
        perms[g.name] = matches[1:]
        corr = stat.correlation()
        sims[g.name] = torch.stack([corr[torch.arange(d), m * d + matches[m]] for m in range(1, n)]).mean(0).double()
    return Matching(perms=perms, similarity=sims, sweeps=sweeps, converged=True)


def _refine(cov: torch.Tensor, matches: torch.Tensor, d: int, sweeps: int) -> torch.Tensor:
    """Coordinate descent over the models (Git Re-Basin's MergeMany, on activations): each model in turn is
    matched to the mean of the other models' matched units, by the correlation of its units with those
    means, until no match changes or ``sweeps`` rounds. ``matches[m][i]`` is model m's unit in clique i
    (model 0's row is re-matched too, then the cliques are renumbered in model 0's order)."""
    from .assignment import linear_assignment

    n = matches.shape[0]
    cov = cov.double()
    var = cov.diagonal().clamp_min(0)
    for _ in range(sweeps):
        changed = False
        for m in range(n):
            others = [l for l in range(n) if l != m]
            cols = torch.stack([l * d + matches[l] for l in others])  # (n-1, d): stacked units of clique i
            cross = sum(cov[m * d:(m + 1) * d][:, c] for c in cols) / len(others)  # (d units of m, d cliques)
            block = cov[cols.reshape(-1)][:, cols.reshape(-1)].reshape(len(others), d, len(others), d)
            mean_var = torch.diagonal(block, dim1=1, dim2=3).sum((0, 1)) / len(others) ** 2
            sim = cross / (var[m * d:(m + 1) * d, None] * mean_var[None]).sqrt().clamp_min(1e-12)
            assigned = linear_assignment(sim.T.contiguous())  # clique i -> unit of model m
            if not torch.equal(assigned, matches[m]):
                matches[m] = assigned
                changed = True
        if not changed:
            break
    order = torch.argsort(matches[0])  # clique of model 0's unit j
    return matches[:, order]
