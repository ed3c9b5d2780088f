"""Linear assignment: the permutation that pairs the most similar units (docs/algorithm.md section 2).

For a similarity S (d, d) between A's units (rows) and B's units (columns):

    pi = argmax_pi  sum_i S[i, pi(i)]

and **unit pi(i) of B pairs with unit i of A**. Solved exactly with SciPy's Jonker-Volgenant solver.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import MergeInputError


def _lsa_value(sim: np.ndarray) -> tuple[np.ndarray, float]:
    rows, cols = linear_sum_assignment(sim, maximize=True)
    # rows == arange(d) for a square matrix, so cols is the permutation.
    return cols, float(sim[rows, cols].sum())


def linear_assignment(sim: torch.Tensor, *, block: int = 1) -> torch.Tensor:
    """The permutation maximising  sum_i sim[i, perm[i]]  (docs/algorithm.md section 2, assignment).

    Args:
        sim: (d, d) similarity, rows = A's units, columns = B's units. Any real dtype; solved in float64.
        block: units come in contiguous blocks of ``block`` (a GroupNorm constraint); a valid permutation
            maps every block of A onto one whole block of B. Solved exactly and hierarchically: the value
            of pairing block p with block q is the optimal assignment value inside sim[p-block, q-block];
            an assignment over blocks on those values picks the block pairing; the inner assignments of
            the chosen pairs give the unit pairing.

    Returns:
        LongTensor (d,): ``perm[i]`` = the column (B unit) assigned to row (A unit) i.

    Raises:
        MergeInputError: ``sim`` is not a finite square matrix, or ``block`` does not divide d.
    """
    if not isinstance(sim, torch.Tensor):
        sim = torch.as_tensor(sim)
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise MergeInputError(f"linear_assignment needs a square (d, d) similarity; got shape {tuple(sim.shape)}")
    if sim.is_complex() or sim.dtype == torch.bool:
        raise MergeInputError(f"linear_assignment needs a real similarity; got dtype {sim.dtype}")
    d = sim.shape[0]
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise MergeInputError(f"block must be a positive int; got {block!r}")
    if d % block:
        raise MergeInputError(f"block={block} does not divide the group width d={d}")
    s = sim.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(s).all():
        bad = int((~np.isfinite(s)).sum())
        raise MergeInputError(f"similarity has {bad} non-finite entries (NaN or inf); e.g. a constant unit")
    if d == 0:
        return torch.zeros(0, dtype=torch.long)
    if block == 1:
        return torch.from_numpy(_lsa_value(s)[0].astype(np.int64))
    nb = d // block
    tiles = s.reshape(nb, block, nb, block).transpose(0, 2, 1, 3)  # tiles[p, q] = s[p-block, q-block]
    inner = np.empty((nb, nb, block), dtype=np.int64)
    value = np.empty((nb, nb))
    for p in range(nb):
        for q in range(nb):
            inner[p, q], value[p, q] = _lsa_value(tiles[p, q])
    outer, _ = _lsa_value(value)
    perm = outer[:, None] * block + inner[np.arange(nb), outer]  # (nb, block)
    return torch.from_numpy(perm.reshape(d).astype(np.int64))


def assign_all(problems: dict[str, tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """:func:`linear_assignment` of every (similarity, block) problem, on torch's intra-op threads:
    SciPy's solver releases the GIL, and a wide group's assignment takes tens of milliseconds."""
    workers = min(torch.get_num_threads(), len(problems))
    if workers <= 1:
        return {name: linear_assignment(s, block=b) for name, (s, b) in problems.items()}
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(linear_assignment, s, block=b) for name, (s, b) in problems.items()}
        return {name: f.result() for name, f in futures.items()}
