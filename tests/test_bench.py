"""``pleas bench``: a quick end-to-end run on real data, the findings and the report from synthetic results,
PLeaS-free's data, the measurements, and clear errors for bad arguments."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pleas.bench import findings, free_data, measure, report, run, suite, tasks
from pleas.bench.aggregate import Stat, Summary
from pleas.cli import main
from pleas.errors import MergeInputError

# ------------------------------------------------------------------------------------------- end to end


def test_quick_bench_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PLEAS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "training model A" in capsys.readouterr().err
    paths = suite.OutputPaths.under(out)
    text = paths.report.read_text()
    results = json.loads(paths.results.read_text())
    assert (paths.plots / "mnist-halves_mlp.png").stat().st_size > 1000
    assert "](docs/bench/mnist-halves_mlp.png)" in text and "--quick` smoke run" in text
    assert "pleas bench --quick --out" in text and "## Findings" in text

    assert results["meta"]["complete"] and results["config"]["quick"]
    merges = {(r["method"], r["budget"]): r for r in results["merges"]}
    planned, _ = run.plan_merges(list(run.BENCH_METHODS), list(run.QUICK_BUDGETS))
    synthetic = {("pleas-synthetic", 1.0), ("pleas-synthetic", 1.5)}  # the MLP has no BatchNorm statistics
    assert set(merges) == set(planned) - synthetic  # every method at every budget it can make
    assert {(r["method"], r["budget"]) for r in results["skipped"]} == {("average", 1.5), ("regmean", 1.5), *synthetic}
    assert all("needs BatchNorm" in r["reason"] for r in results["skipped"] if r["method"] == "pleas-synthetic")
    for r in results["merges"]:
        assert set(r["acc"]) == {"0-4", "5-9"} and r["mean_acc"] == pytest.approx(sum(r["acc"].values()) / 2)
        assert r["seconds"] > 0 and r["floor_ratio"] == pytest.approx(r["seconds"] / results["floors"][0]["seconds"])
        assert r["peak_mb"] > 0 and r["effective"] <= r["dense"] + 1e-9
    for budget in (1.0, 1.5):
        assert merges[("pleas", budget)]["dense"] == pytest.approx(budget, abs=0.05)
    sources = {r["model"]: r["acc"] for r in results["sources"]}
    assert merges[("ensemble", None)]["acc"] == {**sources["A"], **sources["B"]}  # the ensemble is exact

    # --report-only renders the same text from the saved results
    paths.report.unlink()
    assert main(["bench", "--report-only", "--out", str(out)]) == 0
    assert paths.report.read_text() == text

    # same seeds, same numbers (models now cached)
    config = run.make_config(quick=True, methods=["zipit", "pleas-free"])
    again = run.run_benchmark(config, progress=False, log=lambda _: None)
    for r in again["merges"]:
        assert r["acc"] == merges[(r["method"], r["budget"])]["acc"]


def test_bad_arguments_are_clear_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PLEAS_CACHE", str(tmp_path / "cache"))
    assert main(["bench", "--tasks", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown task(s) ['nope']; allowed: ['mnist-halves', 'domains', 'mnist1d-halves']" in capsys.readouterr().err
    assert main(["bench", "--archs", "vgg", "--out", str(tmp_path)]) == 2
    assert "unknown architecture(s) ['vgg']; allowed: ['mlp', 'resnet20', 'resnet18', 'cnn1d']" in capsys.readouterr().err
    assert main(["bench", "--tasks", "domains", "--archs", "mlp", "--out", str(tmp_path)]) == 2
    assert "configured: mnist-halves/mlp" in capsys.readouterr().err
    assert main(["bench", "--methods", "pleas,nope", "--out", str(tmp_path)]) == 2
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
    assert main(["bench", "--budgets", "0.5", "--out", str(tmp_path)]) == 2
    assert "budgets [0.5] are out of range" in capsys.readouterr().err
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 2
    assert "run `pleas bench` first" in capsys.readouterr().err
    assert not (tmp_path / "BENCHMARKS.md").exists()


def test_selection_and_configs():
    pairs = tasks.select(None, None)
    archs = {a for _, a in pairs}
    assert {"mlp", "resnet20", "resnet18", "cnn1d"} <= archs
    for task in tasks.TASKS:
        assert sum(t == task for t, _ in pairs) >= 2  # every task with at least two architectures
    assert tasks.select(["domains"], None) == [("domains", "resnet20"), ("domains", "resnet18")]
    assert tasks.select(None, ["mlp"]) == [("mnist-halves", "mlp"), ("mnist1d-halves", "mlp")]
    quick = run.make_config(quick=True)
    assert quick.selection == [("mnist-halves", "mlp")] and quick.seed_pairs == 1 and quick.budgets == [1.0, 1.5]
    full = run.make_config()
    assert full.seed_pairs == 3 and full.budgets == [1.0, 1.2, 1.5, 1.8, 2.0] and full.selection == pairs
    # on every pair: 28 merges at every budget, PLeaS without permutations at 1x, three effective-budget
    # allocations at 1.2x and 1.5x only; on the first pair only: PLeaS on synthesised data at every budget,
    # three free-data ablations at 1x and 2x, three merges with both models whole
    assert run.FREE_EXTRA_PAIRS == 1
    assert run.count_merges(full) == ((28 + 1 + 3 * 2) * 3 + 5 + 3 * 2 + 3) * len(pairs)
    assert [len(run.plan_merges(full.methods, full.budgets, p)[0]) for p in range(3)] == [49, 35, 35]
    assert tasks.pair_seeds(2) == (4, 5)


def test_plan_merges_skips_sizes_a_method_cannot_make():
    runs, skipped = run.plan_merges(["ensemble", "regmean", "pleas"], [1.0, 1.5])
    assert runs == [("ensemble", None), ("regmean", 1.0), ("pleas", 1.0), ("pleas", 1.5)]
    assert skipped == [{"method": "regmean", "budget": 1.5, "reason": "makes models of size at most 1x"}]


# ------------------------------------------------------------------------------------- PLeaS-free data


def test_free_data_shapes_determinism_and_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("PLEAS_CACHE", str(tmp_path / "cache"))
    for make, resolution, shape in ((free_data.digits, 16, (1, 16, 16)), (free_data.photo_patches, 32, (1, 32, 32)),
                                    (free_data.phase_shuffled_mnist1d, None, (1, 40))):
        x = make(50, resolution, 0)
        assert x.shape == (50, *shape) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert torch.equal(x, make(50, resolution, 0)) and not torch.equal(x, make(50, resolution, 1))
    patches = free_data.photo_patches(200, 16, 0)
    assert abs(float(patches.mean())) < 1e-4 and float(patches.std()) == pytest.approx(1.0, abs=1e-4)

    signals = free_data.phase_shuffled_mnist1d(20, None, 0).double()
    from pleas import datasets as data

    pool = data.load("mnist1d", split="train", seed=free_data.MNIST1D_FREE_SEED).x.double()
    own = data.load("mnist1d", split="train").x
    assert not any(torch.equal(own[0], s) for s in pool[:50])  # another generation seed
    power = torch.fft.rfft(signals, dim=-1).abs()
    originals = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:20]]
    assert torch.allclose(power, torch.fft.rfft(originals, dim=-1).abs(), atol=1e-4)  # spectra kept
    assert not torch.allclose(signals, originals, atol=1e-2)  # shapes not
    with pytest.raises(MergeInputError, match="UCI digits hold 1797"):
        free_data.digits(5000, 16, 0)


# ------------------------------------------------------------------------------------------- measuring


def test_peak_memory_sees_a_large_allocation_and_floor_is_positive():
    with measure.PeakMemory() as memory:
        block = np.ones(40_000_000)  # 320 MB
        block[::1000] = 2.0
    del block
    if memory.exact:
        assert memory.extra_mb > 250
    assert memory.peak_mb >= memory.extra_mb > 0
    model = torch.nn.Linear(4, 2).train()
    assert measure.forward_floor([model], torch.randn(10, 4), batch_size=3) > 0 and model.training


def test_source_recipe_keeps_the_earlier_cache_keys():
    from pleas.experiments.sources import SourceRecipe

    kwargs = {"in_channels": 1, "num_classes": 5, "width": 1}
    subset = SourceRecipe("resnet20", kwargs, "mnist", (0, 1, 2, 3, 4), 16, 0, 8).cache_key()
    assert subset == {"arch": "resnet20", "kwargs": kwargs, "classes": [0, 1, 2, 3, 4], "seed": 0, "epochs": 8, "res": 16}
    whole = SourceRecipe("resnet20", kwargs, "digits", None, 16, 1, 12).cache_key()
    assert whole == {"arch": "resnet20", "kwargs": kwargs, "dataset": "digits", "seed": 1, "epochs": 12, "res": 16}


# ------------------------------------------------------------------------------ findings and report


def _record(task, arch, pair, method, budget, acc, *, dense=None, seconds=1.0, floor=1.0):
    return {"task": task, "arch": arch, "pair": pair, "method": method, "budget": budget,
            "acc": {"x": acc, "y": acc}, "mean_acc": acc, "dense": budget if dense is None else dense,
            "effective": budget if dense is None else dense, "seconds": seconds, "floor_ratio": seconds / floor,
            "peak_mb": 100.0, "extra_mb": 10.0, "memory_exact": True, "phases": {}}


def _results(accs: dict, *, arch="resnet18", pairs=(0.0, 0.01), pleas_seconds=3.0, dense=None):
    """Synthetic results on one task: ``accs[(method, budget)]`` is the mean accuracy, shifted by each
    pair's offset; the forward floor is 1 s and PLeaS takes ``pleas_seconds``."""
    methods = list(dict.fromkeys(m for m, _ in accs))
    merges = [
        _record("t", arch, p, m, b, acc + offset, seconds=pleas_seconds if m.startswith("pleas") else 0.5,
                dense=(dense or {}).get((m, b), 3.9 if b is None else None))
        for p, offset in enumerate(pairs) for (m, b), acc in accs.items()
    ]
    return {
        "format": suite.RESULTS_FORMAT,
        "meta": {"command": "pleas bench --tasks t", "started": "2025-01-01T00:00:00+00:00", "complete": True,
                 "total_seconds": 600.0, "machine": {"cpu": "test cpu", "usable_cpus": 2, "logical_cpus": 2}},
        "config": {"selection": [["t", arch]], "methods": methods, "budgets": [1.0, 1.2, 1.5, 2.0],
                   "seed_pairs": len(pairs), "calibration": 100, "batch_size": 256, "quick": False},
        "tasks": {"t": {"title": "A task", "heads": "separate", "free_data": "noise",
                        "domains": [{"label": "x"}, {"label": "y"}],
                        "archs": {arch: {"factory": arch, "kwargs": {}, "resolution": 32, "epochs": 1}}}},
        "methods": {m: {"method": m, "text": f"the {m} method", "options": {}, "calibration": "task"} for m in methods},
        "sources": [{"task": "t", "arch": arch, "pair": p, "model": model, "seed": 2 * p, "acc": {label: 0.99},
                     "train_seconds": 0.0} for p in range(len(pairs)) for model, label in (("A", "x"), ("B", "y"))],
        "floors": [{"task": "t", "arch": arch, "pair": p, "seconds": 1.0, "samples": 100} for p in range(len(pairs))],
        "merges": merges,
        "skipped": [{"task": "t", "arch": arch, "pair": 0, "method": "regmean", "budget": 1.5,
                     "reason": "makes models of size at most 1x"}],
        "seconds": {f"t/{arch}": 600.0},
    }


