"""The report's sections on the two studies beside the merge tables: the distillation baseline
(:mod:`.distill`) and the calibration-size axis (:mod:`.calibration_size`), rendered from the raw
results alone. Each section says what was measured, a verdict computed from the numbers, a plot and
the tables; a run that did not measure a study renders no section for it."""
from __future__ import annotations

from . import fmt
from .aggregate import Stat, Summary
from .calibration_size import refit_summary
from .distill import STUDENTS

#: The baselines of the calibration-size axis that PLeaS is compared with, with their names in the text.
AXIS_BASELINES = {"zipit": "ZipIt!", "rebasin-activation": "Git Re-Basin"}
#: "Holds up" on the axis: PLeaS's accuracy within this much of its accuracy at the largest size.
AXIS_TOLERANCE = 0.01


def _combo(task: str, arch: str) -> str:
    return f"{task} / {arch}"


def _span(values: list[float]) -> str:
    """``+0.4`` or ``-1.2 to +0.4`` points."""
    lo, hi = min(values), max(values)
    return fmt.points(lo) if abs(hi - lo) < 5e-4 else f"{fmt.points(lo)} to {fmt.points(hi)}"


def _ratio_span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.1f}x" if hi - lo < 0.05 else f"{lo:.1f}-{hi:.1f}x"


def _checkpoint(found: dict, point: str) -> str:
    """``0.973 (4.1 s, 12.0 ep)`` for one checkpoint of a student; at the time budget, "converged first"
    where a pair's student converged before PLeaS's time was up."""
    acc = found.get(f"{point}.mean_acc")
    if acc is None:
        return "-"
    text = f"{fmt.spread(acc)} ({fmt.seconds(found[f'{point}.seconds'].mean)}, {found[f'{point}.epochs'].mean:.1f} ep)"
    if point == "at_budget" and found["budget_reached"] < len(found["pairs"]):
        text += " converged first"
    return text


def _stopped(found: dict) -> str:
    reasons = found["stopped"]
    return ", ".join(f"{reasons.count(r)}x {r}" if len(reasons) > 1 else r for r in dict.fromkeys(reasons))


def _distill_verdict(summary: Summary) -> list[str]:
    """The comparisons the distillation rows exist for, as bullet points with their numbers."""
    lines = []
    source_at, source_conv, source_ratio, pleas_conv, pleas_at, head_start = [], [], [], [], [], []
    for task, arch in summary.distill_combos():
        for budget in summary.distill_budgets(task, arch, "kd-pleas"):
            found = summary.distill(task, arch, "kd-pleas", budget)
            pleas_at.append(found["at_budget.mean_acc"].mean - found["merge_mean_acc"].mean)
            pleas_conv.append(found["converged.mean_acc"].mean - found["merge_mean_acc"].mean)
        source = summary.distill(task, arch, "kd-source", 1.0)
        merged = summary.distill(task, arch, "kd-pleas", 1.0)
        if source is None:
            continue
        source_at.append((_combo(task, arch), source["at_budget.mean_acc"].mean - source["merge_mean_acc"].mean))
        source_conv.append((_combo(task, arch), source["converged.mean_acc"].mean - source["merge_mean_acc"].mean))
        source_ratio.append(source["converged.seconds"].mean / source["merge_seconds"].mean)
        if merged is not None:
            head_start.append(merged["converged.mean_acc"].mean - source["converged.mean_acc"].mean)
    if source_at:
        behind = [c for c, d in source_at if d < 0]
        lines.append(f"- **Merging against distilling from model A, at PLeaS's wall time (1x):** the student is behind "
                     f"PLeaS on {len(behind)} of {len(source_at)} task/architecture pairs "
                     f"({_span([d for _, d in source_at])} points against PLeaS).")
        ahead = [c for c, d in source_conv if d > 0]
        lines.append(f"- **At convergence (1x)** it is ahead of PLeaS on {len(ahead)} of {len(source_conv)} "
                     f"({_span([d for _, d in source_conv])} points), after {_ratio_span(source_ratio)} PLeaS's "
                     "wall time" + (": " + ", ".join(ahead) + "." if ahead else "."))
    if head_start:
        lines.append(f"- **PLeaS as a starting point (1x):** distilling from the PLeaS merge ends "
                     f"{_span(head_start)} points against distilling from model A with the same epoch cap.")
    if pleas_conv:
        lines.append(f"- **Distilling after PLeaS** (kd-pleas against the merge it starts from, every budget): "
                     f"{_span(pleas_at)} points after as long again as the merge took, {_span(pleas_conv)} at "
                     "convergence.")
    return lines


