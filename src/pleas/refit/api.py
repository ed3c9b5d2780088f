"""The refit as one call on models: for a merged model built by hand from the sources with group maps."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..capture import Program, capture
from ..errors import SpecError
from ..groups import PermutationSpec, analyze
from ..rewrite.layout import resized
from .layers import refit_layers
from .propagated import TargetSampler, refit_propagated
from .solve import RefitOptions
from .teacher import refit_teacher


@dataclass
class RefitReport:
    """One entry per refitted layer: samples, columns, fit errors before and after, ridge."""

    layers: list[dict] = field(default_factory=list)


def refit(sources: list, merged: nn.Module, spec: PermutationSpec, maps: dict, batches, options: RefitOptions | None = None,
          samples: TargetSampler | None = None) -> RefitReport:
    """Refit every linear map of ``merged`` (built from ``sources`` with ``maps`` over ``spec``) in place.

    ``sources`` are modules (captured here on the first batch, not modified) or their captures; ``merged``
    is captured here. For the propagated refit, ``samples`` may hold targets already sampled during another
    pass over the sources (:meth:`TargetSampler.for_budget`)."""
    options = options or RefitOptions()
    batches = list(batches)
    programs = [s if isinstance(s, Program) else capture(s, batches[0], copy_model=True) for s in sources]
    source_graph = analyze(programs[0])
    merged.eval()
    merged_graph = analyze(capture(merged, batches[0]))
    widths = {name: gm.width for name, gm in maps.items()}
    try:
        target = resized(spec, widths)
    except SpecError:
        target = merged_graph.spec
    layers = refit_layers(source_graph, merged_graph, spec, target)
    params = merged.state_dict(keep_vars=True)
    if options.inputs == "propagated":
        entries = refit_propagated(programs, merged_graph.program, layers, merged_graph.norms, maps, batches, params,
                                   options, samples)
    else:
        entries = refit_teacher(programs, layers, maps, batches, params, options)
    return RefitReport(entries)