GOOD = {("ensemble", None): 0.95, ("average", 1.0): 0.30, ("rebasin-weight", 1.0): 0.50,
        ("rebasin-activation", 1.0): 0.55, ("zipit", 1.0): 0.60, ("regmean", 1.0): 0.70, ("pleas", 1.0): 0.81,
        ("pleas", 1.2): 0.85, ("pleas", 1.5): 0.90, ("pleas-free", 1.0): 0.79, ("pleas-free", 1.2): 0.84,
        ("pleas-free", 1.5): 0.89}


def test_findings_that_hold():
    summary = Summary(_results(GOOD))
    above, gap, free, speed, allocation = findings.all_findings(summary)
    assert above.holds and above.verdict == "Holds on 1 of 1 task/architecture pairs."
    assert "holds: +11.0 points over RegMean" in above.table
    assert gap.holds and "At 1.2x PLeaS closes 75% to 75% of the gap (mean 75%)" in gap.verdict  # (0.855-0.555)/0.4
    assert "0.815 (65%)" in gap.table
    assert free.holds and "holds: at worst -2.0 points (1x)" in free.table
    assert speed.holds and "resnet18 pairs" in speed.verdict and "t / resnet18 3.0x the forward floor" in speed.verdict


def test_findings_that_fail_say_so_with_numbers():
    bad = {**GOOD, ("regmean", 1.0): 0.82, ("pleas", 1.2): 0.61, ("pleas-free", 1.5): 0.80}
    summary = Summary(_results(bad, pleas_seconds=9.0))
    above, gap, free, speed, allocation = findings.all_findings(summary)
    assert above.holds is False
    assert "Does not hold on t / resnet18 (RegMean 0.825 vs PLeaS 0.815)" in above.verdict
    assert "fails: RegMean 0.825 vs PLeaS 0.815" in above.table
    assert gap.holds is False and "Does not hold on t / resnet18 (15% at 1.2x)" in gap.verdict
    assert free.holds is False and "(-10.0 points at 1.5x)" in free.verdict
    assert speed.holds is False and "t / resnet18 (9.0x)" in speed.verdict


