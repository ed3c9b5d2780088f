"""Task arithmetic and TIES, for models fine-tuned from one shared base."""
import copy

import pytest
import torch

import pleas
from pleas.methods.task_vectors import ties
from toy_models import MLP


def _finetuned(seed=0):
    """A base MLP and two 'fine-tuned' copies of it (the base plus different small changes)."""
    torch.manual_seed(seed)
    base = MLP().eval()
    tuned = []
    for s in (1, 2):
        m = copy.deepcopy(base)
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        tuned.append(m)
    return base, *tuned


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def test_task_arithmetic_adds_the_scaled_task_vectors():
    base, a, b = _finetuned()
    x = torch.randn(64, 20)
    for scale in (1.0, 0.3):
        merged = _params(pleas.merge(a, b, x, method="task_arithmetic", base=base, scale=scale, progress=False).model)
        pb, pa, pbb = _params(base), _params(a), _params(b)
        for k in merged:
            torch.testing.assert_close(merged[k], pb[k] + scale * ((pa[k] - pb[k]) + (pbb[k] - pb[k])))


def test_task_arithmetic_at_half_scale_is_the_average():
    base, a, b = _finetuned()
    x = torch.randn(64, 20)
    ta = _params(pleas.merge(a, b, x, method="task_arithmetic", base=base, scale=0.5, progress=False).model)
    avg = _params(pleas.merge(a, b, x, method="average", progress=False).model)
    for k in avg:
        torch.testing.assert_close(ta[k], avg[k])


