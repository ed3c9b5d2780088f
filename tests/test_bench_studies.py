"""The benchmark's two studies: the distillation baseline (training loop, teacher, students, time budget,
determinism) and the calibration-size axis (sizes, records, refit summaries), and their report sections
and plots from synthetic results."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import pleas
from pleas.bench import calibration_size, distill, plots, report, run, studies, suite
from pleas.bench.aggregate import Summary
from pleas.errors import MergeInputError


def _net(seed: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, classes)).eval()


def _data(n: int = 96) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(7))


def _no_eval(model) -> dict:
    return {}


class _Slow(nn.Module):
    """A model whose every forward takes at least ``seconds``, so a time budget is reached after a known
    number of steps whatever the machine."""

    def __init__(self, model: nn.Module, seconds: float):
        super().__init__()
        self.model, self.seconds = model, seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.model(x)


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    """One cache of the quick source models for the tests that run the benchmark on them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PLEAS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


# ------------------------------------------------------------------------------------------- distillation


def test_distillation_lowers_the_loss_and_keeps_batchnorm_statistics():
    teacher = distill.teacher_logits(_net(1), _net(2), _data(), "shared")
    student = _net(3)
    stats = student[1].running_mean.clone(), student[1].running_var.clone()
    record = distill.distill(student, _data(), teacher, evaluate=_no_eval,
                             settings=distill.DistillSettings(lr=1e-2, max_epochs=30, batch_size=16))
    assert record["converged"]["loss"] < 0.3 * record["start"]["loss"]
    assert record["epoch_losses"][-1] == pytest.approx(record["converged"]["loss"])
    assert record["converged"]["steps"] == 6 * len(record["epoch_losses"]) and record["at_budget"] is None
    assert torch.equal(student[1].running_mean, stats[0]) and torch.equal(student[1].running_var, stats[1])
    assert not student.training