def _distill_method_text(results: dict) -> list[str]:
    config = results.get("config", {})
    first = results["distill"][0]["settings"]
    caps = config.get("distill_epochs") or {}
    cap_text = ", ".join(f"{arch} {epochs}" for arch, epochs in caps.items())
    samples = config.get("calibration", "?")
    pairs = sorted({r["pair"] for r in results["distill"]})
    return [
        f"Would a user do better by distilling the two source models into one network of the merged size? Each "
        f"student is trained on the merge's own {samples} calibration inputs, without labels, to reproduce the "
        "ensemble's logits (with separate heads each source's own logits on its head; with a shared head the mean of "
        "the two models' logits), by the squared logit error (the large-temperature limit of the softened KL "
        "objective, and what PLeaS's refit fits layer by layer). "
        f"Adam, learning rate {first['lr']:g} after a {first['warmup_epochs']}-epoch linear warm-up, minibatches of "
        f"{first['batch_size']}, BatchNorm statistics frozen (eval mode; its affine parameters train), seed pair(s) "
        f"{', '.join(map(str, pairs))} only. Students:",
        "",
        f"- `kd-source`: {STUDENTS['kd-source']}: A's weights, and with separate heads A's and B's heads side by side "
        "on A's body (B's head reads features it was never trained on).",
        f"- `kd-pleas`: {STUDENTS['kd-pleas']} of the same budget, so its total cost is the merge's time plus its own.",
        "",
        "Each student is evaluated **at PLeaS's wall time** (its clock includes the teacher's one pass over the "
        "calibration data, and stops at the first step that ends after PLeaS's merge time for the same budget and pair) "
        f"and **at convergence**: the epoch's mean loss not {100 * first['min_decrease']:g}% below its best for "
        f"{first['patience']} epochs in a row, or the epoch cap ({cap_text}), set by cost. Evaluation time is not "
        "counted. Cells: mean accuracy (seconds, epochs).",
        "",
    ]


def distill_section(results: dict, summary: Summary, link: str | None) -> list[str]:
    """The distillation baseline: what it is, the verdicts, the plot and one table over every pair."""
    combos = summary.distill_combos()
    if not combos:
        return []
    lines = ["## Distillation baseline", ""] + _distill_method_text(results)
    lines += _distill_verdict(summary) + [""]
    if link:
        lines += [f"![Distillation against PLeaS: accuracy against wall time]({link})", ""]
    rows = []
    for task, arch in combos:
        pairs = summary.distill(task, arch, "kd-pleas", summary.distill_budgets(task, arch, "kd-pleas")[0])["pairs"]
        ensemble = fmt.spread(summary.pairs_mean_acc(task, arch, "ensemble", None, pairs))
        budgets = sorted(set(summary.distill_budgets(task, arch, "kd-pleas"))
                         | set(summary.distill_budgets(task, arch, "kd-source")))
        for budget in budgets:
            merged = summary.distill(task, arch, "kd-pleas", budget)
            source = summary.distill(task, arch, "kd-source", budget)
            any_found = merged or source
            cells = [_combo(task, arch), fmt.budget(budget), ensemble,
                     f"{fmt.spread(any_found['merge_mean_acc'])} ({fmt.seconds(any_found['merge_seconds'].mean)})"]
            for found in (merged, source):
                if found is None:
                    cells += ["-", "-", "-"]
                else:
                    cells += [_checkpoint(found, "at_budget"), _checkpoint(found, "converged"), _stopped(found)]
            rows.append(cells)
    lines += [fmt.table(["task / arch", "budget", "ensemble", "PLeaS (merge s)", "kd-pleas at PLeaS's time",
                         "kd-pleas converged", "stopped", "kd-source at PLeaS's time", "kd-source converged",
                         "stopped"], rows), ""]
    return lines


