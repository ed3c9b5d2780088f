"""The paper's claims (docs/algorithm.md section 7), checked against the benchmark's numbers.

Each check returns a :class:`Finding`: the claim, a verdict written from the numbers (where a claim does
not hold it says so and gives them), a table per task and architecture, and ``holds`` (True, False, or
None when the run did not measure what the claim needs). Thresholds are the module constants.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import fmt
from .aggregate import Stat, Summary

#: "Within a few points": PLeaS-free's mean accuracy at most this far below PLeaS's, at every budget.
FEW_POINTS = 0.03
#: "Most of the gap": at least this fraction of the Git Re-Basin (1x) -> ensemble gap closed.
MOST_OF_GAP = 0.5
#: A gap smaller than this (ensemble minus Git Re-Basin at 1x) leaves nothing to close.
NO_GAP = 0.005
#: Target for PLeaS's merge time on resnet18, in forward floors.
FLOOR_TARGET = 5.0
#: The baselines PLeaS should beat at 1x, with their names in the text.
BASELINES = {
    "zipit": "ZipIt!",
    "rebasin-activation": "Git Re-Basin (activation)",
    "rebasin-weight": "Git Re-Basin (weight)",
    "regmean": "RegMean",
    "average": "averaging",
}
#: Architecture whose speed the floor target is about.
SPEED_ARCH = "resnet18"
#: PLeaS under effective budgets with each allocation (the bench's ``pleas-eff-*`` setups), and its budgets.
EFFECTIVE_ALLOCATIONS = {"uniform": "pleas-eff-uniform", "prefix": "pleas-eff-prefix",
                         "downstream": "pleas-eff-downstream"}
ALLOCATION_BUDGETS = (1.2, 1.5)


@dataclass
class Finding:
    title: str
    claim: str
    verdict: str
    table: str
    holds: bool | None


def _combo(task: str, arch: str) -> str:
    return f"{task} / {arch}"


def _within_spread(a: Stat, b: Stat) -> bool:
    """Whether two means differ by no more than the larger of their seed spreads (needs 2+ pairs)."""
    return min(a.n, b.n) > 1 and abs(a.mean - b.mean) <= max(a.std, b.std)


def _overall(holding: list[str], failing: list[str], unmeasured: list[str]) -> tuple[str, bool | None]:
    measured = len(holding) + len(failing)
    if not measured:
        return "Not measured in this run.", None
    text = f"Holds on {len(holding)} of {measured} task/architecture pairs."
    if failing:
        text += " Does not hold on " + "; ".join(failing) + "."
    if unmeasured:
        text += " Not measured on " + ", ".join(unmeasured) + "."
    return text, not failing


def pleas_above_baselines(s: Summary) -> Finding:
    """PLeaS's mean accuracy at 1x above each baseline's."""
    present = [m for m in BASELINES if any(s.merge(t, a, m, 1.0) for t, a in s.combos)]
    rows, holding, failing, unmeasured = [], [], [], []
    for task, arch in s.combos:
        pleas = s.mean_acc(task, arch, "pleas", 1.0)
        others = {m: s.mean_acc(task, arch, m, 1.0) for m in present}
        others = {m: v for m, v in others.items() if v is not None}
        cells = [fmt.spread(pleas)] + [fmt.spread(s.mean_acc(task, arch, m, 1.0)) for m in present]
        if pleas is None or not others:
            unmeasured.append(_combo(task, arch))
            rows.append([_combo(task, arch), *cells, "not measured"])
            continue
        best = max(others, key=lambda m: others[m].mean)
        margin = pleas.mean - others[best].mean
        note = " (within the seed spread)" if _within_spread(pleas, others[best]) else ""
        if margin > 0:
            holding.append(_combo(task, arch))
            verdict = f"holds: {fmt.points(margin)} points over {BASELINES[best]}{note}"
        else:
            beaten = [m for m in others if others[m].mean >= pleas.mean]
            said = ", ".join(f"{BASELINES[m]} {others[m].mean:.3f}" for m in beaten)
            failing.append(f"{_combo(task, arch)} ({said} vs PLeaS {pleas.mean:.3f})")
            verdict = f"fails: {said} vs PLeaS {pleas.mean:.3f}{note}"
        rows.append([_combo(task, arch), *cells, verdict])
    text, holds = _overall(holding, failing, unmeasured)
    table = fmt.table(["task / arch", "PLeaS", *(BASELINES[m] for m in present), "verdict"], rows)
    return Finding("PLeaS is the best merge at 1x",
                   "PLeaS is more accurate than ZipIt!, Git Re-Basin, RegMean and averaging at 1x.", text, table, holds)


def gap_closed(s: Summary) -> Finding:
    """The fraction of the Git Re-Basin (1x) -> ensemble gap that PLeaS closes at 1x, 1.2x and 1.5x."""
    budgets = (1.0, 1.2, 1.5)
    rows, holding, failing, unmeasured, closed_12 = [], [], [], [], []
    for task, arch in s.combos:
        rebasin = s.mean_acc(task, arch, "rebasin-activation", 1.0)
        ensemble = s.mean_acc(task, arch, "ensemble", None)
        pleas = {b: s.mean_acc(task, arch, "pleas", b) for b in budgets}
        if rebasin is None or ensemble is None or all(v is None for v in pleas.values()):
            unmeasured.append(_combo(task, arch))
            rows.append([_combo(task, arch), fmt.spread(rebasin), fmt.spread(ensemble), "-", "-", "-", "not measured"])
            continue
        gap = ensemble.mean - rebasin.mean
        if gap < NO_GAP:
            rows.append([_combo(task, arch), fmt.spread(rebasin), fmt.spread(ensemble), "-", "-", "-",
                         "no gap: Git Re-Basin is within half a point of the ensemble"])
            unmeasured.append(f"{_combo(task, arch)} (no gap to close)")
            continue
        fractions = {b: None if v is None else (v.mean - rebasin.mean) / gap for b, v in pleas.items()}
        cells = [fmt.spread(rebasin), fmt.spread(ensemble)] + [
            "-" if pleas[b] is None else f"{pleas[b].mean:.3f} ({fmt.percent(fractions[b])})" for b in budgets]
        judged = 1.2 if fractions[1.2] is not None else (1.5 if fractions[1.5] is not None else None)
        if judged is None:
            unmeasured.append(_combo(task, arch))
            rows.append([_combo(task, arch), *cells, "not measured at 1.2x or 1.5x"])
            continue
        if judged == 1.2:
            closed_12.append(fractions[1.2])
        ok = fractions[judged] >= MOST_OF_GAP
        verdict = f"{'holds' if ok else 'fails'}: {fmt.percent(fractions[judged])} closed at {judged:g}x"
        (holding if ok else failing).append(
            _combo(task, arch) if ok else f"{_combo(task, arch)} ({fmt.percent(fractions[judged])} at {judged:g}x)")
        rows.append([_combo(task, arch), *cells, verdict])
    text, holds = _overall(holding, failing, unmeasured)
    if closed_12:
        text += (f" At 1.2x PLeaS closes {fmt.percent(min(closed_12))} to {fmt.percent(max(closed_12))} of the gap "
                 f"(mean {fmt.percent(sum(closed_12) / len(closed_12))}).")
    table = fmt.table(["task / arch", "Git Re-Basin 1x", "ensemble", "PLeaS 1x (gap closed)", "PLeaS 1.2x",
                       "PLeaS 1.5x", "verdict"], rows)
    return Finding("Most of the gap to the ensemble is closed by 1.2x",
                   f"About 1.2x closes most (here: at least {fmt.percent(MOST_OF_GAP)}) of the gap between Git "
                   "Re-Basin at 1x and the ensemble; the fraction is (PLeaS - Git Re-Basin) / (ensemble - Git Re-Basin).",
                   text, table, holds)


#: PLeaS-free's variants (bench labels) and their names: the best of them at each budget is compared with
#: PLeaS. The ablations say which stage of PLeaS loses what on free data (each against PLeaS).
FREE_VARIANTS = {"pleas-free": "other data", "pleas-synthetic": "synthesised"}
FREE_ABLATIONS = {"pleas-free-norms": "norm statistics from free data", "pleas-free-match": "matching on free data",
                  "pleas-free-refit": "refit on free data"}
#: The ablations that give one stage free data and the others the task's (the norm statistics' ablation
#: changes every stage's data).
ONE_STAGE = ("pleas-free-match", "pleas-free-refit")
#: The same merges with both sources whole (2x in effective parameters): PLeaS's label, then the variants'.
WHOLE_SUFFIX = "-whole"
WHOLE_BUDGET = 2.0
#: Where both sources are whole, PLeaS-free may lose at most this much mean accuracy.
WHOLE_POINTS = 0.01


def _against_pleas(s: Summary, task: str, arch: str, label: str, budget: float, reference: str = "pleas") -> float | None:
    """``label``'s mean accuracy minus ``reference``'s at ``budget``, both over the seed pairs ``label`` ran
    on (the extra free-data rows run on fewer pairs than PLeaS); None if either is missing."""
    pairs = s.pairs(task, arch, label, budget)
    ours = s.pairs_mean_acc(task, arch, label, budget, pairs)
    theirs = s.pairs_mean_acc(task, arch, reference, budget, pairs)
    return None if ours is None or theirs is None else ours.mean - theirs.mean


def _free_seconds(s: Summary, task: str, arch: str, budget: float) -> str:
    """Merge seconds of PLeaS and each free variant at ``budget``, with the synthesis's own time."""
    parts = []
    for label, name in {"pleas": "PLeaS", **FREE_VARIANTS}.items():
        found = s.merge(task, arch, label, budget)
        if found:
            extra = f" + {found['synthesis_seconds'].mean:.3g} synthesis" if "synthesis_seconds" in found else ""
            parts.append(f"{name} {found['seconds'].mean:.3g}{extra}")
    return "; ".join(parts)


