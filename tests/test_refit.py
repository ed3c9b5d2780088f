"""The least-squares refit: exact recovery of planted maps, never worse than its start, exact ensemble
at k = 0, zero blocks kept, deterministic."""
import pytest
import torch
from torch import nn

import pleas
from conftest import assert_close
from pleas.calibration import Calibration
from pleas.rewrite import partial_merge_map
from pleas.refit import RefitOptions, refit
from toy_models import MLP, VGGBN, randomise_norm_stats


def _pair(factory, seeds=(0, 1)):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(randomise_norm_stats(factory(), s))
    return out


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1, stride=2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("factory,shape", [(TwoLinear, (512, 6)), (TwoConv, (64, 3, 8, 8))])
def test_refit_recovers_a_planted_map_exactly(factory, shape):
    """A and B share their first layer, so the merged first layer's output is exactly theirs; B's second
    layer is A's plus a planted change. The merged second layer must become their average exactly."""
    torch.manual_seed(0)
    a = factory().eval()
    b = factory().eval()
    b.a.load_state_dict(a.a.state_dict())
    x = torch.randn(*shape)
    spec = pleas.build_spec(a, x[:2])
    g = spec.groups[0]
    maps = {g.name: partial_merge_map(torch.arange(g.width), torch.ones(g.width), g.width)}
    sd = pleas.transform_state_dicts(spec, [a.state_dict(), b.state_dict()], maps)
    merged = pleas.build_model(a, sd)
    with torch.no_grad():  # spoil the initialisation: the solve must not depend on it
        merged.b.weight.add_(torch.randn_like(merged.b.weight))
    report = refit([a, b], merged, spec, maps, Calibration(x, batch_size=64), RefitOptions(ridge=0.0, progress=False))
    expected = (a.b.weight + b.b.weight) / 2
    torch.testing.assert_close(merged.b.weight, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged.b.bias, (a.b.bias + b.b.bias) / 2, atol=1e-4, rtol=1e-4)
    assert report.layers[-1]["error_after"] < 1e-8


@pytest.mark.parametrize("factory,shape", [(MLP, (256, 20)), (VGGBN, (64, 3, 16, 16))])
def test_fit_error_never_increases(factory, shape):
    a, b = _pair(factory)
    x = torch.randn(*shape)
    result = pleas.merge(a, b, x, method="pleas", budget=1.2, progress=False)
    layers = result.report["refit"]
    assert len(layers) == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in a.modules())
    for layer in layers:
        assert layer["error_after"] <= layer["error_before"] + 1e-9, layer
    assert any(layer["error_after"] < 0.9 * layer["error_before"] for layer in layers)


@pytest.mark.parametrize("heads", ["shared", "separate"])
def test_refit_keeps_the_exact_ensemble(heads):
    a, b = _pair(VGGBN)
    x = torch.randn(32, 3, 16, 16)
    counts = {g.name: 0 for g in pleas.build_spec(a, x[:2])}
    result = pleas.merge(a, b, x, method="pleas", merge_counts=counts, budget=3.0, heads=heads,
                         norm_stats="sources", ridge=0.0, progress=False)
    with torch.no_grad():
        if heads == "shared":
            assert_close(result.model(x), (a(x) + b(x)) / 2, rel=1e-3)
        else:
            out_a, out_b = result.model(x)
            assert_close(out_a, a(x), rel=1e-3)
            assert_close(out_b, b(x), rel=1e-3)


@pytest.mark.parametrize("mask", [True, False])
def test_mask_keeps_zero_blocks_zero(mask):
    a, b = _pair(MLP)
    x = torch.randn(256, 20)
    counts = {"body.0": 10, "body.2": 12, "body.4": 20}
    w = pleas.merge(a, b, x, method="pleas", merge_counts=counts, budget=2.0, mask=mask,
                    progress=False).model.state_dict()["body.2.weight"]
    a_rows, b_rows = slice(12, 32), slice(32, 52)
    a_cols, b_cols = slice(10, 32), slice(32, 54)
    zeros = torch.count_nonzero(w[a_rows, b_cols]) + torch.count_nonzero(w[b_rows, a_cols])
    assert (zeros == 0) == mask