def test_findings_without_the_data_they_need():
    summary = Summary(_results({("ensemble", None): 0.9, ("pleas", 1.0): 0.8}, arch="mlp", pairs=(0.0,)))
    above, gap, free, speed, allocation = findings.all_findings(summary)
    assert above.holds is gap.holds is free.holds is speed.holds is allocation.holds is None
    assert free.verdict == "Not measured in this run."
    assert "resnet18 is not in this run" in speed.verdict and "t / mlp 3.0x" in speed.verdict
    close = {("ensemble", None): 0.9, ("rebasin-activation", 1.0): 0.898, ("pleas", 1.2): 0.9}
    assert "no gap" in findings.gap_closed(Summary(_results(close))).table


def _allocations(uniform, prefix, downstream):
    return {(f"pleas-eff-{name}", b): acc + (b - 1.2) / 10
            for name, acc in (("uniform", uniform), ("prefix", prefix), ("downstream", downstream)) for b in (1.2, 1.5)}


def test_allocation_finding_holds_only_ahead_of_both_schedules_at_both_budgets():
    good = findings.allocation_beats_schedules(Summary(_results({**GOOD, **_allocations(0.85, 0.84, 0.87)})))
    assert good.holds and good.verdict == "Holds on 1 of 1 task/architecture pairs."
    assert "0.855 / 0.845 / 0.875" in good.table and "holds: +2.0 vs uniform at 1.2x; +3.0 vs prefix at 1.2x" in good.table
    bad = findings.allocation_beats_schedules(Summary(_results({**GOOD, **_allocations(0.85, 0.88, 0.87)})))
    assert bad.holds is False
    assert "Does not hold on t / resnet18 (not ahead of prefix at 1.2x (-1.0), prefix at 1.5x (-1.0))" in bad.verdict