def _whole(s: Summary, task: str, arch: str) -> dict[str, float]:
    """Each free variant against PLeaS where both sources are whole ({name: difference}; empty if not run)."""
    found = {}
    for label, name in FREE_VARIANTS.items():
        diff = _against_pleas(s, task, arch, label + WHOLE_SUFFIX, WHOLE_BUDGET, "pleas" + WHOLE_SUFFIX)
        if diff is not None:
            found[name] = diff
    return found


def free_near_pleas(s: Summary) -> Finding:
    """The best PLeaS-free variant's mean accuracy at most :data:`FEW_POINTS` below PLeaS's at every
    budget (each variant against PLeaS on the seed pairs it ran on) and, where both sources are whole,
    at most :data:`WHOLE_POINTS` below; with the ablation rows (each at the first budget) that show where
    any loss comes from."""
    rows, holding, failing, unmeasured = [], [], [], []
    for task, arch in s.combos:
        budgets = [b for b in s.budgets(task, arch, "pleas") if b is not None
                   and any(s.merge(task, arch, v, b) for v in FREE_VARIANTS)]
        if not budgets:
            unmeasured.append(_combo(task, arch))
            rows.append([_combo(task, arch), "-", "-", "-", "-", "-", "-", "-", "not measured"])
            continue
        best, diffs = {}, {}
        for b in budgets:
            found = {v: d for v in FREE_VARIANTS if (d := _against_pleas(s, task, arch, v, b)) is not None}
            best[b] = max(found, key=found.get)
            diffs[b] = found[best[b]]
        worst = min(diffs, key=diffs.get)
        whole = _whole(s, task, arch)
        whole_best = max(whole.values()) if whole else None
        first = budgets[0]
        problems = []
        if diffs[worst] < -FEW_POINTS:
            problems.append(f"{fmt.points(diffs[worst])} points at {worst:g}x")
        if whole_best is not None and whole_best < -WHOLE_POINTS:
            problems.append(f"{fmt.points(whole_best)} points with both whole")
        verdict = (f"{'fails' if problems else 'holds'}: at worst {fmt.points(diffs[worst])} points ({worst:g}x)"
                   + (f"; both whole {fmt.points(whole_best)}" if whole_best is not None else ""))
        stages = {name: d for label, name in FREE_ABLATIONS.items() if label in ONE_STAGE
                  and (d := _against_pleas(s, task, arch, label, first)) is not None}
        if problems and len(stages) > 1:  # which stage's data the loss follows (each ablation changes one)
            ranked = sorted(stages, key=stages.get)
            verdict += (f"; the loss follows the {ranked[0]} ({fmt.points(stages[ranked[0]])} at {first:g}x; "
                        + ", ".join(f"{n} {fmt.points(stages[n])}" for n in ranked[1:]) + ")")
        (failing if problems else holding).append(
            f"{_combo(task, arch)} ({', '.join(problems)})" if problems else _combo(task, arch))
        parts = [f"{name} {fmt.points(d)}" for label, name in {**FREE_VARIANTS, **FREE_ABLATIONS}.items()
                 if (d := _against_pleas(s, task, arch, label, first)) is not None]
        rows.append([_combo(task, arch), f"{first:g}x", fmt.spread(s.mean_acc(task, arch, "pleas", first)),
                     f"{fmt.spread(s.mean_acc(task, arch, best[first], first))} ({FREE_VARIANTS[best[first]]})",
                     " / ".join(f"{fmt.points(diffs[b])} ({b:g}x, {FREE_VARIANTS[best[b]]})" for b in budgets),
                     "; ".join(f"{name} {fmt.points(d)}" for name, d in whole.items()) or "-",
                     "; ".join(parts) or "-", _free_seconds(s, task, arch, first), verdict])
    text, holds = _overall(holding, failing, unmeasured)
    table = fmt.table(["task / arch", "budget", "PLeaS", "best PLeaS-free", "difference in points, per budget",
                       "both whole (2x effective), points", "each free variant and ablation against PLeaS (points)",
                       "seconds", "verdict"], rows)
    return Finding("PLeaS-free is within a few points of PLeaS",
                   f"Calibrating on data from neither domain costs only a few points (here: the best PLeaS-free "
                   f"variant, {' or '.join(FREE_VARIANTS.values())} data, at most {100 * FEW_POINTS:.0f} points of "
                   f"mean accuracy below PLeaS at every budget, and at most {100 * WHOLE_POINTS:.0f} point where both "
                   "sources are kept whole: 2x in effective parameters). Each variant is compared with PLeaS on the "
                   "seed pairs it ran on. The ablations change one stage's data at a time: "
                   + ", ".join(FREE_ABLATIONS.values()) + ".", text, table, holds)


