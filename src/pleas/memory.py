"""A merge's memory, known before its work starts: the peak estimated from the captured graph and the
spec (:func:`estimate_memory`), the bound it must respect (``max_memory``, default the machine's available
memory), and per layer the solver that keeps the refit under it (:mod:`pleas.refit.rows_solve`).

The estimate adds to the process's resident memory when the merge starts (the caller's models; the
setup's copies share their weights, :func:`pleas.setup.sharing_copy`, unless converted to another dtype) what the merge will hold at once: the merged model (its template is copied without
weights), the matching's moments of every group, the refit's sampled targets of every layer (of two layers
with ``streaming``; then the sources' activations too), the
propagated refit's activation frontier, and the largest single layer's solve (its rows and, by the
solver chosen for it, its Gram or its dual system); with the pleas option ``distill_steps``, the
distillation's copies of the merged weights, teacher outputs and a minibatch's activations. docs/memory.md compares it with measured peaks.
"""
from __future__ import annotations

import math
import os
import re
import resource
from dataclasses import dataclass, field

import torch

from .errors import MergeInputError
from .refit.rows_solve import plan_layer, solve_bytes

#: Added to every estimate: torch's and the tracer's own working memory besides the tensors counted.
OVERHEAD = 256 << 20
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_bytes(value) -> int:
    """Bytes from an int or a string such as "6GB", "512 MiB", "2.5g" (binary units: 1 GB = 2^30 bytes)."""
    if isinstance(value, bool):
        raise MergeInputError(f"max_memory={value!r}; allowed: bytes as an int, or a string such as '6GB'")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise MergeInputError(f"max_memory={value!r}; allowed: a positive size such as '6GB'")
        return int(value)
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not found or found.group(2).lower() not in _UNITS or float(found.group(1)) <= 0:
        raise MergeInputError(f"max_memory={value!r}; allowed: a positive size such as 6GB, 512MB, 2.5GiB "
                              "(binary units) or a number of bytes")
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _proc_bytes(path: str, key: str) -> int | None:
    """The ``key:`` line of a /proc file given in kB, as bytes (None where there is no such file or line)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int:
    """Bytes the machine can still give: MemAvailable of /proc/meminfo, else free pages (os.sysconf)."""
    found = _proc_bytes("/proc/meminfo", "MemAvailable")
    if found is not None:
        return found
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: no bound


def resident_memory() -> int:
    """This process's resident bytes now (VmRSS), else its lifetime peak (getrusage)."""
    found = _proc_bytes("/proc/self/status", "VmRSS")
    if found is not None:
        return found
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class MemoryEstimate:
    """The parts of a merge's estimated peak, in bytes (``peak``: their sum over what is held at once)."""

    resident: int
    merged: int
    build: int
    moments: int
    targets: int
    frontier: int
    layer: dict
    peak: int
    limit: int | None = None
    layers: list = field(default_factory=list, repr=False)
    streaming: bool = False  # the refit's targets taken while it runs (pleas option ``streaming``)

    def report(self) -> dict:
        return {"estimated_peak": self.peak, "max_memory": self.limit, "resident_at_start": self.resident,
                "merged_weights": self.merged, "moments": self.moments, "refit_targets": self.targets,
                "frontier": self.frontier, "largest_layer": self.layer, "streaming": self.streaming}


def _shapes(setup) -> tuple[dict[str, tuple], int, int]:
    """Every linear map's input and output shape per sample (one sample through model 0's capture), the
    bytes per sample of every value a pass over the sources taps at once (the groups' sites and the maps'
    outputs), which a statistics pass holds for a whole batch of every model, and the bytes of one sample's
    output."""
    from .capture.program import _head
    from .refit.distill import output_tensors

    nodes = {n for layer in setup.graph.layers for n in (layer.in_node, layer.out_node)}
    sites = {site.node for g in setup.spec for site in g.sites}
    with torch.no_grad():
        out, taps = setup.programs[0].run(_head(setup.batches[0], 1), sorted(nodes | sites))
    tapped = sum(t.numel() * t.element_size() for t in taps.values() if isinstance(t, torch.Tensor))
    output = sum(t.numel() * t.element_size() for t in output_tensors(out))
    return {n: tuple(t.shape) for n, t in taps.items() if isinstance(t, torch.Tensor) and n in nodes}, tapped, output