def test_distillation_is_deterministic_for_a_seed():
    teacher = distill.teacher_logits(_net(1), _net(2), _data(), "separate")
    runs = []
    for seed in (0, 0, 1):
        student = _net(3)
        settings = distill.DistillSettings(max_epochs=4, batch_size=16, seed=seed)
        out = distill.distill(student, _data(), teacher[:1], evaluate=_no_eval, settings=settings)
        runs.append((out["epoch_losses"], student[0].weight.detach().clone()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-6)
    assert runs[0][0] != pytest.approx(runs[2][0], rel=1e-5)  # another seed, another batch order


def test_distillation_respects_the_time_budget_and_pauses_for_evaluation():
    teacher = distill.teacher_logits(_net(1), _net(2), _data(), "shared")

    def slow_eval(model) -> dict:
        time.sleep(0.05)  # evaluation is not counted in the student's time
        return {"mean_acc": 0.5}

    settings = distill.DistillSettings(max_epochs=12, patience=12, batch_size=16)  # 72 steps of >= 3 ms
    began = time.perf_counter()
    record = distill.distill(_Slow(_net(3), 0.003), _data(), teacher, evaluate=slow_eval, time_budget=0.1,
                             start_seconds=0.02, settings=settings)
    wall = time.perf_counter() - began
    assert record["converged"]["seconds"] < wall + 0.02 - 2 * 0.05  # the evaluations before it were not counted
    at = record["at_budget"]
    assert record["budget_reached"] and at["seconds"] >= 0.1 and 0 < at["steps"] < record["converged"]["steps"]
    assert at["mean_acc"] == 0.5 and record["start"]["seconds"] == pytest.approx(0.02, abs=0.02)
    assert at["seconds"] - 0.1 < 0.05  # overshoot under one (fast) step, and no evaluation time
    # a budget spent before the first step (e.g. by the teacher's pass) gives the start itself
    early = distill.distill(_net(3), _data(), teacher, evaluate=_no_eval, time_budget=0.01, start_seconds=0.5,
                            settings=distill.DistillSettings(max_epochs=1))
    assert early["at_budget"]["steps"] == 0 and early["budget_reached"]
    # convergence before the budget: the converged student stands for the budget too
    late = distill.distill(_net(3), _data(), teacher, evaluate=_no_eval, time_budget=1e6,
                           settings=distill.DistillSettings(max_epochs=2))
    assert late["at_budget"] == late["converged"] and not late["budget_reached"]


def test_plateau_stops_the_distillation():
    teacher = distill.teacher_logits(_net(1), _net(2), _data(), "shared")
    settings = distill.DistillSettings(max_epochs=50, patience=2, min_decrease=0.9)
    record = distill.distill(_net(3), _data(), teacher, evaluate=_no_eval, settings=settings)
    assert record["stopped"] == "plateau" and len(record["epoch_losses"]) == 3
    capped = distill.distill(_net(3), _data(), teacher, evaluate=_no_eval,
                             settings=distill.DistillSettings(max_epochs=2, min_decrease=0.0, patience=5))
    assert capped["stopped"] == "max_epochs" and len(capped["epoch_losses"]) == 2
    assert capped["last_decrease"] == pytest.approx(1 - capped["epoch_losses"][1] / capped["epoch_losses"][0])


def test_bad_distillation_settings_are_clear_errors():
    with pytest.raises(MergeInputError, match="distillation lr=0"):
        distill.DistillSettings(lr=0)
    with pytest.raises(MergeInputError, match="distillation max_epochs=0"):
        distill.DistillSettings(max_epochs=0)
    with pytest.raises(MergeInputError, match=r"min_decrease=1\.0; allowed: a number in \[0, 1\)"):
        distill.DistillSettings(min_decrease=1.0)
    with pytest.raises(MergeInputError, match="heads='both'"):
        distill.teacher_logits(_net(1), _net(2), _data(), "both")
    with pytest.raises(MergeInputError, match="as many targets as inputs"):
        distill.distill(_net(3), _data(), (torch.zeros(5, 3),), evaluate=_no_eval)
    with pytest.raises(MergeInputError, match="2 heads, the teacher 1"):
        distill.distill_loss((torch.zeros(2, 3), torch.zeros(2, 3)), (torch.zeros(2, 3),))


@pytest.mark.parametrize("heads", ["separate", "shared"])
def test_teacher_is_the_ensemble_merge(heads):
    a, b, x = _net(1), _net(2), _data(40)
    ensemble = pleas.merge(a, b, x, method="ensemble", heads=heads, progress=False).model
    with torch.no_grad():
        expected = distill._as_tuple(ensemble(x))
    got = distill.teacher_logits(a, b, x, heads, batch_size=16)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-5 * float(e.abs().max()))


def test_student_from_source_holds_model_a_and_both_heads():
    a, b, x = _net(1), _net(2), _data(40)
    merged = pleas.merge(a, b, x, method="pleas", heads="separate", progress=False).model
    student = distill.student_from_source(merged, a, b)
    out_a, out_b = student(x)
    assert torch.allclose(out_a, a(x), atol=1e-5)
    features = a[:-1](x)  # A's body
    assert torch.allclose(out_b, features @ b[-1].weight.T + b[-1].bias, atol=1e-5)  # B's head on A's body
    assert not torch.allclose(merged(x)[0], student(x)[0])  # a copy: the merge itself is untouched
    shared = distill.student_from_source(pleas.merge(a, b, x, heads="shared", progress=False).model, a, b)
    assert torch.allclose(shared(x), a(x), atol=1e-5)
    wide = pleas.merge(a, b, x, method="pleas", budget=1.5, heads="separate", progress=False).model
    with pytest.raises(MergeInputError, match="the template must be a 1x merge of A and B"):
        distill.student_from_source(wide, a, b)


