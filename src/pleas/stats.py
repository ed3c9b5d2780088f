"""Streaming activation statistics at each group's sites, accumulated in float64.

The models are traced once more with *taps*: the traced graph returns, beside its output, the tensors
of every site. (Forward hooks cannot tell apart two calls of one module, such as torchvision's ResNet
reusing ``relu``, nor see functional ops such as a residual add; a tapped graph sees every node.)
"""
from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .gram import gram
from .graph import trace_graph
from .spec import Group, PermutationSpec, Site


@dataclass
class Moments:
    """Running sums over samples of a D-vector z: count, sum z (D,), sum z z^T (D, D), in float64.

    Sums are exactly additive, so statistics gathered in shards and added equal one pass.
    """

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
    return t.numel() // t.shape[site.dim] * site.repeat


def site_samples(t: torch.Tensor, site: Site, width: int, pick: torch.Tensor | None = None) -> torch.Tensor:
    """The group's units at ``site`` as samples: (N, width). Positions, tokens and the entries of a
    repeated unit (flattened conv features) all count as samples. With ``pick``, only those samples
    (indices into the N), gathered without copying the rest."""
    t = t.movedim(site.dim, -1)[..., site.offset : site.offset + width * site.repeat]
    t = t.unflatten(-1, (width, site.repeat)).transpose(-1, -2)  # (*lead, repeat, width)
    if pick is None:
        return t.reshape(-1, width)
    return t[torch.unravel_index(pick, t.shape[:-1])]


@contextmanager
def tapped(model: nn.Module, nodes: list[str]) -> Iterator[nn.Module]:
    """A traced ``model`` in eval mode whose forward returns ``(output, {node: tensor})``. It shares the
    model's modules when they are all in eval mode already, and runs on a copy otherwise, so the
    caller's model never changes."""
    if any(m.training for m in model.modules()):
        model = copy.deepcopy(model).eval()
    gm = trace_graph(model)
    by_name = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in nodes if n not in by_name]
    if missing:
        raise KeyError(f"graph has no nodes {missing[:5]}; was the spec built from this architecture?")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0], {name: by_name[name] for name in nodes}),)
    gm.recompile()
    yield gm


def source_pass(models: list[nn.Module], batches: Iterable[torch.Tensor], observers: list, *,
                progress: bool = True, desc: str = "activation statistics") -> None:
    """Run ``models`` once over ``batches``, handing each batch's taps to every observer.

    An observer has ``nodes`` (the graph nodes it reads) and ``update(taps)``, where ``taps[i]`` maps
    node names to model i's tensors. Several statistics that need the source models' activations
    share one pass this way (the matching's moments and the refit's targets)."""
    nodes = sorted({n for o in observers for n in o.nodes})
    with ExitStack() as stack, torch.no_grad():
        runs = [stack.enter_context(tapped(m, nodes)) for m in models]
        for x in tqdm(batches, desc=desc, disable=not progress, leave=False):
            taps = [run(x)[1] for run in runs]
            for o in observers:
                o.update(taps)


class MomentsObserver:
    """Collects :class:`Moments` of the stacked units of every group (see :func:`collect_moments`), or
    with ``cross``, two models' :class:`CrossMoments`."""

    def __init__(self, groups: list[Group], n_models: int, max_rows: int | None, seed: int, cross: bool = False):
        if cross and n_models != 2:
            raise ValueError(f"cross moments need two models, got {n_models}")
        self.groups = groups
        self.nodes = sorted({s.node for g in groups for s in g.sites})
        self.cross = cross
        self.moments = {g.name: CrossMoments.zeros(g.width) if cross else Moments.zeros(n_models * g.width)
                        for g in groups}
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, taps: list[dict]) -> None:
        for g in self.groups:
            per_model = [[] for _ in taps]  # every site's samples, stacked: one product per group and batch
            for site in g.sites:
                rows = site_rows(taps[0][site.node], site)
                pick = None
                if self.max_rows is not None and rows > self.max_rows:
                    pick = torch.randperm(rows, generator=self.gen)[: self.max_rows]
                for samples, t in zip(per_model, taps):
                    samples.append(site_samples(t[site.node], site, g.width, pick))
            z = [s[0] if len(s) == 1 else torch.cat(s) for s in per_model]
            if self.cross:
                self.moments[g.name].update(*z)
            else:
                self.moments[g.name].update(torch.cat(z, dim=1))


def collect_moments(
    models: list[nn.Module],
    spec: PermutationSpec,
    batches: Iterable[torch.Tensor],
    *,
    groups: list[Group] | None = None,
    progress: bool = True,
    max_rows: int | None = None,
    seed: int = 0,
    observers: list | None = None,
    cross: bool = False,
) -> dict[str, Moments] | dict[str, CrossMoments]:
    """Moments of the stacked units ``[model 0 units | model 1 units | ...]`` of every group.

    For group g of width d and n models, z has n*d entries, so the result holds the correlations
    within each model and across models (what activation matching and ZipIt! need). The models are
    not modified. ``max_rows`` caps the samples each site contributes per batch (a seeded random
    subset of positions); every batch still contributes. ``observers`` ride along on the same pass
    (see :func:`source_pass`). With ``cross`` (two models), only what activation matching reads:
    :class:`CrossMoments`.
    """
    collector = MomentsObserver(list(spec.groups if groups is None else groups), len(models), max_rows, seed, cross)
    source_pass(models, batches, [collector, *(observers or [])], progress=progress)
    return collector.moments