def test_same_seed_same_weights():
    a, b = _pair(VGGBN)
    x = torch.randn(64, 3, 16, 16)
    runs = [pleas.merge(a, b, x, method="pleas", budget=1.3, seed=3, progress=False).model.state_dict() for _ in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_pleas_free_uses_other_data():
    """PLeaS-free: nothing but the calibration data changes; the merge still works and differs."""
    a, b = _pair(VGGBN)
    own, other = torch.randn(64, 3, 16, 16), torch.rand(64, 3, 16, 16) * 3
    m1 = pleas.merge(a, b, own, method="pleas", progress=False).model.state_dict()
    m2 = pleas.merge(a, b, other, method="pleas", progress=False).model.state_dict()
    assert any(not torch.equal(m1[k], m2[k]) for k in m1)


def test_adam_refit_option_runs_and_improves_the_fit():
    a, b = _pair(MLP)
    result = pleas.merge(a, b, torch.randn(256, 20), method="pleas", refit="adam", adam_steps=50, progress=False)
    layers = result.report["refit"]
    # Adam moves every weight a little, so an already-exact layer may pick up round-off-sized error.
    assert all(l["error_after"] <= l["error_before"] + 1e-3 for l in layers)
    assert sum(l["error_after"] for l in layers) < 0.6 * sum(l["error_before"] for l in layers)


def test_bad_refit_options_are_refused():
    a, b = _pair(MLP)
    with pytest.raises(pleas.MergeInputError, match="refit='sgd'; allowed"):
        pleas.merge(a, b, torch.randn(8, 20), method="pleas", refit="sgd")


def _identity_merge(a, b, x):
    spec = pleas.build_spec(a, x[:2])
    maps = {g.name: partial_merge_map(torch.arange(g.width), torch.ones(g.width), g.width) for g in spec}
    return spec, maps, pleas.build_model(a, pleas.transform_state_dicts(spec, [a.state_dict(), b.state_dict()], maps)).eval()


def test_targets_sampled_in_another_pass_give_the_same_refit():
    """The propagated refit's targets can ride along on the matching's pass over the sources; the
    result is bit-identical to sampling them in a pass of its own."""
    from pleas.refit import TargetSampler
    from pleas.statistics import collect_moments

    a, b = _pair(VGGBN)
    x = torch.randn(96, 3, 16, 16)
    data = Calibration(x, batch_size=32)
    spec, maps, merged = _identity_merge(a, b, x)
    options = RefitOptions(inputs="propagated", progress=False)
    own = pleas.build_model(a, merged.state_dict()).eval()
    refit([a, b], own, spec, maps, data, options)
    sampler = TargetSampler.for_budget(pleas.analyze(pleas.capture(a, x[:2], copy_model=True)), 1.0, options, len(data))
    collect_moments([a, b], spec, data, progress=False, observers=[sampler])
    refit([a, b], merged, spec, maps, data, options, samples=sampler)
    assert all(torch.equal(v, own.state_dict()[k]) for k, v in merged.state_dict().items())


def test_propagated_refit_sets_exact_batchnorm_statistics():
    """Each BatchNorm ends with the mean and variance of its inputs over all the calibration data, as the
    merged model with the refitted layers before it produces them, shrunk toward the statistics the merge
    carried over by PRIOR_SAMPLES samples' worth."""
    from pleas.norms.reset import PRIOR_SAMPLES

    a, b = _pair(VGGBN)
    x = torch.randn(96, 3, 16, 16)
    spec, maps, merged = _identity_merge(a, b, x)
    norms = [m for m in merged.modules() if isinstance(m, nn.BatchNorm2d)]
    prior = {m: (m.running_mean.clone(), m.running_var.clone()) for m in norms}
    refit([a, b], merged, spec, maps, Calibration(x, batch_size=40), RefitOptions(inputs="propagated", progress=False))
    seen = {}

    def keep_input(module, inputs, output):  # returns None: the output stays as it is
        seen[module] = inputs[0]

    handles = [m.register_forward_hook(keep_input) for m in norms]
    with torch.no_grad():
        merged(x)
    for h in handles:
        h.remove()
    assert len(seen) == len(norms) > 0
    for norm, inp in seen.items():
        count = inp.numel() // inp.shape[1]
        w = count / (count + PRIOR_SAMPLES)
        mean0, var0 = prior[norm]
        torch.testing.assert_close(norm.running_mean, w * inp.mean((0, 2, 3)) + (1 - w) * mean0, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(norm.running_var, w * inp.var((0, 2, 3)) + (1 - w) * var0, atol=1e-5, rtol=1e-4)


def test_propagated_refit_memory_cap_uses_the_first_batches():
    a, b = _pair(VGGBN)
    x = torch.randn(96, 3, 16, 16)
    spec, maps, merged = _identity_merge(a, b, x)
    options = RefitOptions(inputs="propagated", progress=False, max_frontier_bytes=1, min_rows=10**6)
    report = refit([a, b], merged, spec, maps, Calibration(x, batch_size=32), options)
    full = refit([a, b], pleas.build_model(a, merged.state_dict()), spec, maps, Calibration(x, batch_size=32),
                 RefitOptions(inputs="propagated", progress=False, min_rows=10**6))
    assert [layer["rows"] * 3 for layer in report.layers] == [layer["rows"] for layer in full.layers]
