"""``rebasin``: Git Re-Basin. Align B to A (weight or activation matching, ``pleas.merge(matching=...)``),
then average (1x).

Above 1x it merges only the most similar pairs of each group and keeps the rest of both models (PLeaS's
partial merge, without the least-squares refit). ``allocation`` spreads the budget over groups:
``"uniform"`` (one merge fraction for every group, the least merging that meets the budget), ``"greedy"``
(every k_g chosen together to lose the least similarity per unit of size), ``"measured"`` (the same with
each group's weight measured as the output change when that group alone is fully merged),
``"downstream"`` (every k_g chosen together to lose the least output energy of the layers that read the
group, from the activation covariances and the weights) or ``"prefix"`` (ZipIt!'s schedule, whole groups
merged in graph order); or ``merge_counts`` gives k_g per group directly. The default is uniform for dense
budgets and downstream for effective ones (README, "Spreading the budget over groups").
"""
from . import stages
from .common import ALIGN_OPTIONS
from .registry import Method, Outcome, register_method


def aligned_partial_merge(setup, allocation: str | None, given_counts, observers: tuple = ()):
    """Matching, allocation and PLeaS's partial-merge maps, with one pass over the sources for every
    statistic they (and ``observers``) need. Returns (maps, the allocation used or None)."""
    used = stages.default_allocation(setup, allocation) if given_counts is None and setup.budget != 1.0 else None
    moments = stages.source_statistics(setup, moments=stages.needs_moments(setup, used), observers=observers)
    matching = stages.match(setup, moments)
    counts = stages.merge_counts(setup, used, matching, moments, given_counts)
    return stages.partial_maps(setup.spec, matching, counts), used


@register_method
class Rebasin(Method):
    name = "rebasin"
    summary = "Git Re-Basin: align B to A, average; above 1x PLeaS's partial merge without the refit"
    options = ALIGN_OPTIONS

    def run(self, setup):
        maps, allocation = aligned_partial_merge(setup, self.opts["allocation"], self.opts["merge_counts"])
        built = stages.build(setup, maps)
        norms = stages.norm_decision(setup)  # no refit: recomputed on the data under "auto"
        stages.reset_norms(setup, built, norms)
        report = {"allocation": allocation, **norms} if allocation else dict(norms)
        return Outcome(stages.finished(setup, built), built, report)
