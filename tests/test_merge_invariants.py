"""Invariants of partial merging: the ensemble is exact, statistics are additive, a model merged with
a permuted copy of itself comes back, and bad input is refused clearly."""
import copy
import warnings

import pytest
import torch
from torch import nn

import pleas
from conftest import assert_close
from pleas.calibration import Calibration
from pleas.setup import prepare
from pleas.statistics import collect_moments
from toy_models import MLP, VGGBN, randomise_norm_stats


def _pair(factory, seed_a=0, seed_b=1):
    torch.manual_seed(seed_a)
    a = randomise_norm_stats(factory(), seed_a)
    torch.manual_seed(seed_b)
    b = randomise_norm_stats(factory(), seed_b)
    return a, b


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=10)


@pytest.mark.parametrize("factory,shape", [(_resnet18, (16, 3, 32, 32)), (VGGBN, (16, 3, 16, 16))])
def test_ensemble_shared_heads_is_the_average(factory, shape):
    a, b = _pair(factory)
    x = torch.randn(*shape)
    merged = pleas.merge(a, b, x, method="ensemble", progress=False).model
    with torch.no_grad():
        assert_close(merged(x), (a(x) + b(x)) / 2)


@pytest.mark.parametrize("factory,shape", [(_resnet18, (16, 3, 32, 32)), (VGGBN, (16, 3, 16, 16))])
def test_ensemble_separate_heads_is_both_models(factory, shape):
    a, b = _pair(factory)
    x = torch.randn(*shape)
    result = pleas.merge(a, b, x, method="ensemble", heads="separate", progress=False)
    with torch.no_grad():
        out_a, out_b = result.model(x)
        assert_close(out_a, a(x))
        assert_close(out_b, b(x))


