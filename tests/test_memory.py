"""Memory: the estimate made before a merge, the max_memory bound, and the solvers that keep large layers
under it (the dual form on the rows, the float32 Gram) against the float64 Gram."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import pleas
from pleas.errors import MergeInputError
from pleas.memory import parse_bytes
from pleas.refit.rows_solve import RowsProblem, plan_layer, row_errors
from pleas.refit.solve import LayerStats, MaskedProblem, RefitOptions


def _wide(seed: int, wide: int = 1024) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, wide), nn.ReLU(), nn.Linear(wide, 32), nn.ReLU(), nn.Linear(32, 4))


def test_parse_bytes():
    assert parse_bytes("6GB") == 6 << 30 and parse_bytes("512 MiB") == 512 << 20 and parse_bytes(1000) == 1000
    for bad in ("six", "-1GB", 0, True):
        with pytest.raises(MergeInputError, match="allowed"):
            parse_bytes(bad)


def test_estimate_names_the_largest_layer_and_grows_with_it():
    x = torch.randn(64, 16)
    small = pleas.estimate_memory(_wide(0, 256), _wide(1, 256), x)
    big = pleas.estimate_memory(_wide(0, 2048), _wide(1, 2048), x)
    assert big.layer["layer"] == "2" and big.layer["columns"] == 2049  # the Linear reading the wide layer
    assert big.peak - big.resident > small.peak - small.resident


def test_too_small_max_memory_fails_before_any_statistics(monkeypatch):
    import pleas.statistics.passes as passes

    def no_pass(*args, **kwargs):
        raise AssertionError("statistics were gathered")

    monkeypatch.setattr(passes, "source_pass", no_pass)
    with pytest.raises(MergeInputError, match=r"estimated to peak at .* the largest layer '\d+' .*What would fit"):
        pleas.merge(_wide(0), _wide(1), torch.randn(64, 16), max_memory="10MB", progress=False)


def _deep(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*(m for _ in range(6) for m in (nn.Linear(64, 64), nn.ReLU())), nn.Linear(64, 4))


def test_streaming_is_offered_when_the_targets_do_not_fit_and_counts_two_layers_of_them():
    x = torch.randn(512, 64)
    held = pleas.estimate_memory(_deep(0), _deep(1), x)
    streamed = pleas.estimate_memory(_deep(0), _deep(1), x, streaming=True)
    assert streamed.streaming and not held.streaming
    # six 64-wide layers' targets (and a 4-wide one) held at once, against two of them
    assert streamed.targets * 3 == pytest.approx(held.targets, rel=0.05)
    x = torch.randn(512, 16)
    with pytest.raises(MergeInputError, match=r"What would fit: streaming=True \(pleas option"):
        pleas.merge(_wide(0), _wide(1), x, max_memory="10MB", progress=False)


def _problem(seed=0, n=120, p=300, m=40):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=gen)
    x[:, -1] = 1.0  # a bias column
    y = torch.randn(n, m, generator=gen)
    w0 = torch.randn(m, p, generator=gen, dtype=torch.float64) * 0.1
    # two models: a third of the rows and columns each model's alone, the rest merged (zero blocks between)
    own_out = torch.ones(2, m, dtype=torch.bool)
    own_out[1, : m // 3], own_out[0, m // 3 : 2 * m // 3] = False, False
    own_in = torch.ones(2, p, dtype=torch.bool)
    own_in[1, : p // 3], own_in[0, p // 3 : 2 * p // 3] = False, False
    return x, y, w0, own_out, own_in


@pytest.mark.parametrize("rows", [120, 600])  # fewer and more rows than the 300 columns
def test_rows_dual_form_equals_the_gram_solve(rows):
    x, y, w0, own_out, own_in = _problem(n=rows)
    opt = RefitOptions()
    st = LayerStats(torch.zeros(300, 300, dtype=torch.float64), torch.zeros(300, 40, dtype=torch.float64))
    st.update(x, y)
    lam = opt.ridge * st.scale()
    dense, quad_dense = MaskedProblem(st, w0, own_out, own_in, opt).solve(lam)
    dual = RowsProblem(x, y, w0, own_out, own_in, opt)
    # with 120 rows the Gram's products run in float64, with 600 in float32 (LayerStats: SMALL_PRODUCT),
    # the dual's always in float64: round-off of float64, or of float32 sums (relative 1e-7 x conditioning)
    tol = 1e-8 if rows * 300 * 300 < (1 << 24) else 1e-5
    assert dual.scale() == pytest.approx(st.scale(), rel=tol)
    w, quad = dual.solve(lam)
    assert float((w - dense).norm() / dense.norm()) < tol
    assert quad == pytest.approx(quad_dense, rel=1e-6)


def test_rows_held_out_error_without_a_weight_equals_the_error_of_the_solution():
    x, y, w0, own_out, own_in = _problem(n=150)
    x[:, 5] = 0.0  # a column the fit rows never reach (its weights stay W_0's) but held-out rows do
    held_x, held_y = torch.randn(40, 300, generator=torch.Generator().manual_seed(7)), torch.randn(40, 40)
    problem = RowsProblem(x, y, w0, own_out, own_in, RefitOptions())
    error_at = problem.held_error(held_x, held_y)
    for lam in (1e-3, 1.0, 1e3):
        expected = row_errors(held_x, held_y)(problem.solve(lam)[0])
        assert error_at(lam) == pytest.approx(expected, rel=1e-9)  # float64 throughout: round-off only
    start = problem.start
    w, _ = problem.solve(1.0, inplace=True)  # W_0 has zero blocks here: its private copy becomes W
    assert w is start and problem.start is None
    with pytest.raises(RuntimeError, match="solved in place already"):
        problem.solve(1.0)


def test_float32_gram_is_close_to_float64():
    x, y, w0, own_out, own_in = _problem(n=600)
    opt = RefitOptions()
    sums = {}
    for dtype in (torch.float64, torch.float32):
        st = LayerStats(torch.zeros(300, 300, dtype=dtype), torch.zeros(300, 40, dtype=torch.float64))
        st.update(x, y)
        sums[dtype] = MaskedProblem(st, w0, own_out, own_in, opt).solve(opt.ridge * st.scale())[0]
    # float32 sums and factor: relative error about eps32 x cond(G + lam I); the ridge (1e-2 of the mean
    # eigenvalue) bounds cond by about 100 x (largest / mean eigenvalue), here a few hundred: 1e-4 is ample
    diff = float((sums[torch.float32] - sums[torch.float64]).norm() / sums[torch.float64].norm())
    assert diff < 1e-4


def test_plan_prefers_rows_below_columns_then_float64_then_float32():
    assert plan_layer(25089, 4096, 64, None) == "rows"  # fewer rows than columns: the dual form
    assert plan_layer(4097, 4096, 16388, None) == "dense"
    assert plan_layer(25089, 4096, 64, 2 << 30) == "rows"
    assert plan_layer(4097, 4096, 16388, 600 << 20) == "float32"
    assert plan_layer(4097, 4096, 16388, 1 << 20) is None
    assert plan_layer(10, 10, 5, 1, "dense") == "dense"


def test_forced_solvers_merge_close_to_dense():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    out = {}
    for solver in ("dense", "rows", "float32"):
        r = pleas.merge(_wide(0), _wide(1), x, solver=solver, progress=False)
        assert set(r.report["memory"]["solvers"]) == {solver}
        with torch.no_grad():
            out[solver] = r.model(x)
    for solver in ("rows", "float32"):
        assert float((out[solver] - out["dense"]).norm() / out["dense"].norm()) < 1e-3


def test_estimate_within_a_factor_of_the_measured_peak():
    """A merge whose refit Gram dominates (a 4,096-wide layer: 134 MB in float64), in a fresh process."""
    code = """
import json, resource, torch
from torch import nn
import pleas
torch.set_num_threads(1)
def make(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 4096), nn.ReLU(), nn.Linear(4096, 64), nn.ReLU(), nn.Linear(64, 4))
r = pleas.merge(make(0), make(1), torch.randn(256, 16), progress=False)
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "estimate": r.report["memory"]["estimated_peak"]}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.5 < found["estimate"] / found["peak"] < 2.0, found


def test_the_estimate_counts_what_distillation_steps_hold():
    def model(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 4))

    x = torch.randn(64, 512)
    plain = pleas.estimate_memory(model(0), model(1), x)
    tuned = pleas.estimate_memory(model(0), model(1), x, distill_steps=50)
    # gradients, Adam's two moments and the start kept for the undo, beside the merged weights themselves
    assert tuned.peak >= tuned.resident + 5 * tuned.merged
    assert tuned.peak - tuned.resident > plain.peak - plain.resident
