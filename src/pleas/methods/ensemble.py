"""``ensemble``: k = 0 in every group, the source models side by side in one network (the 2x upper bound)."""
from ..plans import ensemble_map
from .registry import MergeMethod, register_method


@register_method
class Ensemble(MergeMethod):
    name = "ensemble"
    uses_budget = False

    def plan(self, job):
        return {g.name: ensemble_map(g.width, len(job.models)) for g in job.spec}

    def finish(self, job, model, maps):
        return model  # already exact: a statistics reset could only perturb it