def test_statistics_in_two_halves_sum_to_one_pass():
    a, b = _pair(VGGBN)
    x = torch.randn(24, 3, 16, 16)
    spec = pleas.build_spec(a, x[:2])
    # Same batches either way (a forward pass's float32 round-off depends on the batch it is in).
    whole = collect_moments([a, b], spec, Calibration(x, batch_size=8), progress=False)
    first = collect_moments([a, b], spec, Calibration(x[:16], batch_size=8), progress=False)
    second = collect_moments([a, b], spec, Calibration(x[16:], batch_size=8), progress=False)
    for g in spec:
        both = first[g.name] + second[g.name]
        assert both.count == whole[g.name].count > 0
        assert both.sum.shape == (2 * g.width,) and both.outer.shape == (2 * g.width, 2 * g.width)
        torch.testing.assert_close(both.sum, whole[g.name].sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(both.outer, whole[g.name].outer, rtol=1e-12, atol=1e-12)
    # and one half alone is not the whole: the test can fail
    assert not torch.allclose(first["features.0"].sum, whole["features.0"].sum)


def test_flattened_units_count_positions_as_samples():
    a, b = _pair(VGGBN)
    x = torch.randn(8, 3, 16, 16)
    spec = pleas.build_spec(a, x[:2])
    moments = collect_moments([a, b], spec, Calibration(x), progress=False)
    assert moments["features.7"].count == 8 * 4 * 4  # read by the Linear after flatten: 16 entries per unit
    assert moments["features.0"].count == 8 * 16 * 16


@pytest.mark.parametrize("matching", ["activation", "weight"])
@pytest.mark.parametrize("factory,shape", [(MLP, (64, 20)), (VGGBN, (32, 3, 16, 16))])
def test_rebasin_with_permuted_self_returns_the_model(factory, shape, matching):
    torch.manual_seed(0)
    a = randomise_norm_stats(factory())
    x = torch.randn(*shape)
    spec = pleas.build_spec(a, x[:2])
    b = pleas.build_model(a, pleas.permute_state_dict(a.state_dict(), spec, spec.random_permutations(5)))
    merged = pleas.merge(a, b, x, method="rebasin", matching=matching, norm_stats="sources", progress=False).model
    with torch.no_grad():
        assert_close(merged(x), a(x))


def test_average_is_plain_weight_averaging():
    a, b = _pair(MLP)
    merged = pleas.merge(a, b, torch.randn(8, 20), method="average", progress=False).model
    for k, t in merged.state_dict().items():
        torch.testing.assert_close(t, (a.state_dict()[k] + b.state_dict()[k]) / 2)


@pytest.mark.parametrize("method, options", [
    ("rebasin", {}), ("pleas", {}), ("pleas", {"streaming": True, "budget": 1.5}), ("pleas", {"fold_bn": True}),
    ("pleas", {"distill_steps": 3}), ("zipit", {}), ("regmean", {}),
    ("ensemble", {}), ("average", {}), ("fisher", {}), ("adamerging", {"base": "fresh"}), ("ties", {"base": "fresh"}),
])
def test_callers_models_are_untouched(method, options):
    # the merge's copies of the sources share their storage (pleas.setup.sharing_copy): any write into a
    # source's weights, mode or gradients would show here
    a, b = _pair(VGGBN)
    a.train()
    b.eval().requires_grad_(False)
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    if options.get("base") == "fresh":
        options = {**options, "base": VGGBN()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pleas.merge(a, b, torch.randn(16, 3, 16, 16), method=method, progress=False, **options)
    assert a.training and not b.training
    assert all(p.requires_grad and p.grad is None for p in a.parameters())
    assert not any(p.requires_grad for p in b.parameters())
    for m, sd in zip((a, b), before):
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def test_different_shapes_are_refused():
    a, b = MLP(hidden=32), MLP(hidden=16)
    with pytest.raises(pleas.MergeInputError, match=r"different architectures: body.0.weight has shape"):
        pleas.merge(a, b, torch.randn(8, 20), method="average")


def test_different_graphs_are_refused():
    class Other(MLP):
        def forward(self, x):
            return self.head(self.body(x.flatten(1)) * 2 + 1)

    torch.manual_seed(0)
    with pytest.raises(pleas.MergeInputError, match="different graphs"):
        pleas.merge(MLP(), Other(), torch.randn(8, 20), method="average")


def test_different_tensor_names_are_refused():
    a = MLP()
    b = nn.Sequential(nn.Linear(20, 5))
    with pytest.raises(pleas.MergeInputError, match="different architectures"):
        pleas.merge(a, b, torch.randn(8, 20), method="average")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_weights_are_refused(bad):
    a, b = _pair(MLP)
    with torch.no_grad():
        b.body[2].weight[0, 0] = bad
    with pytest.raises(pleas.MergeInputError, match=r"model_b has NaN.*body.2.weight"):
        pleas.merge(a, b, torch.randn(8, 20), method="average")


def test_huge_finite_weights_are_not_mistaken_for_infinite():
    """Weights whose float32 sum overflows are still finite: the check must not refuse them."""
    a, b = _pair(MLP)
    with torch.no_grad():
        b.body[2].weight[:2, 0] = 3e38
    assert not torch.isfinite(b.body[2].weight.sum())
    pleas.merge(a, b, torch.randn(8, 20), method="average", progress=False)


@pytest.mark.parametrize(
    "data,match",
    [
        (torch.randn(0, 20), "holds no samples"),
        ([], "empty"),
        (torch.randn(8, 7), r"shape \(8, 7\) do not fit model_a"),
        ("mnist.npy", "not supported"),
        (torch.full((4, 20), float("nan")), "NaN"),
    ],
)
def test_bad_calibration_data_is_refused(data, match):
    a, b = _pair(MLP)
    with pytest.raises(pleas.MergeInputError, match=match):
        pleas.merge(a, b, data, method="average")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"budget": 0.5}, r"budget=0.5 is out of range; allowed: a number >= 1"),
        ({"budget": 9.0, "method": "zipit"}, r"budget=9 is out of range; reachable for this model: \[1, \d\.\d+\]"),
        ({"budget": 1.5, "method": "average"}, "makes models of size at most 1x"),
        ({"method": "nope"}, r"unknown method 'nope'; known methods: \["),
        ({"heads": "both"}, "heads='both'; allowed"),
        ({"matching": "magic"}, "matching='magic'; allowed"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    a, b = _pair(MLP)
    kwargs = {"method": "average", **kwargs}
    with pytest.raises(pleas.MergeInputError, match=match):
        pleas.merge(a, b, torch.randn(8, 20), **kwargs)


def test_data_forms_are_equivalent():
    a, b = _pair(VGGBN)
    x = torch.randn(16, 3, 16, 16)
    y = torch.zeros(16, dtype=torch.long)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    outs = []
    for data in (x, loader, [x[:8], x[8:]], ((x[i : i + 8], y[i : i + 8]) for i in (0, 8))):
        merged = pleas.merge(a, b, data, method="rebasin", batch_size=8, progress=False).model
        with torch.no_grad():
            outs.append(merged(x))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])


