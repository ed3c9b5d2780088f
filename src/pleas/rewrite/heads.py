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


def _average(outputs: list):
    """The mean of several models' outputs, structure kept (tensors, tuples, lists, dicts, model outputs)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return sum(outputs) / len(outputs) if first.is_floating_point() else first
    if isinstance(first, dict):
        values = {k: _average([o[k] for o in outputs]) for k in first}
        try:
            return type(first)(**values)
        except TypeError:
            return values
    if isinstance(first, (tuple, list)):
        return type(first)(_average(list(items)) for items in zip(*outputs))
    return first


class ModelEnsemble(nn.Module):
    """The source models themselves, run one after the other: with ``separate`` heads the forward returns
    ``(out_a, out_b, ...)``, otherwise the mean of their outputs (same structure as one model's). The
    exact ensemble where no single network of the architecture can hold the models side by side."""

    def __init__(self, models: list[nn.Module], separate: bool):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.separate = separate

    def forward(self, *args, **kwargs):
        outs = [m(*args, **kwargs) for m in self.members]
        return tuple(outs) if self.separate else _average(outs)