def test_train_students_times_and_trains_both_starts():
    a, b, x = _net(1), _net(2), _data()
    merged = pleas.merge(a, b, x, method="pleas", heads="separate", progress=False).model
    teacher = distill.Teacher.of(a, b, x, "separate")
    assert teacher.seconds > 0 and len(teacher.logits) == 2
    trained = distill.train_students(merged, a, b, x, teacher, time_budget=0.0, evaluate=_no_eval, with_source=True,
                                     settings=distill.DistillSettings(max_epochs=2))
    assert list(trained) == ["kd-source", "kd-pleas"]
    for record in trained.values():
        assert record["start"]["seconds"] >= teacher.seconds and record["at_budget"]["steps"] == 0
        assert record["wall_seconds"] >= record["converged"]["seconds"] - teacher.seconds
    assert trained["kd-pleas"]["start"]["loss"] < trained["kd-source"]["start"]["loss"]  # B's head on A's body
    only = distill.train_students(merged, a, b, x, teacher, time_budget=0.0, evaluate=_no_eval, with_source=False,
                                  settings=distill.DistillSettings(max_epochs=1))
    assert list(only) == ["kd-pleas"]


# ------------------------------------------------------------------------------------------- calibration size


def test_capped_sizes_and_plan():
    assert calibration_size.capped_sizes([64, 32, 5000], 4000) == [(32, 32), (64, 64), (5000, 4000)]
    assert calibration_size.capped_sizes([2000, 5000, 8000], 2874) == [(2000, 2000), (5000, 2874)]
    combos, methods = calibration_size.plan([("t", "mlp"), ("t", "resnet20"), ("u", "resnet18")],
                                            ["resnet20", "resnet18"], ["pleas", "zipit", "average"])
    assert combos == [("t", "resnet20"), ("u", "resnet18")] and methods == ["pleas", "zipit"]


def test_refit_summary():
    entries = [{"layer": "a", "rows": 32, "columns": 65, "error_before": 0.2, "error_after": 0.0},
               {"layer": "b", "rows": 512, "columns": 144, "error_before": 0.4, "error_after": 0.1}]
    summary = calibration_size.refit_summary(entries)
    assert summary["layers"] == 2 and summary["underdetermined"] == 1
    assert summary["mean_before"] == pytest.approx(0.3) and summary["mean_after"] == pytest.approx(0.05)
    assert summary["worst"] == {"layer": "b", "error_after": 0.1}
    assert calibration_size.refit_summary(None) is None and calibration_size.refit_summary([]) is None


def test_calibration_axis_records_on_a_quick_selection(quick_cache):
    config = run.make_config(quick=True, methods=["pleas", "zipit", "rebasin-activation"],
                             calibration_sizes=[16, 48, 10**6])
    assert run.calibration_plan(config) == ([("mnist-halves", "mlp")], ["pleas", "zipit", "rebasin-activation"])
    from tqdm.auto import tqdm

    bar = tqdm(total=run.count_runs(config), disable=True)
    records = run.calibration_axis(config, bar, log=lambda _: None)
    assert [(r["method"], r["requested"]) for r in records] == [
        (m, n) for n in (16, 48, 10**6) for m in ("pleas", "zipit", "rebasin-activation")]
    cap = records[-1]["cap"]
    assert records[-1]["samples"] == cap == 4000 and all(r["samples"] == r["requested"] for r in records[:-3])
    for r in records:
        assert set(r["acc"]) == {"0-4", "5-9"} and 0 <= r["mean_acc"] <= 1 and r["seconds"] > 0
        assert (r["refit"] is not None) == (r["method"] == "pleas")
    first = records[0]["refit"]
    assert first and {"layer", "rows", "columns", "error_before", "error_after"} <= set(first[0])
    assert calibration_size.refit_summary(first)["underdetermined"] >= 1  # 16 samples, 785 input columns