def test_within_spread_is_noted():
    spread = Summary(_results({("zipit", 1.0): 0.80, ("pleas", 1.0): 0.801}, pairs=(0.0, 0.05)))
    assert "(within the seed spread)" in findings.pleas_above_baselines(spread).table


def test_report_tables_from_synthetic_results():
    results = _results({**GOOD, ("zipit", 2.0): 0.7}, dense={("zipit", 2.0): 1.5})
    text = report.render(results, {"t/resnet18": "docs/bench/t_resnet18.png"}, results_link="docs/bench/results.json")
    assert text.startswith("# Benchmarks\n") and "pleas bench --tasks t" in text
    assert "| method | 1x | 1.2x | 1.5x | 2x |" in text
    assert "| pleas | 0.815 ± 0.007 | 0.855 ± 0.007 | 0.905 ± 0.007 | - |" in text
    assert "| zipit | 0.605 ± 0.007 | - | - | 0.705 ± 0.007 (1.50x) |" in text  # size differs from the budget
    assert "| ensemble | 0.955 ± 0.007 (3.90x, fixed size) |" in text
    assert "![t / resnet18: mean accuracy against dense size](docs/bench/t_resnet18.png)" in text
    assert "`regmean` at 1.5x: makes models of size at most 1x (t/resnet18)" in text
    assert "model A (trained on x): 0.990 ± 0.000 on x" in text
    assert "took 10.0 min (all source models were cached)" in text