def merge_speed(s: Summary) -> Finding:
    """PLeaS's merge time in forward floors per task and architecture; the target applies to resnet18."""
    rows, holding, failing, unmeasured, ratios = [], [], [], [], []
    for task, arch in s.combos:
        floor = s.floor(task, arch)
        at_1x = s.merge(task, arch, "pleas", 1.0)
        measured = {b: s.merge(task, arch, "pleas", b) for b in s.budgets(task, arch, "pleas")}
        if floor is None or at_1x is None:
            rows.append([_combo(task, arch), fmt.value(floor, 3), "-", "-", "-", "not measured"])
            if arch == SPEED_ARCH:
                unmeasured.append(_combo(task, arch))
            continue
        worst = max(measured, key=lambda b: measured[b]["floor_ratio"].mean)
        ratio = at_1x["floor_ratio"].mean
        ratios.append(f"{_combo(task, arch)} {ratio:.1f}x")
        verdict = ""
        if arch == SPEED_ARCH:
            ok = ratio <= FLOOR_TARGET
            verdict = f"{'meets' if ok else 'misses'} the {FLOOR_TARGET:g}x target"
            (holding if ok else failing).append(_combo(task, arch) if ok else f"{_combo(task, arch)} ({ratio:.1f}x)")
        rows.append([_combo(task, arch), fmt.value(floor, 3), fmt.value(at_1x["seconds"], 2), f"{ratio:.1f}x",
                     f"{measured[worst]['floor_ratio'].mean:.1f}x ({worst:g}x)", verdict])
    if holding or failing:
        text, holds = _overall(holding, failing, unmeasured)
        text = text.replace("task/architecture pairs", f"{SPEED_ARCH} pairs")
    else:
        text, holds = f"{SPEED_ARCH} is not in this run, so the {FLOOR_TARGET:g}x target was not checked.", None
    if ratios:
        text += " PLeaS at 1x takes " + ", ".join(ratios) + " the forward floor."
    table = fmt.table(["task / arch", "floor (s)", "PLeaS 1x (s)", "ratio 1x", "largest ratio (budget)",
                       f"{SPEED_ARCH} target"], rows)
    scaling = s.results.get("speed") or []
    if scaling:
        meets = [r for r in scaling if r["floor_ratio"] <= FLOOR_TARGET]
        text += (f" Against calibration size ({scaling[0]['task']} / {SPEED_ARCH}, pair 0): "
                 + ", ".join(f"{r['samples']} samples {r['floor_ratio']:.1f}x" for r in scaling) + "; "
                 + (f"the {FLOOR_TARGET:g}x target holds from {meets[0]['samples']} samples."
                    if meets else f"the {FLOOR_TARGET:g}x target holds at none of these sizes."))
        table += "\n\n" + fmt.table(
            ["calibration samples", "floor (s)", "PLeaS 1x (s)", "ratio"],
            [[str(r["samples"]), f"{r['floor']:.3f}", f"{r['seconds']:.2f}", f"{r['floor_ratio']:.1f}x"]
             for r in scaling])
    samples = s.results.get("config", {}).get("calibration")
    return Finding("PLeaS merge time against the forward floor",
                   f"A PLeaS merge of {SPEED_ARCH} takes at most {FLOOR_TARGET:g}x the forward floor (the time for "
                   f"models A and B to run once over the calibration data, here {samples} samples).", text, table,
                   holds)


