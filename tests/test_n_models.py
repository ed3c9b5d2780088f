"""More than two models (issue #18): the merge of N models by every method that has an N-model form."""
import warnings

import pytest
import torch

import pleas
from conftest import assert_close
from pleas import models


def _mlps(n, seed=0):
    out = []
    for k in range(n):
        torch.manual_seed(seed + k)
        out.append(models.mlp(in_features=20, hidden=32, depth=2, num_classes=4).eval())
    return out


def _resnets(n):
    out = []
    for k in range(n):
        torch.manual_seed(k)
        out.append(models.resnet20(in_channels=1, num_classes=5, width=1).eval())
    return out


def _merge(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pleas.merge(*args, progress=False, **kwargs)


def _outputs(model, x):
    with torch.no_grad():
        y = model(x)
    return y if isinstance(y, tuple) else (y,)


@pytest.mark.parametrize("n", [3, 5])
def test_the_ensemble_at_n_x_reproduces_every_source(n):
    sources = _mlps(n)
    x = torch.randn(128, 20, generator=torch.Generator().manual_seed(0))
    result = _merge(sources, x, method="ensemble", heads="separate")
    outs = _outputs(result.model, x[:16])
    assert len(outs) == n
    for out, source in zip(outs, sources):
        assert_close(out, _outputs(source, x[:16])[0])
    side_by_side = _merge(sources, x, method="pleas", heads="separate", budget=n, budget_metric="effective_params")
    for out, source in zip(_outputs(side_by_side.model, x[:16]), sources):
        assert_close(out, _outputs(source, x[:16])[0], rel=1e-4)


@pytest.mark.parametrize("n,method", [(3, "rebasin"), (3, "pleas"), (5, "pleas")])
def test_n_permuted_copies_of_one_model_merged_at_1x_give_it_back(n, method):
    a = _resnets(1)[0]
    x = torch.randn(96, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    spec = pleas.build_spec(a, x[:2])
    copies = [a] + [pleas.build_model(a, pleas.permute_state_dict(a.state_dict(), spec, spec.random_permutations(s)))
                    .eval() for s in range(1, n)]
    merged = _merge(copies, x, method=method, norm_stats="sources").model
    assert_close(_outputs(merged, x[:8])[0], _outputs(a, x[:8])[0], rel=1e-3)


@pytest.mark.parametrize("budget", [1.0, 1.7, 2.6])
def test_budgets_from_1x_to_n_x_are_met_and_the_merge_is_deterministic(budget):
    sources = _resnets(3)
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    first = _merge(sources, x, method="pleas", budget=budget)
    again = _merge({"a": sources[0], "b": sources[1], "c": sources[2]}, x, method="pleas", budget=budget)
    assert first.report["size"]["relative_dense"] <= budget + 1e-9
    if budget > 1:
        assert first.report["size"]["relative_dense"] > 1.0
    for (k, t), u in zip(first.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(t, u), k  # the same inputs, seed and threads: the same weights, bit for bit
    assert all(torch.isfinite(t).all() for t in first.model.state_dict().values() if t.is_floating_point())


def test_every_method_with_an_n_model_form_runs_on_three_models():
    sources = _mlps(3)
    x = torch.randn(128, 20, generator=torch.Generator().manual_seed(3))
    for method in ("average", "regmean", "rebasin", "zipit", "pleas", "ensemble"):
        result = _merge(sources, x, method=method)
        assert torch.isfinite(_outputs(result.model, x[:4])[0]).all(), method
    per_model = pleas.per_model(x[:40], x[40:80], x[80:])
    assert torch.isfinite(_outputs(_merge(sources, per_model, method="regmean").model, x[:4])[0]).all()


def test_bad_n_model_input_is_refused_clearly(tmp_path):
    sources = _mlps(3)
    x = torch.randn(32, 20)
    with pytest.raises(pleas.MergeInputError, match="at least two models"):
        _merge([sources[0]], x)
    other = models.mlp(in_features=20, hidden=16, depth=2, num_classes=4)
    with pytest.raises(pleas.MergeInputError):
        _merge([*sources[:2], other], x)
    with pytest.raises(pleas.MergeInputError, match="per_model data has 2 parts for 3 models"):
        _merge(sources, pleas.per_model(x, x))
    with pytest.raises(pleas.MergeInputError, match="allocation"):
        _merge(sources, x, budget=1.5, allocation="downstream")
    with pytest.raises(pleas.MergeInputError, match="two models"):
        _merge(sources, x, residual="orthogonal")
    with pytest.raises(pleas.MergeInputError, match="merge\\(models, data\\)"):
        _merge(sources, x, x)


def test_the_cli_merges_three_checkpoints_as_the_api_does(tmp_path, capsys):
    import numpy as np
    from safetensors.torch import save_file
    from pleas.cli import main
    from pleas.io import load_merged

    sources = _mlps(3)
    paths = []
    for k, m in enumerate(sources):
        paths.append(str(tmp_path / f"m{k}.safetensors"))
        save_file({n: t.contiguous() for n, t in m.state_dict().items()}, paths[-1])
    x = torch.randn(96, 20, generator=torch.Generator().manual_seed(4))
    np.save(tmp_path / "x.npy", x.numpy())
    kwargs = '{"in_features": 20, "hidden": 32, "depth": 2, "num_classes": 4}'
    out = tmp_path / "merged.safetensors"
    assert main(["merge", *paths, "--arch", "mlp", "--kwargs", kwargs, "--data", str(tmp_path / "x.npy"),
                 "--budget", "2", "--out", str(out)]) == 0
    merged = load_merged(models.mlp(in_features=20, hidden=32, depth=2, num_classes=4), out)
    api = _merge(sources, x, budget=2.0).model
    assert_close(_outputs(merged, x[:8])[0], _outputs(api, x[:8])[0], rel=1e-5)
    assert main(["merge", paths[0], "--arch", "mlp", "--kwargs", kwargs, "--data", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "one.safetensors")]) == 2
    assert "at least two models" in capsys.readouterr().err and not (tmp_path / "one.safetensors").exists()


def test_per_model_data_by_name_follows_the_models_names():
    sources = _mlps(3)
    x = torch.randn(96, 20, generator=torch.Generator().manual_seed(5))
    named = {"a": sources[0], "b": sources[1], "c": sources[2]}
    by_name = _merge(named, pleas.per_model({"c": x[64:], "a": x[:32], "b": x[32:64]}), method="regmean")
    in_order = _merge(sources, pleas.per_model(x[:32], x[32:64], x[64:]), method="regmean")
    assert_close(_outputs(by_name.model, x[:4])[0], _outputs(in_order.model, x[:4])[0], rel=1e-6)
    with pytest.raises(pleas.MergeInputError, match="no data for \\['c'\\]"):
        _merge(named, pleas.per_model({"a": x[:32], "b": x[32:64]}))
    with pytest.raises(pleas.MergeInputError, match="no model named \\['d'\\]"):
        _merge(named, pleas.per_model({"a": x, "b": x, "c": x, "d": x}))
