"""``rebasin``: Git Re-Basin. Align B to A (weight or activation matching), then average (1x)."""
from ..plans import partial_merge_map
from .registry import MergeMethod, register_method


@register_method
class Rebasin(MergeMethod):
    name = "rebasin"
    max_budget = 1.0

    def plan(self, job):
        matching = job.match()
        return {g.name: partial_merge_map(matching.perms[g.name], matching.similarity[g.name], g.width) for g in job.spec}