def distill_seconds(results: dict) -> dict[str, float]:
    """Wall seconds the distillation took per "task/arch": every student's ``wall_seconds`` and one
    teacher pass per seed pair (records without ``wall_seconds`` are left out)."""
    seconds: dict[str, float] = {}
    teachers: dict[tuple, float] = {}
    for r in results.get("distill", []):
        if r.get("wall_seconds") is None:
            continue
        combo = f"{r['task']}/{r['arch']}"
        seconds[combo] = seconds.get(combo, 0.0) + r["wall_seconds"]
        teachers[(combo, r["pair"])] = r["teacher_seconds"]
    for (combo, _), teacher in teachers.items():
        seconds[combo] += teacher
    return seconds


def distill_rows(summary: Summary, task: str, arch: str, budgets: list[float]) -> list[list[str]]:
    """Rows of the per-task accuracy table: each student at PLeaS's time and converged, per budget."""
    rows = []
    for student in STUDENTS:
        measured = summary.distill_budgets(task, arch, student)
        if not measured:
            continue
        pairs = len(summary.distill(task, arch, student, measured[0])["pairs"])
        for point, text in (("at_budget", "at PLeaS's time"), ("converged", "converged")):
            cells = []
            for b in budgets:
                found = summary.distill(task, arch, student, b)
                cells.append("-" if found is None else fmt.spread(found[f"{point}.mean_acc"]))
            rows.append([f"{student}, {text} ({pairs} pair{'s' if pairs > 1 else ''})", *cells])
    return rows


# ------------------------------------------------------------------------------------------- calibration size


def _axis_acc(summary: Summary, task: str, arch: str, method: str, samples: int) -> Stat | None:
    records = [r for r in summary.axis(task, arch, method, samples) if "mean_acc" in r]
    return Stat.of(r["mean_acc"] for r in records) if records else None


def _axis_verdict(summary: Summary) -> list[str]:
    lines = []
    for task, arch in summary.axis_combos():
        sizes = [s for s, _ in summary.axis_sizes(task, arch)]
        pleas = {s: _axis_acc(summary, task, arch, "pleas", s) for s in sizes}
        pleas = {s: v for s, v in pleas.items() if v is not None}
        if not pleas:
            continue
        largest = max(pleas)
        holds = [s for s in sorted(pleas) if all(pleas[t].mean >= pleas[largest].mean - AXIS_TOLERANCE
                                                 for t in pleas if t >= s)]
        text = (f"- {_combo(task, arch)}: PLeaS {pleas[min(pleas)].mean:.3f} at {min(pleas)} samples, "
                f"{pleas[largest].mean:.3f} at {largest}; within {100 * AXIS_TOLERANCE:g} point of that from "
                f"{holds[0]} samples on.")
        behind = []
        for method, name in AXIS_BASELINES.items():
            for s in sorted(pleas):
                other = _axis_acc(summary, task, arch, method, s)
                if other is not None and other.mean >= pleas[s].mean:
                    behind.append(f"{name} at {s} ({other.mean:.3f} vs {pleas[s].mean:.3f})")
        measured = any(_axis_acc(summary, task, arch, m, s) for m in AXIS_BASELINES for s in sizes)
        if measured:
            text += (" Ahead of " + " and ".join(AXIS_BASELINES.values()) + " at every size." if not behind else
                     " Not ahead of " + ", ".join(behind) + ".")
        failed = [f"{r['method']} at {r['samples']}: {r['error']}" for s in sizes for m in summary.axis_methods()
                  for r in summary.axis(task, arch, m, s) if "error" in r]
        if failed:
            text += " Failed: " + "; ".join(failed) + "."
        lines.append(text)
    return lines