@pytest.mark.parametrize("factory,shape", [(MLP, (256, 20)), (_resnet18, (128, 3, 64, 64))])
def test_activation_matching_recovers_planted_permutations(factory, shape):
    from pleas.matching import activation_matching

    torch.manual_seed(0)
    a = randomise_norm_stats(factory())
    x = torch.randn(*shape)
    spec = pleas.build_spec(a, x[:2])
    planted = spec.random_permutations(seed=7)
    b = pleas.build_model(a, pleas.permute_state_dict(a.state_dict(), spec, planted)).eval()
    moments = collect_moments([a, b], spec, Calibration(x, batch_size=16), progress=False)
    found = activation_matching(spec, moments)
    for g in spec:
        # Units that never vary (dead ReLUs) carry no signal and are interchangeable; all others must match.
        d = g.width
        cov_a = moments[g.name].covariance().diagonal()[:d]
        live = cov_a > 1e-12
        assert live.float().mean() > 0.5, g.name
        expected = torch.argsort(planted[g.name])
        assert torch.equal(found.perms[g.name][live], expected[live]), g.name
        assert float(found.similarity[g.name][live].min()) > 0.999


def test_zipit_with_permuted_self_returns_the_model():
    torch.manual_seed(0)
    a = MLP().eval()
    x = torch.randn(256, 20)
    spec = pleas.build_spec(a, x[:2])
    b = pleas.build_model(a, pleas.permute_state_dict(a.state_dict(), spec, spec.random_permutations(3)))
    merged = pleas.merge(a, b, x, method="zipit", alpha=0.0, progress=False).model
    with torch.no_grad():
        assert_close(merged(x), a(x))


@pytest.mark.parametrize("budget", [1.0, 1.3, 1.6, 2.0])
def test_zipit_partial_zipping_meets_the_budget(budget):
    a, b = _pair(VGGBN)
    x = torch.randn(32, 3, 16, 16)
    result = pleas.merge(a, b, x, method="zipit", budget=budget, progress=False)
    size = result.report["size"]
    assert size["relative_dense"] <= budget + 1e-9
    assert size["merged_params"] == round(size["relative_dense"] * size["source_params"])
    # a prefix of the groups is zipped, the last of them only as far as the budget needs
    stage = [0 if g["merged_width"] == g["width"] else 2 if g["merged_width"] == 2 * g["width"] else 1
             for g in result.report["groups"]]
    assert stage == sorted(stage) and stage.count(1) <= 1
    # tight: one more unit in the last zipped group would exceed the budget
    job = prepare([a, b], x, budget=budget, heads="shared", matching="activation", seed=0, device="cpu",
                  dtype=torch.float32, batch_size=256, norm_stats="auto", progress=False)
    widths = {g["name"]: g["merged_width"] for g in result.report["groups"]}
    boundary = next((g for g in reversed(result.report["groups"]) if g["merged_width"] < 2 * g["width"]), None)
    if boundary is not None and budget < job.max_budget():
        widths[boundary["name"]] += 1
        assert job.size(widths) > job.target()
    with torch.no_grad():
        assert result.model(x).shape == (32, 10)


def test_zipit_at_full_size_is_the_ensemble():
    a, b = _pair(VGGBN)
    x = torch.randn(16, 3, 16, 16)
    full = pleas.merge(a, b, x, method="ensemble", progress=False).report["size"]["relative_dense"]
    assert full > 2.0  # dense layers hold the zero cross blocks
    merged = pleas.merge(a, b, x, method="zipit", budget=full, norm_stats="sources", progress=False).model
    with torch.no_grad():
        assert_close(merged(x), (a(x) + b(x)) / 2)


