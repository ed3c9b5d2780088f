"""Group maps for the merge layouts: PLeaS partial merges, the ensemble, and how many units to merge."""
from __future__ import annotations

import torch

from .spec import Group, Member
from .transform import GroupMap


def partial_merge_map(perm: torch.Tensor, similarity: torch.Tensor, k: int) -> GroupMap:
    """PLeaS's layout for one group of width d: units ``[merged (k) | A-only (d-k) | B-only (d-k)]``.

    ``perm[i]`` is B's unit paired with A's unit i; the ``k`` pairs with the highest ``similarity``
    are merged (averaged), every other unit of A and of B is kept. Applied by
    :func:`~pleas.transform.transform_state_dicts` this gives ALGORITHM.md's initial weights: merged
    rows average A's and B's, kept rows copy their model's, and the A-only x B-only blocks are zero.
    Merged pairs and kept units are listed in A's (resp. B's) unit order.
    """
    d = len(perm)
    if not 0 <= k <= d:
        raise ValueError(f"merge count k={k} must lie in [0, {d}]")
    order = torch.argsort(similarity.double(), descending=True, stable=True)
    merged_a = torch.sort(order[:k]).values
    kept_a = torch.sort(order[k:]).values
    kept_b = torch.sort(perm[kept_a]).values
    m = 2 * d - k
    merge = torch.zeros(m, 2 * d, dtype=torch.float64)
    unmerge = torch.zeros(2 * d, m, dtype=torch.float64)
    rows = torch.arange(k)
    merge[rows, merged_a] = 0.5
    merge[rows, d + perm[merged_a]] = 0.5
    unmerge[merged_a, rows] = 1.0
    unmerge[d + perm[merged_a], rows] = 1.0
    a_rows = torch.arange(k, d)
    merge[a_rows, kept_a] = 1.0
    unmerge[kept_a, a_rows] = 1.0
    b_rows = torch.arange(d, m)
    merge[b_rows, d + kept_b] = 1.0
    unmerge[d + kept_b, b_rows] = 1.0
    return GroupMap(merge, unmerge)


def ensemble_map(width: int, n_models: int = 2) -> GroupMap:
    """Keep every unit of every model: the n models side by side (k = 0)."""
    eye = torch.eye(n_models * width, dtype=torch.float64)
    return GroupMap(eye, eye.clone())


def unit_owners(members: list[tuple[Group, Member]], size: int, maps: dict[str, GroupMap], n: int, *, side: str):
    """(n, size) booleans: which source models own each unit of an axis laid out like ``members``.

    Entries outside every group (network inputs, shared outputs) belong to every model.
    """
    owners = torch.ones(n, size, dtype=torch.bool)
    for g, m in members:
        if g.name not in maps:
            continue
        gm = maps[g.name]
        d = g.width
        mat = gm.merge if side == "out" else gm.unmerge.T  # (m, n*d)
        own = torch.stack([mat[:, k * d : (k + 1) * d].abs().sum(1) > 0 for k in range(n)])  # (n, m)
        own = own.repeat_interleave(m.repeat, dim=1)
        owners[:, m.offset : m.offset + own.shape[1]] = own
    return owners
