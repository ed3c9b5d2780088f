"""Streaming activation statistics at each group's sites, accumulated in float64.

Only running sums are kept (count, sum z, sum z z^T), so statistics gathered over batches, or in shards,
add up exactly (docs/algorithm.md section 2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed
from ..groups.spec import Group, PermutationSpec, Site
from .gram import gram


@dataclass
class Moments:
    """Running sums over samples of a D-vector z: count, sum z (D,), sum z z^T (D, D), in float64."""

    count: float
    sum: torch.Tensor
    outer: torch.Tensor

    @classmethod
    def zeros(cls, dim: int) -> "Moments":
        return cls(0.0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    def update(self, z: torch.Tensor) -> None:
        """Add samples ``z`` of shape (N, D). The batch's product runs in the input's precision; the
        running sums are float64, so round-off does not grow with the number of batches."""
        self.count += z.shape[0]
        self.sum += z.double().sum(0)
        self.outer += gram(z)

    def reduce(self) -> None:
        """Sum over the ranks of a process group, in place."""
        count = torch.tensor([self.count], dtype=torch.float64)
        distributed.all_sum(count, self.sum, self.outer)
        self.count = float(count)

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.count + other.count, self.sum + other.sum, self.outer + other.outer)

    def covariance(self) -> torch.Tensor:
        mean = self.sum / self.count
        return self.outer / self.count - torch.outer(mean, mean)

    def correlation(self, eps: float = 1e-12, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """Pearson correlation (D, D), or its block ``[rows, cols]`` (computed alone, entry for entry the
        same); a unit with zero variance correlates 0 with everything."""
        mean = self.sum / self.count
        std = (self.outer.diagonal() / self.count - mean * mean).clamp_min(0).sqrt()
        cov = self.outer[rows, cols] / self.count - torch.outer(mean[rows], mean[cols])
        return cov / (torch.outer(std[rows], std[cols]) + eps)


@dataclass
class CrossMoments:
    """The part of two models' :class:`Moments` that matching reads, for z = [A's d units | B's d]:
    count, sum z (2d,), sum z^2 (2d,) and only the cross block sum z_A z_B^T (d, d), in float64.
    Half the products of the full (2d, 2d) moments, and no (N, 2d) copy of the samples."""

    count: float
    sum: torch.Tensor
    square: torch.Tensor
    cross: torch.Tensor

    @classmethod
    def zeros(cls, dim: int) -> "CrossMoments":
        z = torch.zeros(2 * dim, dtype=torch.float64)
        return cls(0.0, z, z.clone(), torch.zeros(dim, dim, dtype=torch.float64))

    def update(self, za: torch.Tensor, zb: torch.Tensor) -> None:
        """Add samples of A's units ``za`` (N, d) and B's ``zb`` (N, d), rows paired."""
        self.count += za.shape[0]
        for half, z in ((slice(0, za.shape[1]), za), (slice(za.shape[1], None), zb)):
            self.sum[half] += z.sum(0).double()
            self.square[half] += torch.square(z).sum(0).double()
        self.cross += (za.T @ zb).double()

    def reduce(self) -> None:
        """Sum over the ranks of a process group, in place."""
        count = torch.tensor([self.count], dtype=torch.float64)
        distributed.all_sum(count, self.sum, self.square, self.cross)
        self.count = float(count)

    def __add__(self, other: "CrossMoments") -> "CrossMoments":
        return CrossMoments(self.count + other.count, self.sum + other.sum, self.square + other.square,
                            self.cross + other.cross)

    def correlation(self, eps: float = 1e-12, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """The Pearson correlation of A's units (rows) against B's (columns), the block
        ``[:d, d:]`` of :meth:`Moments.correlation` (and the only one these sums hold)."""
        d = len(self.cross)
        if (rows.start or 0, rows.stop, cols.start, cols.stop) != (0, d, d, 2 * d):
            raise ValueError(f"CrossMoments holds only the block [:{d}, {d}:] of the correlation")
        mean = self.sum / self.count
        std = (self.square / self.count - mean * mean).clamp_min(0).sqrt()
        cov = self.cross / self.count - torch.outer(mean[:d], mean[d:])
        return cov / (torch.outer(std[:d], std[d:]) + eps)


def site_rows(t: torch.Tensor, site: Site) -> int:
    """How many samples :func:`site_samples` makes of ``t``."""
    per = 1
    for d in site.dims:
        per *= t.shape[d]
    return t.numel() // per * site.index.shape[1]


def site_samples(t: torch.Tensor, site: Site, pick: torch.Tensor | None = None) -> torch.Tensor:
    """The group's units at ``site`` as samples: (N, width). Positions, tokens and the copies of a
    repeated unit (flattened conv features) all count as samples. With ``pick``, only those samples
    (indices into the N), gathered without copying the rest."""
    dims = [d % t.dim() for d in site.dims]
    lead = [d for d in range(t.dim()) if d not in dims]
    width, copies = site.index.shape
    if pick is not None:  # gather the picked rows only (sample s is lead position s // copies, copy s % copies)
        view = t.permute(*lead, *dims)
        position, copy = pick // copies, pick % copies
        rows = view[torch.unravel_index(position, view.shape[:len(lead)])].flatten(1)  # (P, entries)
        if copies == 1:  # one column per unit: a plain column gather (several times faster than 2-D indexing)
            return rows.index_select(1, site.index[:, 0])
        return rows[torch.arange(len(pick))[:, None], site.index.T[copy]]
    if copies == 1 and len(dims) == 1:  # one axis, one entry per unit: select the units, then one transposing copy
        units = site.index[:, 0]
        first = int(units[0])
        if bool((units == torch.arange(first, first + width)).all()):
            t = t.narrow(dims[0], first, width)
        else:
            t = t.index_select(dims[0], units)
        return t.movedim(dims[0], -1).reshape(-1, width)
    t = t.permute(*lead, *dims).flatten(len(lead))  # (*lead, entries)
    t = t[..., site.index.T.reshape(-1)].unflatten(-1, (copies, width))  # (*lead, copies, width)
    return t.reshape(-1, width)


class MomentsObserver:
    """Collects :class:`Moments` of the stacked units ``[model 0 | model 1 | ...]`` of every group at its
    sites (or, with ``cross`` and two models, :class:`CrossMoments`). An observer of
    :func:`pleas.statistics.source_pass`. ``max_rows`` caps the samples each site adds per batch (a
    seeded random subset of positions); every batch still contributes."""

    def __init__(self, groups: list[Group], n_models: int, max_rows: int | None, seed: int, cross: bool = False):
        if cross and n_models != 2:
            raise ValueError(f"cross moments need two models, got {n_models}")
        self.groups = groups
        self.nodes = sorted({s.node for g in groups for s in g.sites})
        self.cross = cross
        self.moments = {g.name: CrossMoments.zeros(g.width) if cross else Moments.zeros(n_models * g.width)
                        for g in groups}
        self.max_rows = max_rows
        self.seed = seed

    def update(self, taps: list[dict], index: int = 0) -> None:
        gen = distributed.batch_generator(self.seed, index)
        for g in self.groups:
            per_model = [[] for _ in taps]  # every site's samples, stacked: one product per group and batch
            for site in g.sites:
                rows = site_rows(taps[0][site.node], site)
                pick = None
                if self.max_rows is not None and rows > self.max_rows:
                    pick = torch.randperm(rows, generator=gen)[: self.max_rows]
                for samples, t in zip(per_model, taps):
                    samples.append(site_samples(t[site.node], site, pick))
            z = [s[0] if len(s) == 1 else torch.cat(s) for s in per_model]
            if self.cross:
                self.moments[g.name].update(*z)
            else:
                self.moments[g.name].update(torch.cat(z, dim=1))


    def reduce(self) -> None:
        """Sum every group's moments over the ranks of a process group (:mod:`pleas.distributed`)."""
        for m in self.moments.values():
            m.reduce()


def moments_observer(spec: PermutationSpec, n_models: int, n_batches: int, seed: int, *,
                     cross: bool = False) -> MomentsObserver:
    """The observer a merge uses: enough positions per batch for stable correlations of the widest group
    (32 samples per stacked unit over the whole calibration set, at least 1,024 per batch)."""
    widest = max(g.width for g in spec)
    per_batch = max(32 * n_models * widest // max(n_batches, 1), 1024)
    return MomentsObserver(list(spec.groups), n_models, per_batch, seed, cross)