def test_configs_of_the_studies():
    full = run.make_config()
    assert full.distill_pairs == 1 and full.calibration_sizes == list(calibration_size.SIZES)
    assert full.distill_epochs_for("resnet18") == 12 and full.distill_epochs_for("mlp") == distill.MAX_EPOCHS
    students_per_pair = 5 + 1  # one per budget, and kd-source at 1x
    assert run.count_students(full) == students_per_pair * len(full.selection)
    combos, methods = run.calibration_plan(full)
    assert {a for _, a in combos} == {"resnet20", "resnet18"} and methods == ["pleas", "pleas-free", "zipit",
                                                                         "rebasin-activation"]
    quick = run.make_config(quick=True)
    assert quick.distill_epochs_for("mlp") == run.QUICK_DISTILL_EPOCHS and quick.calibration_archs == ["mlp"]
    assert run.count_students(run.make_config(methods=["zipit"])) == 0
    assert run.calibration_plan(run.make_config(calibration_sizes=[])) == ([], [])
    with pytest.raises(MergeInputError, match="calibration sizes \\[1\\] are out of range"):
        run.make_config(calibration_sizes=[1])
    with pytest.raises(MergeInputError, match="distill pairs=-1"):
        run.make_config(distill_pairs=-1)


# ------------------------------------------------------------------------------------------- report and plots


def _point(acc: float, seconds: float, epochs: float) -> dict:
    return {"mean_acc": acc, "acc": {"x": acc, "y": acc}, "seconds": seconds, "steps": int(epochs * 10),
            "epochs": epochs, "loss": 1.0}


def _student(student: str, budget: float, *, merge_acc: float, at: float, converged: float) -> dict:
    return {"task": "t", "arch": "resnet18", "pair": 0, "student": student, "budget": budget, "dense": budget,
            "merge_acc": {"x": merge_acc, "y": merge_acc}, "merge_mean_acc": merge_acc, "merge_seconds": 3.0,
            "teacher_seconds": 0.5, "threads": 2, "start": _point(0.6, 0.5, 0), "at_budget": _point(at, 3.1, 2.0),
            "converged": _point(converged, 30.0, 15.0), "stopped": "max_epochs", "budget_reached": True,
            "wall_seconds": 40.0,
            "last_decrease": 0.05, "epoch_losses": [1.0], "settings": distill.DistillSettings().to_json()}


def _axis(method: str, samples: int, acc: float) -> dict:
    record = {"task": "t", "arch": "resnet18", "pair": 0, "method": method, "requested": 5000 if samples == 4000 else samples,
              "samples": samples, "cap": 4000, "acc": {"x": acc, "y": acc}, "mean_acc": acc, "seconds": 1.5,
              "dense": 1.0, "refit": None}
    if method == "pleas":
        record["refit"] = [{"layer": "fc", "rows": samples, "columns": 513, "error_before": 0.2,
                            "error_after": 0.01 if samples < 513 else 0.08}]
    return record


def _study_results() -> dict:
    from test_bench import GOOD, _results

    results = _results(GOOD)
    results["config"].update(distill_epochs={"resnet18": 15}, distill_pairs=1)
    results["distill"] = [_student("kd-pleas", 1.0, merge_acc=0.81, at=0.80, converged=0.86),
                          _student("kd-source", 1.0, merge_acc=0.81, at=0.70, converged=0.84),
                          _student("kd-pleas", 1.5, merge_acc=0.90, at=0.905, converged=0.92)]
    results["calibration_sizes"] = [_axis("pleas", n, 0.7 + 0.02 * i) for i, n in enumerate((32, 1000, 4000))]
    results["calibration_sizes"] += [_axis("zipit", n, 0.6) for n in (32, 1000, 4000)]
    results["calibration_sizes"].append({**_axis("rebasin-activation", 32, 0.0), "error": "error: Boom: failed"})
    results["axis_seconds"] = 120.0
    return results


