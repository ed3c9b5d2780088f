"""Task vectors of models fine-tuned from one shared base, and their merges (task arithmetic, TIES).

A task vector is tau_k = theta_k - theta_0, entry by entry over a state dict. These functions are pure:
they read state dicts and return new ones. They apply to models that share an origin (no permutation
is needed then); for models trained from different initialisations, use the permutation-based methods.
"""
from __future__ import annotations

import torch

from ..errors import MergeInputError


def task_vectors(base: dict[str, torch.Tensor], finetuned: list[dict[str, torch.Tensor]],
                 keys: list[str]) -> list[dict[str, torch.Tensor]]:
    """tau_k[key] = finetuned[k][key] - base[key] for every key of ``keys``, in float64."""
    return [{key: sd[key].double() - base[key].double() for key in keys} for sd in finetuned]


def arithmetic(vectors: list[dict[str, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    """Task arithmetic (Ilharco et al. 2023): scale * sum_k tau_k."""
    return {key: scale * sum(v[key] for v in vectors) for key in vectors[0]}


def ties(vectors: list[dict[str, torch.Tensor]], density: float, scale: float) -> dict[str, torch.Tensor]:
    """TIES-merging (Yadav et al. 2023), tensor by tensor: *trim* each tau_k to its ``density``
    fraction of largest-magnitude entries (ties at the threshold kept), *elect* each entry's sign as
    that of the sum of the trimmed vectors, and take the *disjoint mean* of the trimmed entries that
    agree with the elected sign (0 where none does); then multiply by ``scale``."""
    if not 0.0 < density <= 1.0:
        raise MergeInputError(f"density={density}; allowed: 0 < density <= 1 (the fraction of each task vector kept)")
    out = {}
    for key in vectors[0]:
        trimmed = torch.stack([_trim(v[key], density) for v in vectors])
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        count = agree.sum(0)
        total = (trimmed * agree).sum(0)
        out[key] = scale * torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    return out


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    keep = max(1, round(density * t.numel()))
    if keep >= t.numel():
        return t.clone()
    magnitude = t.abs().flatten()
    threshold = torch.kthvalue(magnitude, magnitude.numel() - keep + 1).values
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def dare(vectors: list[dict[str, torch.Tensor]], drop: float, seed: int) -> list[dict[str, torch.Tensor]]:
    """DARE (Yu et al. 2024, "Language Models are Super Mario"): each entry of each task vector is dropped
    (set to 0) with probability ``drop`` and the survivors are rescaled by 1 / (1 - drop), so every entry
    keeps its expectation. The draws come from one generator seeded with ``seed``, in the order of the
    vectors and their keys."""
    if not 0.0 <= drop < 1.0:
        raise MergeInputError(f"drop={drop}; allowed: 0 <= drop < 1 (the probability of dropping an entry)")
    generator = torch.Generator().manual_seed(seed)
    out = []
    for v in vectors:
        kept = {}
        for key, t in v.items():
            keep = torch.rand(t.shape, generator=generator, dtype=torch.float64) >= drop
            kept[key] = torch.where(keep, t / (1.0 - drop), torch.zeros_like(t))
        out.append(kept)
    return out
