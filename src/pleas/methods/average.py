"""``average``: plain weight averaging, unit i of A with unit i of B (no alignment)."""
import torch

from ..plans import partial_merge_map
from .registry import MergeMethod, register_method


@register_method
class Average(MergeMethod):
    name = "average"
    max_budget = 1.0

    def plan(self, job):
        return {
            g.name: partial_merge_map(torch.arange(g.width), torch.ones(g.width), g.width) for g in job.spec
        }