def test_plots_are_written(tmp_path):
    from pleas.bench import plots

    written = plots.write_plots(_results(GOOD), tmp_path)
    assert list(written) == ["t/resnet18"] and written["t/resnet18"].stat().st_size > 1000


def test_stat():
    s = Stat.of([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.lo, s.hi, s.n) == (2.0, 1.0, 1.0, 3.0, 3)
    assert Stat.of([5.0]).std == 0.0


def test_speed_against_calibration_size_is_reported():
    results = _results(GOOD, pleas_seconds=9.0)
    results["speed"] = [{"task": "t", "arch": "resnet18", "samples": n, "floor": f, "seconds": sec,
                         "floor_ratio": sec / f} for n, f, sec in ((1000, 0.5, 3.5), (2000, 1.0, 4.6), (4000, 2.0, 7.6))]
    speed = findings.merge_speed(Summary(results))
    assert speed.holds is False  # the run's own merges miss; the scaling does not change the verdict
    assert "1000 samples 7.0x, 2000 samples 4.6x, 4000 samples 3.8x" in speed.verdict
    assert "the 5x target holds from 2000 samples" in speed.verdict
    assert "| 4000 | 2.000 | 7.60 | 3.8x |" in speed.table
    results["speed"] = results["speed"][:1]
    assert "holds at none of these sizes" in findings.merge_speed(Summary(results)).verdict


def test_speed_scaling_is_skipped_in_quick_runs_and_without_resnet18():
    assert run.speed_scaling(run.make_config(quick=True), log=lambda _: None) == []
    assert run.speed_scaling(run.make_config(archs=["mlp"]), log=lambda _: None) == []


def test_free_finding_takes_the_best_free_variant_and_lists_the_ablations():
    ablations = {("pleas-free-norms", 1.0): 0.60, ("pleas-free-match", 1.0): 0.80, ("pleas-free-refit", 1.0): 0.65,
                 ("pleas-synthetic", 1.0): 0.80, ("pleas-synthetic", 1.2): 0.70, ("pleas-free", 1.0): 0.70}
    free = findings.free_near_pleas(Summary(_results({**GOOD, **ablations})))
    # 1x: synthesised data (-1.0) beats the other data (-11.0); 1.2x: the other data (-1.0) beats synthesised
    assert free.holds and "-1.0 (1x, synthesised) / -1.0 (1.2x, other data) / -1.0 (1.5x, other data)" in free.table
    assert ("other data -11.0; synthesised -1.0; norm statistics from free data -21.0; matching on free data -1.0; "
            "refit on free data -16.0") in free.table


def test_free_finding_compares_on_the_variants_own_pairs_and_checks_both_whole():
    # pair 1 scores 0.05 higher everywhere; the synthetic row and the whole rows ran on pair 0 only
    results = _results(GOOD, pairs=(0.0, 0.05))
    extra = {("pleas-synthetic", 1.0): 0.80, ("pleas-whole", 2.0): 0.95, ("pleas-free-whole", 2.0): 0.945,
             ("pleas-synthetic-whole", 2.0): 0.90}
    results["merges"] += [_record("t", "resnet18", 0, m, b, acc) for (m, b), acc in extra.items()]
    free = findings.free_near_pleas(Summary(results))
    # against PLeaS on pair 0 only (0.81), not over both pairs (0.835): -1.0, not -3.5
    assert free.holds and "-1.0 (1x, synthesised)" in free.table
    assert "other data -0.5; synthesised -5.0" in free.table and "both whole -0.5" in free.table
    results["merges"] = [r for r in results["merges"] if r["method"] != "pleas-free-whole"]
    free = findings.free_near_pleas(Summary(results))  # now only the synthesised data has both whole: -5 points
    assert not free.holds and "(-5.0 points with both whole)" in free.verdict


def test_a_failing_free_finding_names_the_stage_the_loss_follows():
    ablations = {("pleas-free-match", 1.0): 0.80, ("pleas-free-refit", 1.0): 0.60, ("pleas-free-norms", 1.0): 0.50,
                 ("pleas-free", 1.0): 0.61}
    free = findings.free_near_pleas(Summary(_results({**GOOD, **ablations})))
    # the norms' ablation changes every stage's data, so only the one-stage ablations are ranked
    assert not free.holds
    assert "the loss follows the refit on free data (-21.0 at 1x; matching on free data -1.0)" in free.table
