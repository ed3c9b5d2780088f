"""What a merge returns, and its JSON-ready report."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .budget import model_param_count
from .groups import PermutationSpec


@dataclass
class MergeResult:
    """What :func:`pleas.merge` returns.

    ``model`` is the merged ``nn.Module`` in eval mode (with ``heads="separate"`` its forward returns
    ``(out_a, out_b)``); ``merge_counts[g]`` is k_g, the number of merged unit pairs of group g;
    ``widths[g]`` the merged width; ``report`` a JSON-ready summary (sizes, timings, options, warnings).
    """

    model: nn.Module
    spec: PermutationSpec
    merge_counts: dict[str, int]
    widths: dict[str, int]
    report: dict[str, Any] = field(default_factory=dict)


def describe(value: Any) -> Any:
    """An option as the report holds it: itself when JSON can hold it, else a short description (a base
    model or a state dict passed as an option is not copied into the report)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return f"<{type(value).__name__}>"


def size_report(setup, built, model: nn.Module, source: nn.Module, zeros: dict[str, int]) -> dict[str, Any]:
    """Dense and effective sizes of the merged model, in parameters and FLOPs, relative to one source."""
    if built.model is None:  # the sources themselves, as modules: exactly n models
        n = float(setup.n)
        return {"source_params": model_param_count(source), "merged_params": model_param_count(model),
                "relative_dense": n, "effective_params": model_param_count(model), "relative_effective": n,
                "relative_flops": n, "relative_effective_flops": n}
    widths = {g.name: built.maps[g.name].width for g in setup.spec}
    base = setup.base_size("params")
    base_flops = max(setup.base_size("flops"), 1)
    total_zeros = sum(zeros.values())
    zero_flops = sum(z * setup.merged_spec.positions.get(k, 0) for k, z in zeros.items())
    return {
        "source_params": model_param_count(source),
        "merged_params": model_param_count(model),
        "relative_dense": setup.size(widths, "params") / base,
        "effective_params": model_param_count(model) - total_zeros,
        "relative_effective": (setup.size(widths, "params") - total_zeros) / base,
        "relative_flops": setup.size(widths, "flops") / base_flops,
        "relative_effective_flops": (setup.size(widths, "flops") - zero_flops) / base_flops,
    }