def _size_label(samples: int, requested: int) -> str:
    return str(samples) if samples == requested else f"{samples} ({requested} asked: cap)"


def _refit_cells(summary: Summary, task: str, arch: str, sizes: list[int]) -> list[list[str]]:
    """Rows on PLeaS's refit at each size (from its report's per-layer entries; first pair)."""
    fits = []
    for s in sizes:
        records = [r for r in summary.axis(task, arch, "pleas", s) if r.get("refit")]
        fits.append(refit_summary(records[0]["refit"]) if records else None)
    if not any(fits):
        return []
    return [
        ["pleas refit: layers with fewer rows than columns",
         *("-" if f is None else f"{f['underdetermined']} / {f['layers']}" for f in fits)],
        ["pleas refit: mean relative error on the calibration rows, before -> after",
         *("-" if f is None or f["mean_after"] is None else f"{f['mean_before']:.3f} -> {f['mean_after']:.3f}"
           for f in fits)],
        ["pleas refit: largest error after (layer)",
         *("-" if f is None or f["worst"] is None else f"{f['worst']['error_after']:.3f} ({f['worst']['layer']})"
           for f in fits)],
    ]


def axis_section(results: dict, summary: Summary, link: str | None) -> list[str]:
    """The calibration-size axis: what it is, the verdicts, the plot and a table per task and architecture."""
    combos = summary.axis_combos()
    if not combos:
        return []
    pairs = sorted({r["pair"] for r in results["calibration_sizes"]})
    lines = ["## Calibration size", "",
             "PLeaS, ZipIt! and Git Re-Basin (activation matching) at 1x against the number of calibration samples, "
             f"on seed pair(s) {', '.join(map(str, pairs))}, half of the samples from each domain's training split. "
             "Every size draws with the same seed, so on each domain a smaller set is part of every larger one. A size "
             "beyond what the training splits hold uses the largest they hold (marked cap). Under PLeaS, what its "
             "report says about the least-squares refit: the layers fitted on fewer sampled rows than they have "
             "input columns (the fit then interpolates the calibration rows, held in place only by the ridge), and "
             "the relative fit error on the calibration rows before and after the refit (in-sample: it falls as the "
             "fit gets underdetermined, while the accuracy falls too).", ""]
    lines += _axis_verdict(summary) + [""]
    if link:
        lines += [f"![Accuracy at 1x against calibration size]({link})", ""]
    for task, arch in combos:
        sizes = summary.axis_sizes(task, arch)
        used = [s for s, _ in sizes]
        ensemble = summary.pairs_mean_acc(task, arch, "ensemble", None, pairs)
        lines += [f"### {_combo(task, arch)}: calibration size", "",
                  "Mean accuracy at 1x" + (f" (ensemble {fmt.spread(ensemble)})" if ensemble else "")
                  + ", then PLeaS's refit, then seconds per merge:", ""]
        rows = [[m, *(fmt.spread(_axis_acc(summary, task, arch, m, s)) for s in used)] for m in summary.axis_methods()]
        rows += _refit_cells(summary, task, arch, used)
        for m in summary.axis_methods():
            seconds = [[r["seconds"] for r in summary.axis(task, arch, m, s) if "seconds" in r] for s in used]
            rows.append([f"{m} (s)", *(f"{sum(v) / len(v):.2f}" if v else "-" for v in seconds)])
        lines += [fmt.table(["", *(_size_label(s, r) for s, r in sizes)], rows), ""]
    return lines
