"""The stable entry point: :func:`merge`."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import MergeInputError
from .job import MergeJob
from .methods import get_method
from .size import model_param_count, zero_block_count
from .spec import PermutationSpec


@dataclass
class MergeResult:
    """What :func:`merge` returns.

    ``model`` is the merged ``nn.Module`` in eval mode (with ``heads="separate"`` its forward returns
    ``(out_a, out_b)``); ``merge_counts[g]`` is k_g, the number of merged unit pairs of group g;
    ``widths[g]`` the merged width; ``report`` a JSON-ready summary (sizes, timings, options).
    """

    model: nn.Module
    spec: PermutationSpec
    merge_counts: dict[str, int]
    widths: dict[str, int]
    report: dict[str, Any] = field(default_factory=dict)


def merge(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    *,
    method: str = "pleas",
    budget: float = 1.0,
    heads: str = "shared",
    matching: str = "activation",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 256,
    budget_metric: str = "params",
    reset_norms: bool = True,
    progress: bool = True,
    **options: Any,
) -> MergeResult:
    """Merge two models of one architecture into one model of size ``budget`` x one model.

    Args:
        model_a, model_b: the source models (never modified).
        data: calibration inputs: a tensor (N, ...), a DataLoader, or an iterable of tensors or
            (inputs, labels) pairs.
        method: a registered method name (see ``pleas.methods.METHODS``).
        budget_metric: ``"params"`` (dense), ``"flops"`` (multiply-adds of Linear/Conv layers per
            sample), or ``"effective_params"`` / ``"effective_flops"``: the same without the zero blocks
            (the paper's count; from 1 to 2). Effective budgets default to ``allocation="downstream"``.
        budget: merged size relative to one source model, in ``budget_metric``; by default the
            floating-point entries of the returned (dense) model's state dict, from 1 up to the dense
            size of the two models side by side, which exceeds 2 because dense layers hold the zero
            cross blocks (the report gives every count). With separate heads the second head is not
            counted. Ignored by ``ensemble``, whose size is fixed.
        heads: ``"shared"`` (one label space; outputs are merged) or ``"separate"`` (each source keeps
            its head; the merged forward returns a tuple).
        matching: ``"activation"`` (correlation of activations) or ``"weight"`` (Git Re-Basin).
        seed: makes every random choice reproducible.
        options: method options (e.g. ``alpha`` for ``zipit``).
    """
    start = time.perf_counter()
    algo = get_method(method, **options)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 1.0:
        raise MergeInputError(f"budget={budget!r} is out of range; allowed: a number >= 1 (1x = one source model)")
    if algo.max_budget is not None and budget > algo.max_budget:
        raise MergeInputError(f"method {method!r} makes models of size at most {algo.max_budget:g}x; got budget={budget}")
    job = MergeJob.create(
        model_a, model_b, data, budget=budget, heads=heads, matching=matching, seed=seed, device=device,
        dtype=dtype, batch_size=batch_size, reset_norms=reset_norms, progress=progress, budget_metric=budget_metric,
    )
    if algo.uses_budget:
        job.check_budget()
    t_setup = time.perf_counter()
    maps = algo.plan(job)
    t_plan = time.perf_counter()
    model = job.build(maps)
    t_build = time.perf_counter()
    model = algo.finish(job, model, maps).eval()
    t_finish = time.perf_counter()
    widths = {g.name: maps[g.name].width for g in job.spec}
    counts = {g.name: 2 * g.width - widths[g.name] for g in job.spec}
    base = job.base_size("params")
    zero_blocks = zero_block_count(job.merged_spec, job.state_dicts[0], job.full_maps(maps), len(job.models))
    zeros = sum(zero_blocks.values())
    zero_flops = sum(z * job.merged_spec.positions.get(k, 0) for k, z in zero_blocks.items())
    report = {
        "method": method,
        "options": {k: _describe(v) for k, v in options.items()},
        "budget": budget,
        "budget_metric": budget_metric,
        "heads": heads,
        "matching": matching,
        "seed": seed,
        "size": {
            "source_params": model_param_count(model_a),
            "merged_params": model_param_count(model),
            "relative_dense": job.size(widths, "params") / base,
            "effective_params": model_param_count(model) - zeros,
            "relative_effective": (job.size(widths, "params") - zeros) / base,
            "relative_flops": job.size(widths, "flops") / max(job.base_size("flops"), 1),
            "relative_effective_flops": (job.size(widths, "flops") - zero_flops) / max(job.base_size("flops"), 1),
        },
        "groups": [
            {"name": g.name, "width": g.width, "merged_width": widths[g.name], "merge_count": counts[g.name]}
            for g in job.spec
        ],
        **job.extra,
        "seconds": {
            "setup": t_setup - start,
            "plan": t_plan - t_setup,
            "build": t_build - t_plan,
            "finish": t_finish - t_build,
            "total": t_finish - start,
        },
    }
    return MergeResult(model, job.spec, counts, widths, report)


def _describe(value: Any) -> Any:
    """An option as the report holds it: itself when JSON can hold it, else a short description (a base
    model or a state dict passed as an option is not copied into the report)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return f"<{type(value).__name__}>"
