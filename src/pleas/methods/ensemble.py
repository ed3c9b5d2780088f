"""``ensemble``: k = 0 in every group, the source models side by side in one network (the upper bound)."""
from . import stages
from .registry import Method, Outcome, register_method


@register_method
class Ensemble(Method):
    name = "ensemble"
    summary = "every unit of every model kept: the models side by side in one network (exact)"
    uses_budget = False

    def run(self, setup):
        built = stages.build(setup, stages.ensemble_maps(setup))
        return Outcome(stages.finished(setup, built), built)  # exact already: a statistics reset could only perturb it
