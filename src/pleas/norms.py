"""Norm-statistics reset after merging (REPAIR-style): recompute BatchNorm running statistics."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


def reset_batchnorm_stats(model: nn.Module, batches: Iterable[torch.Tensor], *, progress: bool = True) -> int:
    """Recompute every BatchNorm's running mean and variance as exact averages over ``batches``.

    Runs the model in eval mode with only its BatchNorm layers in training mode (momentum None:
    a cumulative average, independent of batch order), under no_grad. Returns the number of
    BatchNorm layers reset (0 leaves the model untouched).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    saved = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for x in tqdm(batches, desc="norm statistics", disable=not progress, leave=False):
                model(x)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.eval()
    return len(norms)