def test_study_sections_from_synthetic_results():
    text = report.render(_study_results(), {"distillation": "docs/bench/distillation.png",
                                            "calibration-sizes": "docs/bench/calibration_sizes.png"},
                         results_link="docs/bench/results.json")
    assert "## Distillation baseline" in text and "## Calibration size" in text
    assert text.index("## Distillation baseline") < text.index("## Results")
    assert "the student is behind PLeaS on 1 of 1 task/architecture pairs (-11.0 points against PLeaS)" in text
    assert "**At convergence (1x)** it is ahead of PLeaS on 1 of 1 (+3.0 points), after 10.0x PLeaS's wall time: t / resnet18." in text
    assert "distilling from the PLeaS merge ends +2.0 points against distilling from model A" in text
    assert "| t / resnet18 | 1x | 0.950 | 0.810 (3.0 s) | 0.800 (3.1 s, 2.0 ep) | 0.860 (30 s, 15.0 ep) | max_epochs |" in text
    assert "| kd-pleas, converged (1 pair) | 0.860 | - | 0.920 | - |" in text
    assert "| kd-source, at PLeaS's time (1 pair) | 0.700 | - | - | - |" in text
    assert "![Distillation against PLeaS: accuracy against wall time](docs/bench/distillation.png)" in text
    assert "|  | 32 | 1000 | 4000 (5000 asked: cap) |" in text
    assert "| pleas | 0.700 | 0.720 | 0.740 |" in text
    assert "| pleas refit: layers with fewer rows than columns | 1 / 1 | 0 / 1 | 0 / 1 |" in text
    assert "| pleas refit: mean relative error on the calibration rows, before -> after | 0.200 -> 0.010 |" in text
    assert "PLeaS 0.700 at 32 samples, 0.740 at 4000; within 1 point of that from 4000 samples on." in text
    assert "Ahead of ZipIt! and Git Re-Basin at every size." in text
    assert "Failed: rebasin-activation at 32: error: Boom: failed." in text
    assert "the calibration-size axis 2.0 min" in text
    assert "Of that, the distillation students (teacher passes, training and evaluation): t/resnet18 2.0 min" in text


def test_reports_without_the_studies_render_as_before():
    from test_bench import GOOD, _results

    text = report.render(_results(GOOD), {}, results_link="r.json")
    assert "## Distillation baseline" not in text and "## Calibration size" not in text and "kd-" not in text


def test_study_plots_are_written(tmp_path):
    written = plots.write_plots(_study_results(), tmp_path)
    assert set(written) == {"t/resnet18", "distillation", "calibration-sizes"}
    for path in written.values():
        assert path.stat().st_size > 1000


def test_quick_results_hold_the_studies(tmp_path, quick_cache):
    config = run.make_config(quick=True, methods=["ensemble", "zipit", "pleas"], calibration_sizes=[32])
    results = suite.run_suite(config, tmp_path / "out", command="test", progress=False, log=lambda _: None)
    assert len(results["distill"]) == run.count_students(config) == 3
    assert {(r["student"], r["budget"]) for r in results["distill"]} == {("kd-source", 1.0), ("kd-pleas", 1.0),
                                                                          ("kd-pleas", 1.5)}
    for r in results["distill"]:
        assert r["merge_seconds"] > 0 and r["converged"]["epochs"] <= run.QUICK_DISTILL_EPOCHS
        assert set(r["converged"]["acc"]) == {"0-4", "5-9"}
    merged = {r["budget"]: r for r in results["merges"] if r["method"] == "pleas"}
    kd = next(r for r in results["distill"] if r["student"] == "kd-pleas" and r["budget"] == 1.0)
    assert kd["start"]["mean_acc"] == pytest.approx(merged[1.0]["mean_acc"])  # no step taken: the merge itself
    assert len(results["calibration_sizes"]) == 2
    text = suite.OutputPaths.under(tmp_path / "out").report.read_text()
    assert "## Distillation baseline" in text and "## Calibration size" in text
    assert studies.distill_rows(Summary(results), "mnist-halves", "mlp", [1.0, 1.5])
