"""Norm-statistics reset after merging (REPAIR-style): recompute BatchNorm running statistics."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextmanager
def accumulating_batchnorm_stats(model: nn.Module) -> Iterator[list]:
    """Inside, ``model`` is in eval mode except its BatchNorms, which start from empty statistics and
    accumulate exact averages (momentum None) of every batch the model sees, normalising each batch
    by its own statistics. On exit everything is in eval mode with the accumulated statistics."""
    norms = batchnorms(model)
    saved = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        yield norms
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.eval()


def reset_batchnorm_stats(model: nn.Module, batches: Iterable[torch.Tensor], *, progress: bool = True) -> int:
    """Recompute every BatchNorm's running mean and variance as exact averages over ``batches``.

    Runs the model under no_grad with only its BatchNorm layers in training mode (cumulative
    averages, independent of batch order). Batches of one sample are skipped (BatchNorm cannot
    normalise them). Returns the number of BatchNorm layers reset (0 leaves the model untouched).
    """
    with accumulating_batchnorm_stats(model) as norms, torch.no_grad():
        if norms:
            for x in tqdm(batches, desc="norm statistics", disable=not progress, leave=False):
                if x.shape[0] > 1:
                    model(x)
    return len(norms)
