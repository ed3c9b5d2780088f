"""``average``: plain weight averaging, unit i of every model averaged (no alignment)."""
from ..matching import Matching
from . import stages
from .registry import Method, Outcome, register_method


@register_method
class Average(Method):
    name = "average"
    summary = "plain weight averaging, no alignment"
    max_budget = 1.0

    def run(self, setup):
        counts = {g.name: g.width for g in setup.spec}
        built = stages.build(setup, stages.partial_maps(setup.spec, Matching.identity(setup.spec, setup.n), counts))
        norms = stages.norm_decision(setup)
        stages.reset_norms(setup, built, norms)
        return Outcome(stages.finished(setup, built), built, norms)