def test_ties_trims_elects_signs_and_averages_the_agreeing_entries():
    va = {"w": torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)}
    vb = {"w": torch.tensor([-2.0, -4.0, 0.1, 2.0], dtype=torch.float64)}
    # density 0.5 keeps two entries of each ([3, 0, 0, 2] and [-2, -4, 0, 2]: the tie at |2| keeps both);
    # elected signs [+, -, 0, +]; entry 0 keeps only A's 3, entry 1 only B's -4, entry 3 averages 2 and 2.
    out = ties([va, vb], density=0.5, scale=1.0)["w"]
    torch.testing.assert_close(out, torch.tensor([3.0, -4.0, 0.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(ties([va, vb], density=1.0, scale=2.0)["w"], torch.tensor([6.0, -5.0, 0.6, 4.0],
                                                                                             dtype=torch.float64))


def test_ties_merge_is_the_base_plus_the_ties_vector_and_deterministic():
    base, a, b = _finetuned()
    x = torch.randn(64, 20)
    runs = [_params(pleas.merge(a, b, x, method="ties", base=base, density=0.3, progress=False).model) for _ in range(2)]
    pb, pa, pbb = _params(base), _params(a), _params(b)
    want = ties([{k: pa[k].double() - pb[k].double() for k in pb}, {k: pbb[k].double() - pb[k].double() for k in pb}],
                density=0.3, scale=1.0)
    for k in pb:
        assert torch.equal(runs[0][k], runs[1][k])
        torch.testing.assert_close(runs[0][k], (pb[k].double() + want[k]).float())


def test_same_base_methods_keep_separate_heads_and_leave_the_inputs_alone(tmp_path):
    base, a, b = _finetuned()
    before = [copy.deepcopy(m.state_dict()) for m in (base, a, b)]
    x = torch.randn(64, 20)
    path = tmp_path / "base.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    result = pleas.merge(a, b, x, method="ties", base=str(path), heads="separate", progress=False)
    heads = result.model.model.head
    torch.testing.assert_close(heads.weight, torch.cat([a.head.weight, b.head.weight]).detach())
    out_a, out_b = result.model(x)
    assert out_a.shape == out_b.shape == (64, 5)
    assert result.report["options"]["base"] == str(path)
    module_result = pleas.merge(a, b, x, method="task_arithmetic", base=base, progress=False)
    assert module_result.report["options"]["base"] == "<MLP>"
    for m, sd in zip((base, a, b), before):
        assert all(torch.equal(m.state_dict()[k], sd[k]) for k in sd)


@pytest.mark.parametrize(
    "options,match",
    [
        ({}, "needs base="),
        ({"base": "no/such/file.safetensors"}, "no/such/file.safetensors"),
        ({"base": 3}, "base must be an nn.Module"),
        ({"base": torch.nn.Linear(3, 2)}, "base has a different architecture"),
        ({"base": "BASE", "scale": float("nan")}, "scale=nan"),
        ({"base": "BASE", "density": 0.0}, "density=0.0; allowed"),
        ({"base": "BASE", "budget": 1.5}, "at most 1x"),
    ],
)
def test_same_base_methods_refuse_bad_options(options, match):
    base, a, b = _finetuned()
    options = {k: (base if v == "BASE" else v) for k, v in options.items()}
    budget = options.pop("budget", 1.0)
    method = "ties" if "density" in options else "task_arithmetic"
    with pytest.raises(pleas.MergeInputError, match=match):
        pleas.merge(a, b, torch.randn(8, 20), method=method, budget=budget, progress=False, **options)


def test_nan_in_the_base_is_refused():
    base, a, b = _finetuned()
    with torch.no_grad():
        base.head.weight[0, 0] = float("nan")
    with pytest.raises(pleas.MergeInputError, match="base has NaN"):
        pleas.merge(a, b, torch.randn(8, 20), method="task_arithmetic", base=base, progress=False)


def test_the_demo_leaves_same_base_methods_out():
    from pleas.demo import default_methods, plan_runs

    assert not {"task_arithmetic", "ties"} & set(default_methods(quick=False))
    with pytest.raises(pleas.MergeInputError, match="one shared base"):
        plan_runs(["ties"], [1.0])


# ------------------------------------------------------------------ DARE, AdaMerging, Fisher (issue #18)

def test_dare_drops_at_the_asked_rate_and_keeps_each_entry_in_expectation():
    from pleas.methods.task_vectors import dare

    tau = {"w": torch.randn(200, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
    dropped = dare([tau], drop=0.7, seed=0)[0]["w"]
    kept = dropped != 0
    assert abs(float(kept.double().mean()) - 0.3) < 0.01  # 40,000 Bernoulli draws: 4.6 standard deviations
    torch.testing.assert_close(dropped[kept], tau["w"][kept] / 0.3)
    assert torch.equal(dare([tau], 0.7, seed=0)[0]["w"], dropped)  # seeded: the same draw
    assert torch.equal(dare([tau], 0.0, seed=3)[0]["w"], tau["w"])  # nothing dropped, nothing rescaled


def test_dare_without_dropping_is_task_arithmetic_and_ties_without_trimming():
    base, a, b = _finetuned()
    x = torch.randn(64, 20)

    def merged(**kw):
        return _params(pleas.merge(a, b, x, base=base, progress=False, **kw).model)

    for got, want in ((merged(method="dare", drop=0.0), merged(method="task_arithmetic")),
                      (merged(method="dare", drop=0.0, combine="ties"), merged(method="ties", density=1.0))):
        for k in want:
            torch.testing.assert_close(got[k], want[k])
    with pytest.raises(pleas.MergeInputError, match="drop"):
        merged(method="dare", drop=1.0)


def test_adamerging_lowers_the_entropy_of_the_merged_predictions():
    from pleas.methods.adamerging import entropy

    assert abs(float(entropy(torch.zeros(5, 7))) - float(torch.log(torch.tensor(7.0)))) < 1e-6
    base, a, b = _finetuned()
    x = torch.randn(128, 20, generator=torch.Generator().manual_seed(1))
    start = pleas.merge(a, b, x, method="task_arithmetic", base=base, scale=0.3, progress=False).model
    for granularity, width in (("task", 1), ("layer", len(_params(a)))):
        result = pleas.merge(a, b, x, method="adamerging", base=base, steps=60, lr=1e-2, granularity=granularity,
                             progress=False)
        assert torch.tensor(result.report["coefficients"]).shape == (2, width)
        with torch.no_grad():
            assert float(entropy(result.model(x))) < float(entropy(start(x)))  # the init: every lambda 0.3


def test_the_diagonal_fisher_is_the_mean_squared_per_sample_gradient():
    from pleas.methods.fisher import diagonal_fisher

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 5)).eval()
    x = torch.randn(10, 4)
    keys = [k for k, _ in model.named_parameters()]
    got = diagonal_fisher(model, [x[:6], x[6:]], keys, samples=10, seed=7)
    generator = torch.Generator().manual_seed(7)
    want = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in model.named_parameters()}
    for batch in (x[:6], x[6:]):
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(model(batch).double(), -1), 1, generator=generator).reshape(-1)
        for xi, yi in zip(batch, y):
            model.zero_grad()
            torch.log_softmax(model(xi[None]), -1)[0, yi].backward()
            for k, p in model.named_parameters():
                want[k] += p.grad.double().square()
    for k in keys:
        torch.testing.assert_close(got[k], want[k] / 10, rtol=1e-4, atol=1e-10)


def test_fisher_merging_of_copies_is_the_copy_and_weights_by_the_fisher():
    base, a, b = _finetuned()
    x = torch.randn(96, 20, generator=torch.Generator().manual_seed(2))
    same = _params(pleas.merge(a, copy.deepcopy(a), x, method="fisher", progress=False).model)
    for k, v in _params(a).items():
        torch.testing.assert_close(same[k], v)
    merged = _params(pleas.merge(a, b, x, method="fisher", progress=False).model)
    pa, pb = _params(a), _params(b)
    for k in merged:  # a weighted average: between the two models, entry by entry
        lo, hi = torch.minimum(pa[k], pb[k]), torch.maximum(pa[k], pb[k])
        assert bool(((merged[k] >= lo - 1e-6) & (merged[k] <= hi + 1e-6)).all()), k
    assert any(not torch.allclose(merged[k], (pa[k] + pb[k]) / 2, atol=1e-4) for k in merged)  # not the plain mean
