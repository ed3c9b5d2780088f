"""The transformer benchmarks: two byte-level language-model pairs and a ViT pair, merged by every method.

* **LM pairs** (:mod:`pleas.experiments.lm`): a GPT-2-style and a Llama-style model (RMSNorm, rotary
  embeddings, SwiGLU, grouped-query attention), 4 layers, 128 wide, vocabulary 256. Model A is trained on
  Python's standard library (code, seed 0), model B on pydoc's help texts (prose, seed 1). Metric: bits
  per byte on each domain's held-out text, and their mean (lower is better).
* **ViT pair** (:func:`pleas.experiments.sources.vit_models`): timm ViTs on MNIST digits 0-4 and 5-9
  (different seeds), separate heads. Metric: accuracy of each head on its digits' test split.

Rows: each source; the ensembles (for the LMs the logit average, which ``method="ensemble"`` returns,
and the probability mixture); every method at 1x; PLeaS (and Git Re-Basin, its merge without the refit)
at budgets from 1x to 2x in effective parameters (2x: both models side by side), with the residual
stream aligned by permutations and, for the RMSNorm model, by a rotation (``residual="orthogonal"``);
distillation into a 1x student, from model A and from the PLeaS merge, for as long as the merge took and
for :data:`DISTILL_LONG` times that. Every merge's wall time is reported beside the forward floor (both
sources run once over the calibration data).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Callable

import torch
from torch import nn

from ..api import merge
from ..datasets import BYTE_DOMAINS, byte_windows
from .measure import forward_floor
from .plots import budget_panel

LM_FAMILIES = ("gpt2", "llama")
#: Budgets in effective parameters (the paper's count: 2x is the two models side by side).
BUDGETS = (1.0, 1.25, 1.5, 2.0)
#: Calibration windows of 128 bytes (half code, half prose) and held-out windows per domain for bpb.
LM_CALIBRATION = 256
LM_EVAL_WINDOWS = 128
VIT_CALIBRATION = 1000
#: The longer distillation runs for this many times the PLeaS merge's wall time.
DISTILL_LONG = 4
DISTILL_LR = 3e-4
DISTILL_BATCH = 16
#: PLeaS with the option ``distill_steps`` at 1x and 2x (learning rate: the option's default for the LMs).
PLEAS_DISTILL_STEPS = 50
#: The ViT's: at the default 3e-4 its calibration loss rose over the 50 steps (so the steps were undone), at
#: 1e-4 and 3e-5 it fell (measured at 1x and 2x; 3e-5 the lower at 1x).
VIT_DISTILL_LR = 3e-5


def _quiet_merge(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        result = merge(*args, progress=False, **kwargs)
        seconds = time.perf_counter() - start
    return result, seconds, sorted({str(w.message)[:160] for w in caught})


def _plan(family_rotates: bool, budgets: tuple[float, ...], distill_lr: float | None = None
          ) -> list[tuple[str, str, float, dict]]:
    """(row label, method, budget, merge arguments) of every merge of a pair (``distill_lr``: the
    distillation rows' learning rate, default the option's)."""
    plan = [("weight average", "average", 1.0, {}), ("RegMean", "regmean", 1.0, {}),
            ("ZipIt!", "zipit", 1.0, {}), ("PLeaS, identity matching", "pleas", 1.0, {"matching": "identity"})]
    residuals = ("permutation", "orthogonal") if family_rotates else ("permutation",)
    for budget in budgets:
        for residual in residuals:
            extra = {"residual": residual} if residual != "permutation" else {}
            suffix = ", rotated stream" if extra else ""
            plan.append((f"Git Re-Basin{suffix}", "rebasin", budget, extra))
            plan.append((f"PLeaS{suffix}", "pleas", budget, extra))
    for budget in (b for b in budgets if b in (1.0, 2.0)):
        plan.append((f"PLeaS + {PLEAS_DISTILL_STEPS} distillation steps", "pleas", budget,
                     {"distill_steps": PLEAS_DISTILL_STEPS, **({"distill_lr": distill_lr} if distill_lr else {})}))
    plan.append(("ensemble (method)", "ensemble", 2.0, {}))
    return plan


# ------------------------------------------------------------------------------------------------ LMs

def _bpb(model: nn.Module, count: int) -> dict[str, float]:
    from ..experiments import lm

    row = {d: lm.bits_per_byte(model, d, count=count) for d in BYTE_DOMAINS}
    row["mean"] = sum(row.values()) / len(BYTE_DOMAINS)
    return row


def distill_lm(student: nn.Module, teacher_a: nn.Module, teacher_b: nn.Module, ids: torch.Tensor, seconds: float,
               *, seed: int = 0) -> tuple[nn.Module, int]:
    """Train a copy of ``student`` for ``seconds`` of wall time to match the logit-average ensemble's
    next-byte distributions on ``ids`` (:func:`pleas.refit.distill.distill`: KL divergence, Adam at
    :data:`DISTILL_LR` without warm-up, batches of :data:`DISTILL_BATCH` windows in a seeded order, eval
    mode, every weight free). The teacher's logits are computed first, inside the time. Returns the
    student (eval mode) and the steps taken."""
    from ..refit.distill import distill

    student = copy.deepcopy(student)
    entry = distill(student, [teacher_a, teacher_b], list(ids.split(64)), steps=1 << 40, seconds=seconds,
                    lr=DISTILL_LR, batch_size=DISTILL_BATCH, loss="kl", warmup=0, keep_zeros=False, seed=seed,
                    progress=False)
    return student.eval(), entry["steps"]


def lm_pair_rows(family: str, *, budgets: tuple[float, ...] = BUDGETS, calibration: int = LM_CALIBRATION,
                 eval_windows: int = LM_EVAL_WINDOWS, distill: bool = True,
                 log: Callable[[str], None] = print) -> dict:
    """Every row of one LM pair (trained on first use, then cached)."""
    from ..experiments import lm

    a, b = lm.lm_pair(family, log=log)
    A, B = a.model, b.model
    ids = byte_windows(calibration, lm.LM_LENGTH, seed=0)
    rows = []

    def add(label, method, budget, metrics, seconds=None, **extra):
        rows.append({"row": label, "method": method, "budget": budget, **metrics, "seconds": seconds, **extra})
        log(f"  {family}: {label:34s} {budget if budget else '':>5} mean {metrics['mean']:.3f} bpb"
            + (f" ({seconds:.1f} s)" if seconds else ""))

    add("source A (code)", "source", None, _bpb(A, eval_windows))
    add("source B (prose)", "source", None, _bpb(B, eval_windows))
    ens = {d: lm.logit_average_bits_per_byte(A, B, d, count=eval_windows) for d in BYTE_DOMAINS}
    add("logit average", "logit average", None, {**ens, "mean": sum(ens.values()) / 2})
    mix = {d: lm.mixture_bits_per_byte(A, B, d, count=eval_windows) for d in BYTE_DOMAINS}
    add("mixture", "mixture", None, {**mix, "mean": sum(mix.values()) / 2})
    floor = forward_floor([A, B], ids, batch_size=256)
    pleas_1x = None
    for label, method, budget, extra in _plan(family == "llama", budgets):
        result, seconds, notes = _quiet_merge(A, B, ids, method=method, budget=budget,
                                              budget_metric="effective_params", **extra)
        size = result.report["size"]
        add(label, method, budget, _bpb(result.model, eval_windows), seconds,
            residual=extra.get("residual", "permutation"), matching=extra.get("matching", "activation"),
            size_effective=size.get("relative_effective"), size_dense=size.get("relative_dense"),
            widths={k: getattr(result.model.config, k, None) for k in ("hidden_size", "num_attention_heads",
                                                                         "intermediate_size", "n_inner")}
            if hasattr(result.model, "config") else {}, warnings=notes)
        if method == "pleas" and budget == 1.0 and not extra:
            pleas_1x = (result.model, seconds)
    if distill and pleas_1x is not None:
        merged, seconds = pleas_1x
        for factor in (1, DISTILL_LONG):
            for label, start in (("distilled into A", A), ("distilled from PLeaS", merged)):
                student, steps = distill_lm(start, A, B, ids, seconds * factor)
                add(f"{label}, {factor}x the merge's time", "distillation", 1.0, _bpb(student, eval_windows),
                    seconds * factor, steps=steps)
    return {"family": family, "config": lm.LM_CONFIGS[family], "recipes": [a.recipe.describe(), b.recipe.describe()],
            "calibration_windows": calibration, "window": lm.LM_LENGTH, "eval_windows": eval_windows,
            "forward_floor_seconds": floor, "rows": rows}


# ------------------------------------------------------------------------------------------------ ViT

def vit_pair_rows(*, budgets: tuple[float, ...] = BUDGETS, calibration: int = VIT_CALIBRATION, distill: bool = False,
                  log: Callable[[str], None] = print) -> dict:
    """Every row of the ViT pair (separate heads; accuracy of each head on its own digits)."""
    from ..experiments import sources, train
    from .tasks import task_calibration

    a, b = sources.vit_models(log=log)
    A, B = a.model, b.model
    data = task_calibration(a, b, calibration, seed=0)
    rows = []

    def accuracy(model, separate=True):
        row = {"0-4": train.evaluate(model, a.test_set, output_index=0 if separate else None),
               "5-9": train.evaluate(model, b.test_set, output_index=1 if separate else None)}
        row["mean"] = (row["0-4"] + row["5-9"]) / 2
        return row

    def add(label, method, budget, metrics, seconds=None, **extra):
        rows.append({"row": label, "method": method, "budget": budget, **metrics, "seconds": seconds, **extra})
        log(f"  vit: {label:34s} {budget if budget else '':>5} mean {metrics['mean']:.3f}"
            + (f" ({seconds:.1f} s)" if seconds else ""))

    sources_row = {"0-4": train.evaluate(A, a.test_set), "5-9": train.evaluate(B, b.test_set)}
    add("sources (each on its own digits)", "source", None, {**sources_row, "mean": sum(sources_row.values()) / 2})
    floor = forward_floor([A, B], data)
    for label, method, budget, extra in _plan(False, budgets, distill_lr=VIT_DISTILL_LR):
        result, seconds, notes = _quiet_merge(A, B, data, method=method, budget=budget, heads="separate",
                                              budget_metric="effective_params", **extra)
        add(label, method, budget, accuracy(result.model), seconds,
            size_effective=result.report["size"].get("relative_effective"), warnings=notes)
    return {"family": "vit", "kwargs": sources.VIT_KWARGS, "calibration": calibration,
            "forward_floor_seconds": floor, "rows": rows}


def run_transformers(*, families: tuple[str, ...] = LM_FAMILIES, vit: bool = True, budgets: tuple[float, ...] = BUDGETS,
                     log: Callable[[str], None] = print) -> dict:
    """The whole transformer benchmark, as a JSON-able dict."""
    torch.manual_seed(0)
    out = {"lm": [lm_pair_rows(f, budgets=budgets, log=log) for f in families]}
    if vit:
        out["vit"] = vit_pair_rows(budgets=budgets, log=log)
    return out


# ------------------------------------------------------------------------------------------------ report

def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _gap_closed(worse: float, value: float, best: float) -> str:
    if worse == best:
        return "-"
    share = (worse - value) / (worse - best)
    return f"{share:.0%}".replace("-0%", "0%")


def render_lm(pair: dict) -> list[str]:
    rows = pair["rows"]
    by = {(r["row"], r["budget"]): r for r in rows}
    avg = by[("weight average", 1.0)]
    a, b = by[("source A (code)", None)], by[("source B (prose)", None)]
    best = min(a["mean"], b["mean"])
    floor = pair["forward_floor_seconds"]
    lines = [f"### {pair['family']} byte LMs: code vs prose", "",
             f"Sources: {pair['recipes'][0]}; {pair['recipes'][1]}. Calibration: {pair['calibration_windows']} windows "
             f"of {pair['window']} bytes (half code, half prose); bits per byte on {pair['eval_windows']} held-out "
             f"windows per domain. Forward floor (both sources over the calibration data): {floor:.2f} s.", "",
             "| row | budget | code | prose | mean | gap closed | seconds | x floor |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        closed = _gap_closed(avg["mean"], r["mean"], best) if r["method"] not in ("source",) else "-"
        secs = r.get("seconds")
        lines.append(f"| {r['row']} | {r['budget'] if r['budget'] else '-'} | {_fmt(r['code'])} | {_fmt(r['prose'])} | "
                     f"{_fmt(r['mean'])} | {closed} | {'-' if not secs else f'{secs:.1f}'} | "
                     f"{'-' if not secs or r['method'] == 'distillation' else f'{secs / floor:.1f}'} |")
    lines += ["", "*gap closed*: the share of the way from the weight average to the better source, in mean bits "
              "per byte (100%: as good as the better source). *x floor*: merge time over the forward floor.", ""]
    reference = by.get(("logit average", None))
    side_by_side = [r for r in rows if r["method"] == "pleas" and r["budget"] == 2.0]
    if reference and side_by_side:
        lines += ["Both models side by side (2x) against the logit average: " + "; ".join(
            f"{r['row']} {r['mean'] - reference['mean']:+.3f} bits per byte" for r in side_by_side) + ".", ""]
    return lines


def render_vit(pair: dict) -> list[str]:
    by = {(r["row"], r["budget"]): r for r in pair["rows"]}
    avg, src = by[("weight average", 1.0)]["mean"], by[("sources (each on its own digits)", None)]["mean"]
    lines = ["### ViT pair: MNIST digits 0-4 vs 5-9, separate heads", "",
             f"timm VisionTransformer {pair['kwargs']}; {pair['calibration']} calibration images from both halves; "
             f"forward floor {pair['forward_floor_seconds']:.2f} s.", "",
             "| row | budget | acc 0-4 | acc 5-9 | mean | gap closed | seconds |", "|---|---|---|---|---|---|---|"]
    for r in pair["rows"]:
        secs = r.get("seconds")
        closed = "-" if r["method"] == "source" else _gap_closed(avg, r["mean"], src)
        lines.append(f"| {r['row']} | {r['budget'] if r['budget'] else '-'} | {_fmt(r['0-4'])} | {_fmt(r['5-9'])} | "
                     f"{_fmt(r['mean'])} | {closed} | {'-' if not secs else f'{secs:.1f}'} |")
    return lines + ["", "*gap closed*: the share of the way from the weight average to the sources' mean accuracy.", ""]


def render(results: dict) -> str:
    lines = ["## Transformers", ""]
    for pair in results.get("lm", []):
        lines += render_lm(pair)
    if "vit" in results:
        lines += render_vit(results["vit"])
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    """Mean bits per byte against the budget, one panel per LM pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = results.get("lm", [])
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 3.6), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        rows = pair["rows"]
        curves = sorted({r["row"] for r in rows if r["method"] in ("pleas", "rebasin") and r["budget"]})
        references = [r for r in rows if r["method"] in ("logit average", "mixture") or r["row"].startswith("source")]
        budget_panel(ax, rows, curves, references, title=f"{pair['family']}: code vs prose", ylabel="mean bits per byte")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
