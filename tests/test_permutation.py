"""Permuting every group leaves a model's function unchanged; widening by duplication too."""
import copy

import pytest
import torch
import torchvision

import pleas
from conftest import assert_close


def test_random_permutation_of_every_group_keeps_outputs(model_and_input):
    model, x = model_and_input
    spec = pleas.build_spec(model, x)
    perms = spec.random_permutations(seed=1)
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms.values() if len(p) > 8)
    permuted = pleas.build_model(model, pleas.permute_state_dict(model.state_dict(), spec, perms)).eval()
    with torch.no_grad():
        assert_close(model(x), permuted(x))


def test_permutation_really_moves_weights(model_and_input):
    """Guard against a vacuous pass: permuting only one group (a wrong spec) must change outputs."""
    model, x = model_and_input
    spec = pleas.build_spec(model, x)
    sd = model.state_dict()
    order = {k: i for i, k in enumerate(sd)}
    # The reader nearest the output (random-init layer scales can mute earlier blocks).
    group, member = max(
        ((g, m) for g in spec for m in g.members if m.role == "in"), key=lambda gm: order[gm[1].param]
    )
    perm = group.random_permutation(torch.Generator().manual_seed(3))
    broken = dict(sd)
    t = sd[member.param].movedim(member.axis, 0)
    idx = torch.arange(t.shape[0])
    idx[member.index.reshape(-1)] = member.index[perm].reshape(-1)
    broken[member.param] = t[idx].movedim(0, member.axis)
    wrong = pleas.build_model(model, broken).eval()
    with torch.no_grad():
        assert float((model(x) - wrong(x)).abs().max()) > 1e-3 * float(model(x).abs().max())


def test_doubling_every_group_keeps_outputs(model_and_input):
    from conftest import NOT_WIDENABLE

    model, x = model_and_input
    if model.pleas_test_name in NOT_WIDENABLE:
        pytest.skip("the architecture's groups change at double width (test_architecture covers it)")
    spec = pleas.build_spec(model, x)
    maps = {g.name: pleas.duplication_map(g.width, 2) for g in spec}
    wide = pleas.build_model(model, pleas.transform_state_dicts(spec, [model.state_dict()], maps)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in wide.parameters()) > 1.5 * n_params
    wide_spec = pleas.build_spec(wide, x)
    assert [g.width for g in wide_spec] == [2 * g.width for g in spec]
    with torch.no_grad():
        assert_close(model(x), wide(x))


def test_caller_model_is_not_modified(model_and_input):
    model, x = model_and_input
    model.train()
    before = copy.deepcopy(model.state_dict())
    spec = pleas.build_spec(model, x)
    pleas.build_model(model, pleas.permute_state_dict(model.state_dict(), spec, spec.random_permutations(0)))
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", ["permutation", "partial", "ensemble", "zipit-like"])
def test_merging_in_float32_is_bit_identical_to_float64(kind, monkeypatch):
    """Maps that pick one unit per new unit and model, scaled by 1 or 1/2, are applied in the tensors'
    own dtype; that must give exactly the float64 result rounded, and other maps stay in float64."""
    import pleas.rewrite.transform as transform
    from pleas.rewrite import ensemble_map, partial_merge_map

    torch.manual_seed(0)
    a, b = torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(num_classes=10)
    spec = pleas.build_spec(a, torch.randn(2, 3, 32, 32))
    maps = {}
    for g in spec:
        perm, sim = torch.randperm(g.width), torch.rand(g.width)
        if kind == "ensemble":
            maps[g.name] = ensemble_map(g.width, 2)
        elif kind == "zipit-like":  # three units averaged into one: 1/3 is not exact, float64 is used
            m = partial_merge_map(perm, sim, g.width).merge.clone()
            m[0, :3] = 1 / 3
            maps[g.name] = pleas.GroupMap(m, m.T.clone())
        else:
            maps[g.name] = partial_merge_map(perm, sim, g.width if kind == "permutation" else g.width // 2)
    fast = pleas.transform_state_dicts(spec, [a.state_dict(), b.state_dict()], maps)
    assert all(transform._exact_in_any_dtype(m, 2) for m in maps.values()) == (kind != "zipit-like")
    monkeypatch.setattr(transform, "_exact_in_any_dtype", lambda gm, n: False)
    slow = pleas.transform_state_dicts(spec, [a.state_dict(), b.state_dict()], maps)
    for k in slow:
        assert torch.equal(fast[k], slow[k]), k
