"""Orthogonal matching of a group: the rotation that best aligns B's units with A's (orthogonal
Procrustes on the activations' cross-covariance).

A permutation is the only alignment most groups allow (an elementwise nonlinearity acts unit by unit).
The residual stream of a transformer whose norms are RMSNorms is different: once each norm's weight is
folded into the maps that read it (:mod:`pleas.rewrite.rotate`), every op on the stream is linear or
rotation-invariant, so any orthogonal map of it is a symmetry, and the permutations are a small subset
of them (Verma & Elbayad 2024; Theus et al. 2025 align transformers from different initialisations
this way).
"""
from __future__ import annotations

import torch

from ..statistics import CrossMoments


def cross_covariance(stat: CrossMoments) -> torch.Tensor:
    """(d, d) float64: the covariance of A's units (rows) with B's (columns)."""
    d = len(stat.cross)
    mean = stat.sum / stat.count
    return stat.cross / stat.count - torch.outer(mean[:d], mean[d:])


def procrustes(cov: torch.Tensor) -> torch.Tensor:
    """The orthogonal R maximising  trace(R^T cov)  for cov = E[(a - mean a)(b - mean b)^T]: B's units
    rotated by R (b -> R b) are as close to A's as a rotation makes them. From the SVD cov = U S V^T,
    R = U V^T (float64)."""
    u, _, vh = torch.linalg.svd(cov.double())
    return u @ vh