def allocation_beats_schedules(s: Summary) -> Finding:
    """Under effective budgets, PLeaS with the "downstream" allocation above PLeaS with one uniform merge
    fraction and with the prefix schedule, at each of :data:`ALLOCATION_BUDGETS`."""
    rows, holding, failing, unmeasured = [], [], [], []
    for task, arch in s.combos:
        stats = {b: {a: s.mean_acc(task, arch, label, b) for a, label in EFFECTIVE_ALLOCATIONS.items()}
                 for b in ALLOCATION_BUDGETS}
        measured = [b for b in ALLOCATION_BUDGETS if all(v is not None for v in stats[b].values())]
        cells = [" / ".join(fmt.value(stats[b][a], 3) for a in EFFECTIVE_ALLOCATIONS) for b in ALLOCATION_BUDGETS]
        if not measured:
            unmeasured.append(_combo(task, arch))
            rows.append([_combo(task, arch), *cells, "not measured"])
            continue
        behind, said = [], []
        for b in measured:
            down = stats[b]["downstream"]
            for other in ("uniform", "prefix"):
                margin = down.mean - stats[b][other].mean
                note = " (within the seed spread)" if _within_spread(down, stats[b][other]) else ""
                said.append(f"{fmt.points(margin)} vs {other} at {b:g}x{note}")
                if margin <= 0:
                    behind.append(f"{other} at {b:g}x ({fmt.points(margin)})")
        verdict = ("holds: " if not behind else "fails: ") + "; ".join(said)
        if behind:
            failing.append(f"{_combo(task, arch)} (not ahead of {', '.join(behind)})")
        else:
            holding.append(_combo(task, arch))
        rows.append([_combo(task, arch), *cells, verdict])
    text, holds = _overall(holding, failing, unmeasured)
    table = fmt.table(["task / arch", *(f"{b:g}x: uniform / prefix / downstream" for b in ALLOCATION_BUDGETS),
                       "verdict"], rows)
    return Finding("Spreading an effective budget over the groups",
                   "With the budget counted in effective parameters (zero blocks excluded, the paper's count), PLeaS "
                   "with the \"downstream\" allocation is more accurate than with one merge fraction for every group "
                   "(uniform) and than with ZipIt!'s prefix schedule, at " + " and ".join(
                       f"{b:g}x" for b in ALLOCATION_BUDGETS) + ".", text, table, holds)


def all_findings(s: Summary) -> list[Finding]:
    return [pleas_above_baselines(s), gap_closed(s), free_near_pleas(s), merge_speed(s),
            allocation_beats_schedules(s)]
