"""The stable entry point: :func:`merge`."""
from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import nn

from . import distributed
from .errors import MergeInputError
from .methods import get_method
from .methods.stages import zero_blocks
from .result import MergeResult, describe, size_report
from .memory import MemoryEstimate, available_memory, check_memory, estimate_memory as _estimate, parse_bytes, resident_memory
from .setup import RESIDUALS, align_stream, prepare


def _solvers(report: dict) -> dict:
    """How many refitted layers each solver solved (README "Memory")."""
    counts: dict = {}
    for entry in report.get("refit", []) or []:
        if isinstance(entry, dict) and "solver" in entry:
            counts[entry["solver"]] = counts.get(entry["solver"], 0) + 1
    return counts


def _check_budget_value(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise MergeInputError(f"budget={budget!r} is a {type(budget).__name__}; allowed: a number >= 1 "
                              "(1x = one source model), e.g. budget=1.5")
    if not budget >= 1.0:
        raise MergeInputError(f"budget={budget!r} is out of range; allowed: a number >= 1 (1x = one source model)")
    return float(budget)


_UNSET = object()


def _models_and_data(model_a, model_b, data) -> tuple[list[nn.Module], list[str], Any]:
    """``merge(a, b, data)`` or ``merge([m0, m1, ...], data)`` / ``merge({name: model}, data)``."""
    if isinstance(model_a, (list, tuple, dict)):
        if data is not _UNSET:
            raise MergeInputError("pass merge(models, data) with a list or dict of models, or merge(model_a, model_b, "
                                  "data); got a collection of models and two more arguments")
        if model_b is _UNSET:
            raise MergeInputError("merge(models, data) needs calibration data after the models")
        names = [str(k) for k in model_a] if isinstance(model_a, dict) else None
        models = list(model_a.values()) if isinstance(model_a, dict) else list(model_a)
        if len(models) < 2:
            raise MergeInputError(f"merging needs at least two models; got {len(models)}")
        labels = names or ([f"model_{chr(ord('a') + i)}" for i in range(len(models))] if len(models) <= 26
                           else [f"model_{i}" for i in range(len(models))])
        return models, labels, model_b
    if model_b is _UNSET or data is _UNSET:
        raise MergeInputError("merge needs two models and calibration data: merge(model_a, model_b, data), or a list "
                              "of models: merge([model_a, model_b, ...], data)")
    return [model_a, model_b], ["model_a", "model_b"], data


def merge(
    model_a: nn.Module | list[nn.Module] | dict[str, nn.Module],
    model_b: Any = _UNSET,
    data: Any = _UNSET,
    *,
    method: str = "pleas",
    budget: float = 1.0,
    heads: str = "shared",
    matching: str = "activation",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    batch_size: int = 256,
    budget_metric: str = "params",
    norm_stats: str = "auto",
    residual: str = "permutation",
    progress: bool = True,
    max_memory: int | str | None = None,
    **options: Any,
) -> MergeResult:
    """Merge two (or more) models of one architecture into one model of size ``budget`` x one model.

    ``merge(model_a, model_b, data, ...)`` merges two; ``merge([m0, m1, m2, ...], data, ...)`` (or a dict of
    named models) merges N: each model's units are matched to the first one's, a merged unit averages one
    unit of every model, and the budget runs from 1x to Nx.

    Args:
        model_a, model_b: the source models (never modified).
        data: calibration inputs: a tensor (N, ...), a dict of model inputs (token ids ``(N, T)`` and
            masks, as a tokenizer returns them), a DataLoader, or an iterable of tensors, dicts or
            (inputs, labels) pairs. Integer inputs (token ids) are never cast to float.
        method: a registered method name (``pleas methods`` lists them with their options).
        budget: merged size relative to one source model, in ``budget_metric``; by default the
            floating-point entries of the returned (dense) model's state dict, from 1 up to the dense
            size of the two models side by side, which exceeds 2 because dense layers hold the zero
            cross blocks (the report gives every count). With separate heads the second head is not
            counted. Ignored by ``ensemble``, whose size is fixed.
        budget_metric: ``"params"`` (dense), ``"flops"`` (multiply-adds of the linear maps per sample), or
            ``"effective_params"`` / ``"effective_flops"``: the same without the zero blocks (the paper's
            count; from 1 to 2). Effective budgets default to ``allocation="downstream"``.
        heads: ``"shared"`` (one label space; outputs are merged) or ``"separate"`` (each source keeps
            its head; the merged forward returns a tuple).
        matching: ``"activation"`` (correlation of activations), ``"weight"`` (Git Re-Basin) or
            ``"identity"`` (unit i with unit i: no alignment).
        norm_stats: where the merged model's running norm statistics come from: ``"data"`` (recomputed
            on the calibration data, REPAIR-style), ``"sources"`` (the sources' stored statistics carried
            through the merge), or ``"auto"``: "data" when the calibration data's statistics agree with the
            sources' stored ones, else "sources" (pleas.norms.observe; the report says which and why).
        residual: how B's residual stream (the group an input embedding writes) is aligned to A's:
            ``"permutation"`` like every other group, or ``"orthogonal"``: each RMSNorm weight on it folded
            into the maps that read it, then B's stream rotated by the orthogonal Procrustes solution on
            the two streams' cross-covariance (exact symmetries: both models keep their functions), after
            which its units are paired as they stand (Llama, Mistral, Qwen2: RMSNorm models; a LayerNorm
            on the stream, which subtracts the mean, is an error). ``report["aligned"]`` describes it.
        seed: makes every random choice reproducible.
        device, dtype: where and in which floating dtype the merge runs; ``dtype=None`` keeps the models'
            own (float32 if they mix dtypes). The merged model has that dtype.
        max_memory: the most resident memory the merging process may reach, in bytes or as "6GB" (binary
            units); default: the machine's available memory plus what the process holds. The merge's peak is
            estimated before any statistics are gathered (:func:`pleas.estimate_memory`): above the bound it
            fails at once with a :class:`MergeInputError` naming the largest layer and what would fit; under
            it, each layer of the refit is solved the way that fits (``report["memory"]``, README "Memory").
        options: method options (e.g. ``alpha`` for ``zipit``); unknown names are an error listing the
            method's options.

    Warnings from the merge (symmetries given up, statistics from few samples) are issued with Python's
    ``warnings`` and listed in ``report["warnings"]``.

    Several processes: in an initialised ``torch.distributed`` process group (or under ``torchrun``,
    whose group is joined with gloo), ``data`` is this rank's shard; every statistic is summed over the
    ranks and every rank returns the same merged model (:mod:`pleas.distributed`). Shards that are
    consecutive runs of whole batches (``pleas.distributed.shard``) give the one-process merge up to
    round-off. Every rank fails if any does.
    """
    start = time.perf_counter()
    models, labels, data = _models_and_data(model_a, model_b, data)
    algo = get_method(method, **options)
    budget = _check_budget_value(budget)
    if residual not in RESIDUALS:
        raise MergeInputError(f"residual={residual!r}; allowed: {', '.join(map(repr, RESIDUALS))}")
    if algo.max_budget is not None and budget > algo.max_budget:
        raise MergeInputError(f"method {method!r} makes models of size at most {algo.max_budget:g}x; got budget={budget}")
    distributed.join_from_environment()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup = prepare(models, data, labels=labels, budget=budget, heads=heads, matching=matching, seed=seed,
                        device=device, dtype=dtype, batch_size=batch_size, norm_stats=norm_stats, progress=progress,
                        budget_metric=budget_metric)
        if residual == "orthogonal":
            align_stream(setup)
        if algo.uses_budget:
            setup.check_budget()
        limit = parse_bytes(max_memory) if max_memory is not None else resident_memory() + available_memory()
        estimate = _estimate(setup, algo, limit)
        check_memory(estimate, limit, method, max_memory is not None)
        setup.max_solve_bytes = estimate.solve_budget
        t_setup = time.perf_counter()
        outcome = algo.run(setup)
    t_run = time.perf_counter()
    found = [str(w.message) for w in caught]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    built = outcome.built
    widths = {g.name: built.maps[g.name].width for g in setup.spec}
    counts = {g.name: (setup.n * g.width - widths[g.name]) // (setup.n - 1) for g in setup.spec}
    report = {
        "method": method,
        "options": {k: describe(v) for k, v in options.items()},
        "budget": budget,
        "budget_metric": budget_metric,
        "heads": heads,
        "matching": matching,
        "seed": seed,
        "norm_stats": norm_stats,
        "residual": residual,
        **({"aligned": setup.aligned} if setup.aligned else {}),
        "dtype": str(setup.dtype).replace("torch.", ""),
        "calibration_samples": int(distributed.sum_numbers(setup.data.samples())[0]),
        **({"processes": distributed.world_size()} if distributed.active() else {}),
        "size": size_report(setup, built, outcome.model, models[0], zero_blocks(setup, built) if built.model is not None else {}),
        "groups": [
            {"name": g.name, "width": g.width, "merged_width": widths[g.name], "merge_count": counts[g.name]}
            for g in setup.spec
        ],
        **outcome.report,
        "memory": {**estimate.report(), "solvers": _solvers(outcome.report)},
        "warnings": found,
        "seconds": {"setup": t_setup - start, "run": t_run - t_setup, "total": time.perf_counter() - start},
    }
    return MergeResult(outcome.model, setup.spec, counts, widths, report)


def estimate_memory(model_a, model_b: Any = _UNSET, data: Any = _UNSET, *, method: str = "pleas", budget: float = 1.0,
                    max_memory: int | str | None = None, seed: int = 0, batch_size: int = 256,
                    **options: Any) -> MemoryEstimate:
    """The estimated peak memory of ``merge(model_a, model_b, data, method=..., budget=..., **options)``
    (same arguments), without merging: ``.peak`` in bytes, its parts, the largest layer and each
    layer's solver under ``max_memory`` (``.report()``). Prepares the merge (copies and captures) only."""
    models, labels, data = _models_and_data(model_a, model_b, data)
    algo = get_method(method, **options)
    setup = prepare(models, data, labels=labels, budget=_check_budget_value(budget), heads="shared",
                    matching="activation", seed=seed, device="cpu", dtype=None, batch_size=batch_size,
                    norm_stats="auto", progress=False)
    limit = parse_bytes(max_memory) if max_memory is not None else resident_memory() + available_memory()
    return _estimate(setup, algo, limit)
