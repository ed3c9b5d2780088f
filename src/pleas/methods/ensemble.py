"""``ensemble``: k = 0 in every group, the source models side by side in one network (the upper bound).

The side-by-side network is exact when nothing mixes the two models' units. A norm over the widened units
(LayerNorm, GroupNorm, RMSNorm normalise over A's and B's units together), or code that splits the widened
units otherwise than the models did (a channel shuffle deep in a network), breaks that; the method checks
the network against the sources on the first calibration batch and, where it is not exact, returns the
sources themselves as one module (:class:`pleas.ModelEnsemble`), saying why in the report."""
import copy

import torch

from ..errors import SpecError
from ..rewrite.heads import ModelEnsemble
from . import stages
from .registry import Method, Outcome, register_method

#: Largest deviation, relative to the outputs' scale, that still counts as exact (float32 round-off).
EXACT = 1e-4


def _flat(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.double().reshape(-1)
    if isinstance(out, dict):
        out = list(out.values())
    return torch.cat([_flat(o) for o in out if isinstance(o, (torch.Tensor, tuple, list, dict))])


def deviation(setup, model) -> float:
    """max |merged - ensemble| / max |ensemble| on the first calibration batch."""
    from ..capture import as_call

    args, kwargs = as_call(setup.batches[0])
    with torch.no_grad():
        outs = [m(*args, **kwargs) for m in setup.models]
        got = _flat(model(*args, **kwargs))
    want = torch.cat([_flat(o) for o in outs]) if setup.heads == "separate" else \
        sum(_flat(o) for o in outs) / len(outs)
    if got.shape != want.shape:
        return float("inf")
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)


@register_method
class Ensemble(Method):
    name = "ensemble"
    summary = "every unit of every model kept: the models side by side in one network (exact), else as modules"
    uses_budget = False

    def run(self, setup):
        try:
            built = stages.build(setup, stages.ensemble_maps(setup))
        except SpecError as exc:
            return self._modules(setup, f"the architecture cannot hold the models side by side: {exc}")
        model = stages.finished(setup, built)  # exact already: a statistics reset could only perturb it
        error = deviation(setup, model)
        if error > EXACT:
            return self._modules(setup, f"the side-by-side network deviates from the models by {error:.2g} of "
                                        "their output scale (a norm or a split over the widened units)")
        return Outcome(model, built, {"ensemble": "network"})

    def _modules(self, setup, why: str):
        built = stages.Built(None, setup.merged_spec, setup.full_maps(stages.ensemble_maps(setup)))
        model = ModelEnsemble([copy.deepcopy(m) for m in setup.models], setup.heads == "separate").eval()
        return Outcome(model, built, {"ensemble": "modules", "ensemble_reason": why})
