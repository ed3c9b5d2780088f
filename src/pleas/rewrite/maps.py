"""Group maps: how the units of n source models become the units of the rewritten model.

Every rewrite is one :class:`GroupMap` per group, over the *stacked* units of n models (model k's unit
i is stacked unit ``k*d + i``), in the formulation of ZipIt!:

- ``merge``   (m, n*d): new unit j = sum_u merge[j, u] * stacked unit u. Applied to ``out`` members.
- ``unmerge`` (n*d, m): stacked unit u is read as sum_j unmerge[u, j] * new unit j. Applied to ``in``
  members, so a layer that read unit u now reads the new units it became.

This module makes the maps of the standard layouts: permutations, Net2Net widening, PLeaS's partial
merge ``[merged | A-only | B-only]`` (docs/algorithm.md section 3) and the ensemble (every unit kept).
"""
from __future__ import annotations

import torch

from ..errors import SpecError


class GroupMap:
    """The merge (m, n*d) and unmerge (n*d, m) matrices of one group.

    Given dense or sparse (COO); a sparse matrix is kept sparse: the standard layouts have about one
    entry per new unit, and a dense (2d, 2d) float64 map of a 4,096-wide group (an ensemble) is 0.5 GB.
    ``merge`` and ``unmerge`` are the dense matrices (made on request); :meth:`entries` and
    :meth:`owners` read either form without densifying."""

    def __init__(self, merge: torch.Tensor, unmerge: torch.Tensor):
        if merge.dim() != 2 or unmerge.dim() != 2 or merge.shape != unmerge.shape[::-1]:
            raise SpecError(
                f"merge must be (m, n*d) and unmerge (n*d, m); got {tuple(merge.shape)} and "
                f"{tuple(unmerge.shape)}"
            )
        self._merge = merge.coalesce() if merge.is_sparse else merge
        self._unmerge = unmerge.coalesce() if unmerge.is_sparse else unmerge

    @property
    def merge(self) -> torch.Tensor:
        return self._merge.to_dense() if self._merge.is_sparse else self._merge

    @property
    def unmerge(self) -> torch.Tensor:
        return self._unmerge.to_dense() if self._unmerge.is_sparse else self._unmerge

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n*d), the merge matrix's shape."""
        return tuple(self._merge.shape)

    @property
    def width(self) -> int:
        """m, the number of units in the new model."""
        return self._merge.shape[0]

    def entries(self, which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The nonzero entries (rows, cols, values) of ``which`` ("merge" or "unmerge")."""
        mat = self._merge if which == "merge" else self._unmerge
        if mat.is_sparse:
            keep = mat.values() != 0
            return mat.indices()[0][keep], mat.indices()[1][keep], mat.values()[keep]
        rows, cols = mat.nonzero(as_tuple=True)
        return rows, cols, mat[rows, cols]

    def block(self, k: int, n: int, role: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(new unit j, model k's unit i, value) of every entry by which new unit j reads model k's unit i:
        merge[j, k*d + i] (``role="out"``) or unmerge[k*d + i, j] (``"in"``)."""
        d = self.shape[1] // n
        if role == "out":
            j, u, v = self.entries("merge")
        else:
            u, j, v = self.entries("unmerge")
        keep = (u >= k * d) & (u < (k + 1) * d)
        return j[keep], u[keep] - k * d, v[keep]

    def owners(self, n: int, side: str) -> torch.Tensor:
        """(n, m) booleans: which source models contribute to (``side="out"``) or read (``"in"``) each new unit."""
        d = self.shape[1] // n
        out = torch.zeros(n, self.width, dtype=torch.bool)
        if side == "out":
            j, u, v = self.entries("merge")
        else:
            u, j, v = self.entries("unmerge")
        out[u // d, j] = True
        return out


def _sparse(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values.double(), shape, check_invariants=False).coalesce()


def permutation_map(perm: torch.Tensor) -> GroupMap:
    """New unit j is old unit ``perm[j]``: merge = P with P[j, perm[j]] = 1, unmerge = P^T."""
    d = len(perm)
    j, i, one = torch.arange(d), perm.long(), torch.ones(d, dtype=torch.float64)
    return GroupMap(_sparse(j, i, one, (d, d)), _sparse(i, j, one, (d, d)))


def duplication_map(width: int, factor: int = 2) -> GroupMap:
    """Widen a group by repeating each unit ``factor`` times in place (unit i -> i*factor + r).

    Outputs are copied and each copy's outgoing weights are divided by ``factor`` (Net2Net widening),
    so the widened model computes the same function.
    """
    merge = torch.zeros(width * factor, width, dtype=torch.float64)
    merge[torch.arange(width * factor), torch.arange(width).repeat_interleave(factor)] = 1.0
    return GroupMap(merge, merge.T / factor)


def partial_merge_map(perm: torch.Tensor, similarity: torch.Tensor, k: int) -> GroupMap:
    """PLeaS's layout for one group of width d: units ``[merged (k) | A-only (d-k) | B-only (d-k)]``.

    ``perm[i]`` is B's unit paired with A's unit i; the ``k`` pairs with the highest ``similarity``
    are merged (averaged), every other unit of A and of B is kept. Applied by
    :func:`~pleas.rewrite.transform.transform_state_dicts` this gives docs/algorithm.md's initial weights: merged
    rows average A's and B's, kept rows copy their model's, and the A-only x B-only blocks are zero.
    Merged pairs and kept units are listed in A's (resp. B's) unit order.
    """
    return multi_partial_merge_map(perm.reshape(1, -1), similarity, k)


def multi_partial_merge_map(perms: torch.Tensor, similarity: torch.Tensor, k: int) -> GroupMap:
    """The same layout for n = 1 + len(perms) models: ``[merged (k) | model 0 only | ... | model n-1 only]``.

    ``perms[m - 1][i]`` is model m's unit matched to model 0's unit i. The ``k`` units of model 0 with the
    highest ``similarity`` each merge with their match in every other model (an average of n units); every
    other unit of every model is kept, in that model's unit order. Width n*d - (n-1)*k.
    """
    perms = perms.long()
    n, d = perms.shape[0] + 1, perms.shape[1]
    if not 0 <= k <= d:
        raise ValueError(f"merge count k={k} must lie in [0, {d}]")
    order = torch.argsort(similarity.double(), descending=True, stable=True)
    merged_0 = torch.sort(order[:k]).values
    kept_0 = torch.sort(order[k:]).values
    matches = torch.cat([torch.arange(d)[None], perms])  # (n, d): model m's unit matched to model 0's unit i
    m = n * d - (n - 1) * k
    rows_m, cols_m, vals_m = [], [], []
    rows = torch.arange(k)
    for model in range(n):
        units = model * d + matches[model][merged_0]
        kept = model * d + torch.sort(matches[model][kept_0]).values
        own = torch.arange(k + model * (d - k), k + (model + 1) * (d - k))
        rows_m += [rows, own]
        cols_m += [units, kept]
        vals_m += [torch.full((k,), 1.0 / n, dtype=torch.float64), torch.ones(d - k, dtype=torch.float64)]
    j, u, v = torch.cat(rows_m), torch.cat(cols_m), torch.cat(vals_m)
    return GroupMap(_sparse(j, u, v, (m, n * d)), _sparse(u, j, torch.ones_like(v), (n * d, m)))


def identity_merge_map(width: int, n_models: int = 2) -> GroupMap:
    """Unit i of every model averaged: plain weight averaging, no alignment."""
    return multi_partial_merge_map(torch.arange(width).repeat(n_models - 1, 1), torch.ones(width), width)


def ensemble_map(width: int, n_models: int = 2) -> GroupMap:
    """Keep every unit of every model: the n models side by side (k = 0)."""
    units = torch.arange(n_models * width)
    one = torch.ones(len(units), dtype=torch.float64)
    return GroupMap(_sparse(units, units, one, (len(units),) * 2), _sparse(units, units, one, (len(units),) * 2))


def unit_owners(members: list, size: int, maps: dict[str, GroupMap], n: int, *, side: str) -> torch.Tensor:
    """(n, size) booleans: which source models own each entry of an axis whose groups are ``members``
    ((group, member) pairs in the *rewritten* layout). Entries outside every group (network inputs,
    shared outputs) belong to every model."""
    owners = torch.ones(n, size, dtype=torch.bool)
    for g, m in members:
        if g.name not in maps:
            continue
        own = maps[g.name].owners(n, side)  # (n, width)
        owners[:, m.index.reshape(-1)] = own.repeat_interleave(m.copies, dim=1)
    return owners
