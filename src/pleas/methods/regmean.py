"""``regmean``: least squares without permutations (the paper's ablation): unit i of A is merged with
unit i of B, then every layer is refitted toward the ensemble as in PLeaS."""
from __future__ import annotations

import torch

from ..plans import partial_merge_map
from .pleas import PLeaS
from .registry import register_method


@register_method
class RegMean(PLeaS):
    name = "regmean"
    max_budget = 1.0

    def plan(self, job):
        return {g.name: partial_merge_map(torch.arange(g.width), torch.ones(g.width), g.width) for g in job.spec}
