"""``zipit``: ZipIt! (Stoica et al. 2024). Greedy merging over the stacked units of both models by
correlation, same-model merges included, and *partial zipping*: zip the groups up to some depth (in
topological order) and keep the rest of both models side by side, the depth chosen to meet the budget
(the last zipped group only as far as the budget needs, so budgets between two depths are met too)."""
from ..errors import MergeInputError
from ..matching import zip_units
from ..rewrite import ensemble_map
from . import stages
from .options import Option
from .registry import Method, Outcome, register_method


def zip_widths(setup) -> dict[str, int]:
    """Each group's width after zipping: the fewest leading groups (in graph order) zipped so that the
    dense size is within the budget, all of them fully (to one model's width) but the last, which is
    zipped only as far as the budget needs (the widest width that still fits), and the groups after it
    kept apart. Tied groups zip together, keeping their proportions."""
    from ..budget import items_of

    n = setup.n
    target = setup.target() * (1 + 1e-9)
    widths = {g.name: n * g.width for g in setup.spec}
    for item in items_of(setup.spec):
        if setup.size(widths) <= target:
            break

        def at(j: int) -> dict[str, int]:  # step j of the item: j / steps of the way from apart to zipped
            return {g.name: n * g.width - (n - 1) * g.width * j // item.steps for g in item.groups}

        lo, hi = 0, item.steps  # widths shrink as j grows
        widths.update(at(hi))
        if setup.size(widths) <= target:
            while lo < hi:  # the least zipping of this item that still fits
                mid = (lo + hi) // 2
                widths.update(at(mid))
                if setup.size(widths) <= target:
                    hi = mid
                else:
                    lo = mid + 1
            widths.update(at(lo))
    return widths


@register_method
class ZipIt(Method):
    name = "zipit"
    summary = "ZipIt!: greedy zipping of both models' units (same-model merges allowed); partial zipping above 1x"
    options = (
        Option("alpha", float, 0.5, "factor on same-model correlations (0 forbids same-model merges)", low=0.0),
        Option("beta", float, 1.0, "caps each model's same-model merges at beta x units removed / n", low=0.0),
    )

    def run(self, setup):
        if setup.effective_budget and setup.budget != 1.0:
            raise MergeInputError(
                f"zipit with budget_metric={setup.budget_metric!r}: effective sizes assume PLeaS's layout (merged "
                "pairs, then each model's own units), which zipping within a model breaks; allowed: 'params', 'flops'"
            )
        n = setup.n
        widths = zip_widths(setup)
        moments = stages.source_statistics(setup, moments="full")
        maps = {}
        for g in setup.spec:
            if widths[g.name] < n * g.width:
                maps[g.name] = zip_units(moments[g.name].correlation(), n_models=n, target=widths[g.name],
                                         alpha=self.opts["alpha"], beta=self.opts["beta"])
            else:
                maps[g.name] = ensemble_map(g.width, n)
        built = stages.build(setup, maps)
        norms = stages.norm_decision(setup)  # no refit: recomputed on the data under "auto"
        stages.reset_norms(setup, built, norms)
        return Outcome(stages.finished(setup, built), built, norms)
