"""Where PLeaS-free's loss comes from: PLeaS with its calibration data split by stage.

PLeaS reads calibration data at three places: the matching (activation correlations), the least-squares
refit (inputs and targets of every layer) and the norm statistics (recomputed on the data, or the
sources' carried through the merge). :func:`split_merge` runs PLeaS with one dataset for the matching and
another for the refit (and the norm statistics, which follow the refit's data or the sources), so that
the benchmark can put each stage's share of the loss in a row of its own.
"""
from __future__ import annotations

import time
import warnings
from typing import Any

from torch import nn

from ..methods import stages
from ..methods.pleas import PLeaS
from ..methods.rebasin import aligned_partial_merge
from ..result import size_report
from ..setup import prepare


def split_merge(models: list[nn.Module], match_data: Any, refit_data: Any, *, budget: float, heads: str,
                norm_stats: str = "auto", seed: int = 0, batch_size: int = 256,
                budget_metric: str = "params") -> tuple[nn.Module, dict]:
    """PLeaS (its defaults) with units matched and the budget allocated on ``match_data`` and the refit
    and norm statistics (``norm_stats``, decided on ``refit_data``) on ``refit_data``. Returns the merged
    model and a report with "size", "norm_stats" and "seconds" (as :func:`pleas.merge`'s)."""
    start = time.perf_counter()
    common = dict(budget=budget, heads=heads, matching="activation", seed=seed, device="cpu", dtype=None,
                  batch_size=batch_size, progress=False, budget_metric=budget_metric)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matched = prepare(models, match_data, norm_stats=norm_stats, **common)
        matched.check_budget()
        maps, _ = aligned_partial_merge(matched, None, None)
        setup = prepare(models, refit_data, norm_stats=norm_stats, **common)
        method = PLeaS()
        observer = stages.norm_observer(setup, refitted=True)
        norms = stages.norm_decision(setup, observer, refitted=True)
        options = method.refit_options(setup, reset=norms["norm_stats"] == "data")
        built = stages.build(setup, maps)
        stages.refit(setup, built, options)
        model = stages.finished(setup, built)
    report = {"size": size_report(setup, built, model, models[0], stages.zero_blocks(setup, built)), **norms,
              "seconds": {"total": time.perf_counter() - start}}
    return model, report
