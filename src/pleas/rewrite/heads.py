"""Separate heads: one merged body, each source model's own classifier, a tuple of outputs."""
from __future__ import annotations

import torch
from torch import nn


class SeparateHeads(nn.Module):
    """Wraps a merged model whose last dimension holds the outputs of n source heads side by side
    (``[A's classes | B's classes]``) and returns them as a tuple ``(out_a, out_b, ...)``, each in its
    source's own output space. The wrapped model's state dict is this module's, under ``model.``.
    """

    def __init__(self, model: nn.Module, sizes: list[int]):
        super().__init__()
        self.model = model
        self.sizes = list(sizes)

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, ...]:
        out = self.model(*args, **kwargs)
        if out.shape[-1] != sum(self.sizes):
            raise RuntimeError(f"merged output has {out.shape[-1]} entries on its last dimension, expected {self.sizes}")
        return tuple(out.split(self.sizes, dim=-1))