def test_rebasin_separate_heads_answers_both_tasks():
    a, b = _pair(VGGBN)
    x = torch.randn(16, 3, 16, 16)
    result = pleas.merge(a, b, x, method="rebasin", heads="separate", progress=False)
    out_a, out_b = result.model(x)
    assert out_a.shape == out_b.shape == (16, 10)
    assert result.report["size"]["relative_dense"] == 1.0


@pytest.mark.parametrize("budget", [1.2, 1.5])
def test_partial_rebasin_meets_the_budget_with_one_fraction(budget):
    a, b = _pair(VGGBN)
    x = torch.randn(32, 3, 16, 16)
    result = pleas.merge(a, b, x, method="rebasin", budget=budget, progress=False)
    rel = result.report["size"]["relative_dense"]
    assert budget - 0.15 < rel <= budget + 1e-9
    fractions = [result.merge_counts[g.name] / g.width for g in result.spec]
    assert max(fractions) - min(fractions) <= 0.5 / min(g.width for g in result.spec) * 2 + 1e-9
    assert all(result.widths[g.name] == 2 * g.width - result.merge_counts[g.name] for g in result.spec)


def test_explicit_merge_counts_give_the_pleas_layout():
    a, b = _pair(VGGBN)
    x = torch.randn(16, 3, 16, 16)
    counts = {"features.0": 3, "features.3": 8, "features.7": 0, "classifier.1": 32}
    result = pleas.merge(a, b, x, method="rebasin", merge_counts=counts, budget=2.0, norm_stats="sources", progress=False)
    assert result.merge_counts == counts
    w = result.model.state_dict()["features.3.weight"]  # out: features.3 (8 merged), in: features.0 (3 merged)
    assert w.shape[:2] == (8, 13)
    w7 = result.model.state_dict()["features.7.weight"]  # out: 32 kept (16 A-only, 16 B-only); in: 8 merged
    assert w7.shape[:2] == (32, 8)
    with pytest.raises(pleas.MergeInputError, match="merge_counts names unknown groups"):
        pleas.merge(a, b, x, method="rebasin", merge_counts={"nope": 1}, budget=2.0, progress=False)


def test_zero_blocks_keep_a_only_units_from_reading_b_only_units():
    a, b = _pair(MLP)
    x = torch.randn(64, 20)
    counts = {"body.0": 10, "body.2": 12, "body.4": 32}
    w = pleas.merge(a, b, x, method="rebasin", merge_counts=counts, budget=2.0, progress=False).model.state_dict()["body.2.weight"]
    d_in, k_in, d_out, k_out = 32, 10, 32, 12
    a_rows = slice(k_out, d_out)
    b_rows = slice(d_out, 2 * d_out - k_out)
    a_cols = slice(k_in, d_in)
    b_cols = slice(d_in, 2 * d_in - k_in)
    assert torch.count_nonzero(w[a_rows, b_cols]) == 0 and torch.count_nonzero(w[b_rows, a_cols]) == 0
    assert torch.count_nonzero(w[a_rows, a_cols]) > 0 and torch.count_nonzero(w[b_rows, b_cols]) > 0


def test_effective_size_excludes_exactly_the_zero_blocks():
    a, b = _pair(MLP)
    x = torch.randn(64, 20)
    counts = {"body.0": 10, "body.2": 12, "body.4": 20}
    result = pleas.merge(a, b, x, method="rebasin", merge_counts=counts, budget=2.0, norm_stats="sources", progress=False)
    zeros = sum(int((t == 0).sum()) for t in result.model.state_dict().values())
    size = result.report["size"]
    assert size["merged_params"] - size["effective_params"] == zeros  # random weights: no other exact zeros
    # docs/algorithm.md section 3: 2 (d_o - k_o)(d_i - k_i) per layer
    d = 32
    expected = 2 * (d - 12) * (d - 10) + 2 * (d - 20) * (d - 12)
    assert zeros == expected
    ens = pleas.merge(a, b, x, method="ensemble", progress=False).report["size"]
    assert ens["relative_effective"] == pytest.approx(2.0, abs=0.01) and ens["relative_dense"] > 2.2