def _positions(shape: tuple, units: int) -> int:
    return max(math.prod(shape) // max(units, 1), 1)


def _scale(setup, method) -> float:
    """The factor by which group widths grow in the merged model: n for the ensemble, 1 for methods of
    size 1x, else the uniform factor whose dense size is the budget."""
    if not method.uses_budget:
        return float(setup.n)
    if method.max_budget is not None and method.max_budget <= 1.0 or setup.budget <= 1.0:
        return 1.0
    base = setup.size({g.name: g.width for g in setup.spec}, "params")
    lo, hi = 1.0, float(setup.n)
    for _ in range(30):
        mid = (lo + hi) / 2
        size = setup.size({g.name: min(math.ceil(g.width * mid), setup.n * g.width) for g in setup.spec}, "params")
        lo, hi = (mid, hi) if size < setup.budget * base else (lo, mid)
    return hi


def estimate_memory(setup, method, limit: int | None = None) -> MemoryEstimate:
    """The peak resident bytes of running ``method`` (a configured :class:`pleas.methods.registry.Method`)
    on ``setup``, from the spec and one sample's shapes only (no statistics gathered). ``limit``: the bound
    the per-layer solvers are chosen under (what the refit uses; None: dense float64 everywhere)."""
    from .refit.layers import row_limit

    resident = resident_memory()
    itemsize = torch.finfo(setup.dtype).bits // 8
    scale = _scale(setup, method)
    widths = {g.name: min(math.ceil(g.width * scale), setup.n * g.width) for g in setup.spec}
    merged = setup.size(widths, "params") * itemsize
    build = merged  # the template is copied without its weights (rewrite.rebuild)
    name = getattr(method, "name", "")
    refits = name == "pleas"
    matches = name in ("pleas", "rebasin", "zipit") and setup.matching == "activation" or name == "zipit"
    moments = 0
    if matches:
        full = name == "zipit" or getattr(method, "opts", {}).get("allocation") == "downstream"
        for g in setup.spec:
            moments += 8 * ((setup.n * g.width) ** 2 if full or setup.n > 2 else g.width ** 2 + 4 * g.width)
    params = setup.models[0].state_dict()
    shapes, tapped, output = _shapes(setup) if (refits or matches or name == "regmean") else ({}, 0, 0)
    samples = setup.data.samples()
    n_batches = max(len(setup.batches), 1)
    taps = tapped * setup.n * min(samples, max(math.ceil(samples / n_batches), 1))  # one batch of every model
    targets, layers, frontier = 0, [], 0
    streaming = refits and bool(getattr(method, "opts", {}).get("streaming"))
    per_layer = []  # each layer's targets (streaming holds about two layers' at once: the two largest)
    plan = []
    if refits or name == "regmean":
        for layer in setup.graph.layers:
            p0 = layer.columns(params)
            bias = layer.bias is not None
            p = math.ceil((p0 - bias) * (scale if refits else 1.0)) + bias
            m_out = layer.outputs(params)
            m = math.ceil(m_out * scale) if refits else 0
            positions = _positions(shapes.get(layer.out_node, (1, m_out)), m_out) * samples
            rows = min(row_limit(p, 4, 4096, n_batches) * n_batches, positions)
            per_layer.append(4 * rows * m_out * setup.n if refits else 0)
            plan.append((layer.name, p, m, rows))
        targets = sum(sorted(per_layer)[-2:]) if streaming else sum(per_layer)
    if refits:
        from .capture.program import Walk, _head

        probe = _head(setup.batches[0], 2)
        per_sample = Walk(setup.programs[0], [probe]).peak_live_bytes() / 2
        frontier = int(min(per_sample * scale * samples, 4 << 30))
        if streaming:  # the sources walk beside the merged model
            frontier += int(min(per_sample * samples, 4 << 30)) * setup.n
    held = resident + build + targets + frontier + OVERHEAD
    budget = None if limit is None else max(limit - held, 0)
    forced = getattr(method, "opts", {}).get("solver", "auto")
    for name_l, p, m, rows in plan:
        rows_bytes = 2 * 4 * rows * (p + m)  # X and Y, and the copies merged_rows makes of them
        if refits:
            solver = plan_layer(p, m, rows, None if budget is None else max(budget - rows_bytes, 0), forced)
            need = solve_bytes(solver or "rows", p, m, rows) + rows_bytes
        else:  # regmean: every layer's Gram of every model held until the solves
            solver, need = "dense", 8 * p * p * setup.n
        layers.append({"layer": name_l, "columns": p, "outputs": m, "rows": rows, "solver": solver,
                       "bytes": need, "dense_bytes": solve_bytes("dense", p, m, rows) + rows_bytes})
    layer = max(layers, key=lambda e: e["bytes"], default={})
    distill = 0
    if refits and getattr(method, "opts", {}).get("distill_steps"):
        from .refit.distill import TEACHER_CACHE_BYTES

        # the merged weights 5 times (gradients, Adam's moments, the start kept for the undo), the teacher's
        # outputs, and a minibatch's activations kept for the backward pass
        teacher = min(output * setup.n * samples, TEACHER_CACHE_BYTES)
        distill = build * 5 + teacher + int(2 * tapped * scale * method.opts["distill_batch"])
    if name == "regmean":
        solve = sum(e["bytes"] for e in layers)
        peak = resident + build + solve + OVERHEAD
    else:
        solve = layer.get("bytes", 0)
        # the moments and targets are held through the matching (streamed targets: taken in the refit);
        # targets, frontier and a layer's solve during the refit (after the merged model is built)
        peak = resident + max(moments + taps + (0 if streaming else targets),
                              build + targets + frontier + solve, distill) + OVERHEAD
    out = MemoryEstimate(resident, merged, build, moments, targets, frontier, layer, int(peak), limit, layers,
                         streaming)
    out.solve_budget = budget
    return out


def check_memory(estimate: MemoryEstimate, limit: int, method_name: str, given: bool) -> None:
    """Raise :class:`MergeInputError` when ``estimate`` exceeds ``limit``, naming the largest layer and
    what would fit."""
    if estimate.peak <= limit:
        return
    layer = estimate.layer
    what = "max_memory" if given else "the machine's available memory (MemAvailable) plus this process's"
    parts = (f"resident at start {fmt_bytes(estimate.resident)}, merged weights {fmt_bytes(estimate.merged)}, "
             f"moments {fmt_bytes(estimate.moments)}, refit targets {fmt_bytes(estimate.targets)}, "
             f"activations {fmt_bytes(estimate.frontier)}")
    largest = (f"; the largest layer {layer['layer']!r} ({layer['columns']} columns x {layer['outputs']} outputs, "
               f"{layer['rows']} sampled rows) needs {fmt_bytes(layer['bytes'])} "
               f"{'with solver ' + repr(layer['solver']) if layer['solver'] else 'at least (no solver fits)'} "
               f"(a float64 Gram: {fmt_bytes(layer['dense_bytes'])})" if layer else "")
    fits = []
    if method_name == "regmean":
        fits.append("method='pleas' (one layer's statistics at a time)")
    fits += ["a smaller budget", "fewer calibration samples", "a machine or max_memory with at least "
             f"{fmt_bytes(estimate.peak)}"]
    if layer and layer.get("solver") == "dense":
        fits.insert(0, "solver='float32' or solver='rows' (pleas option)")
    if method_name == "pleas" and not estimate.streaming and estimate.targets:
        fits.insert(0, "streaming=True (pleas option: the refit's targets taken while it runs, about two layers' "
                       "at a time instead of every layer's)")
    raise MergeInputError(f"the {method_name} merge is estimated to peak at {fmt_bytes(estimate.peak)}, above "
                          f"{what} {fmt_bytes(limit)} ({parts}{largest}). What would fit: " + "; ".join(fits))
