"""``pleas demo``: the table, the run plan, and a quick end-to-end run on real data."""
from __future__ import annotations

import pytest

from pleas.cli import main
from pleas.demo import DemoRow, plan_runs, render_table, run_demo
from pleas.errors import MergeInputError
from pleas.methods import METHODS, Method


def test_render_table():
    rows = [
        DemoRow("source A", size=1.0, acc_a=0.98),
        DemoRow("ensemble", None, size=2.49, acc_a=0.98, acc_b=0.93, seconds=0.03),
        DemoRow("zipit", 1.5, size=1.5, acc_a=0.9, acc_b=0.8, seconds=1.25),
        DemoRow("pleas", 1.2, error="MergeInputError: budget too\nlarge"),
    ]
    text = render_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["method", "budget", "size", "acc", "0-4", "acc", "5-9", "mean", "sec"]
    assert lines[2].split() == ["source", "A", "-", "1.00", "0.980", "-", "-", "-"]
    assert lines[3].split() == ["ensemble", "-", "2.49", "0.980", "0.930", "0.955", "0.03"]
    assert lines[4].split() == ["zipit", "1.5", "1.50", "0.900", "0.800", "0.850", "1.25"]
    assert lines[5].split()[:3] == ["pleas", "1.2", "error:"] and lines[5].endswith("budget too large")
    assert len({len(line) for line in lines[:5]}) == 1  # aligned columns


def test_plan_runs_respects_each_methods_sizes():
    runs, skipped = plan_runs(["average", "ensemble", "rebasin"], [1.0, 1.5])
    assert runs == [("ensemble", None), ("average", 1.0), ("rebasin", 1.0), ("rebasin", 1.5)]
    assert skipped and skipped[0].startswith("average at 1.5")
    with pytest.raises(MergeInputError, match="unknown method"):
        plan_runs(["nope"], [1.0])
    with pytest.raises(MergeInputError, match="budgets \\[0.5\\]"):
        plan_runs(["rebasin"], [0.5])


class _Broken(Method):
    name = "broken"

    def run(self, setup):
        raise MergeInputError("broken cannot merge this")


def test_quick_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PLEAS_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--quick", "--arch", "mlp", "--calibration", "200"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "ensemble" in out and "source A" in out and "source B" in out and "total" in out
    assert "training model A" in captured.err
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2  # cached source models

    # second run: cached models, a method that fails becomes a row, not a crash
    monkeypatch.setitem(METHODS, "broken", _Broken)
    lines = []
    result = run_demo(arch="mlp", quick=True, methods=["ensemble", "average", "broken"], budgets=[1.0, 1.2],
                      calibration=200, out=lines.append, log=lines.append)
    assert not any(line.startswith("training") for line in lines)
    by_method = {(r.method, r.budget): r for r in result.rows}
    assert by_method[("broken", 1.0)].error == "MergeInputError: broken cannot merge this"
    assert ("average", 1.2) not in by_method and any("average at 1.2" in line for line in lines)
    ensemble = by_method[("ensemble", None)]
    sources = {r.method: r for r in result.rows[:2]}
    assert ensemble.acc_a == sources["source A"].acc_a and ensemble.acc_b == sources["source B"].acc_b  # exact
    assert result.calibration == 200


def test_demo_rejects_unknown_methods(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PLEAS_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--methods", "ensemble,nope"]) == 2
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
