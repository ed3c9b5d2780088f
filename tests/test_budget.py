"""Size accounting and merge-count allocation under a budget."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pleas
from pleas.budget import (allocate_by_loss, allocate_merge_counts, merge_loss_tables, prefix_merge_counts,
                          uniform_merge_counts)
from pleas.budget import SizeModel
from toy_models import VGGBN, randomise_norm_stats


@pytest.fixture(scope="module")
def resnet_pair():
    torchvision = pytest.importorskip("torchvision")
    out = []
    for s in (0, 1):
        torch.manual_seed(s)
        out.append(randomise_norm_stats(torchvision.models.resnet18(num_classes=10), s))
    return out


def test_size_function_matches_the_built_model(resnet_pair):
    a, b = resnet_pair
    x = torch.randn(8, 3, 32, 32)
    spec = pleas.build_spec(a, x[:2])
    sizes = SizeModel(spec, a.state_dict())
    gen = torch.Generator().manual_seed(0)
    for trial in range(3):
        counts = {g.name: int(torch.randint(0, g.width + 1, (1,), generator=gen)) for g in spec}
        result = pleas.merge(a, b, x, method="rebasin", merge_counts=counts, budget=3.0, norm_stats="sources", progress=False)
        widths = {g.name: 2 * g.width - counts[g.name] for g in spec}
        built = sum(t.numel() for t in result.model.state_dict().values() if t.dtype.is_floating_point)
        assert sizes.measure("params", widths) == built
        # FLOPs: multiply-adds of every conv and linear, counted by torch's own flop counter (2 per MAC)
        with FlopCounterMode(display=False) as counter:
            result.model(x[:1])
        assert 2 * sizes.measure("flops", widths) == counter.get_total_flops()


def test_effective_size_matches_the_built_models_zero_blocks(resnet_pair):
    """effective_params / effective_flops: the dense count minus the entries that are zero by
    construction (one model's own rows reading the other's own columns), read off the built model."""
    from pleas.budget import METRICS

    a, b = resnet_pair
    x = torch.randn(4, 3, 32, 32)
    spec = pleas.build_spec(a, x[:2])
    sizes = SizeModel(spec, a.state_dict())
    assert METRICS == ("params", "flops", "effective_params", "effective_flops")
    gen = torch.Generator().manual_seed(5)
    for trial in range(3):
        counts = {g.name: int(torch.randint(0, g.width + 1, (1,), generator=gen)) for g in spec}
        result = pleas.merge(a, b, x, method="rebasin", merge_counts=counts, budget=3.0, norm_stats="sources", progress=False)
        widths = {g.name: 2 * g.width - counts[g.name] for g in spec}
        state = result.model.state_dict()
        zeros = {k: int((t == 0).sum()) for k, t in state.items() if t.dim() >= 2}  # random weights: no other zeros
        assert sum(zeros.values()) > 0
        assert sizes.measure("effective_params", widths) == sizes.measure("params", widths) - sum(zeros.values())
        flops = sizes.measure("flops", widths) - sum(z * spec.positions.get(k, 0) for k, z in zeros.items())
        assert sizes.measure("effective_flops", widths) == flops
        base = sizes.measure("params", {g.name: g.width for g in spec})
        assert result.report["size"]["relative_effective"] == pytest.approx(
            sizes.measure("effective_params", widths) / base, rel=1e-12)
        assert result.report["size"]["relative_effective_flops"] == pytest.approx(
            flops / sizes.measure("flops", spec.widths), rel=1e-12)
    # both models side by side cost exactly two models, effectively (the shared head's bias: once)
    apart = {g.name: 2 * g.width for g in spec}
    for metric in ("effective_params", "effective_flops"):
        assert sizes.measure(metric, apart) / sizes.measure(metric, spec.widths) == pytest.approx(2.0, abs=1e-5)


def _job_sizes(a, x, metric):
    spec = pleas.build_spec(a, x[:2])
    sizes = SizeModel(spec, a.state_dict())
    base = sizes.measure(metric, {g.name: g.width for g in spec})
    top = sizes.measure(metric, {g.name: 2 * g.width for g in spec}) / base
    return spec, sizes, base, top


@pytest.mark.parametrize("metric", ["params", "flops", "effective_params", "effective_flops"])
def test_every_budget_is_met_within_one_pair(resnet_pair, metric):
    a, _ = resnet_pair
    x = torch.randn(2, 3, 32, 32)
    spec, sizes, base, top = _job_sizes(a, x, metric)
    gen = torch.Generator().manual_seed(1)
    similarity = {g.name: torch.rand(g.width, generator=gen) for g in spec}
    for budget in torch.linspace(1.0, top, 7).tolist():
        for allocate in ("greedy", "uniform", "prefix"):
            target = budget * base
            if allocate == "greedy":
                k = allocate_merge_counts(spec, similarity, sizes, metric, target)
            elif allocate == "prefix":
                k = prefix_merge_counts(spec, sizes, metric, target)
            else:
                k = uniform_merge_counts(spec, sizes, metric, target)
            widths = {g.name: 2 * g.width - k[g.name] for g in spec}
            size = sizes.measure(metric, widths)
            assert size <= target * (1 + 1e-12), (allocate, budget)
            if allocate != "uniform":
                # one pair less merged in the group that moved last would break the budget
                slack = max(sizes.change(metric, widths, g.name, widths[g.name] + 1) for g in spec if k[g.name] > 0) \
                    if any(k.values()) else 0
                assert size + slack > target or not any(k.values()), (allocate, budget)


def _vgg_sizes():
    torch.manual_seed(0)
    model = VGGBN(width=8)
    spec = pleas.build_spec(model, torch.randn(2, 3, 16, 16))
    return spec, SizeModel(spec, model.state_dict())


def test_greedy_merges_the_most_similar_groups_first():
    spec, sizes = _vgg_sizes()
    sim = {g.name: torch.full((g.width,), 0.1) for g in spec}
    sim["classifier.1"] = torch.full((32,), 0.99)  # nearly free to merge
    base = sizes.measure("params", {g.name: g.width for g in spec})
    top = sizes.measure("params", {g.name: 2 * g.width for g in spec})
    k = allocate_merge_counts(spec, sim, sizes, "params", 0.9 * top)
    assert k["classifier.1"] > 0 and sum(v for n, v in k.items() if n != "classifier.1") == 0
    assert base < 0.9 * top


def test_infeasible_targets_are_refused():
    spec, sizes = _vgg_sizes()
    base = sizes.measure("params", {g.name: g.width for g in spec})
    with pytest.raises(pleas.MergeInputError, match="budget unreachable"):
        allocate_merge_counts(spec, {g.name: torch.ones(g.width) for g in spec}, sizes, "params", 0.5 * base)


def test_merge_with_flops_budget_and_greedy_allocation():
    torch.manual_seed(0)
    a, b = randomise_norm_stats(VGGBN(), 0), randomise_norm_stats(VGGBN(), 1)
    x = torch.randn(32, 3, 16, 16)
    r = pleas.merge(a, b, x, method="rebasin", budget=1.4, budget_metric="flops", allocation="greedy", progress=False)
    assert r.report["size"]["relative_flops"] <= 1.4 + 1e-9
    m = pleas.merge(a, b, x, method="rebasin", budget=1.4, allocation="measured", heads="separate", progress=False)
    assert m.report["size"]["relative_dense"] <= 1.4 + 1e-9
    assert m.merge_counts != r.merge_counts
    assert r.report["budget_metric"] == "flops"
    with pytest.raises(pleas.MergeInputError, match="budget_metric='bytes'; allowed"):
        pleas.merge(a, b, x, method="rebasin", budget_metric="bytes", progress=False)
    with pytest.raises(pleas.MergeInputError, match="allocation='best'; allowed"):
        pleas.merge(a, b, x, method="rebasin", allocation="best", progress=False)


def _random_losses(spec, seed):
    """Convex and non-convex increasing loss tables over k = 0..d."""
    gen = torch.Generator().manual_seed(seed)
    losses = {}
    for i, g in enumerate(spec):
        steps = torch.rand(g.width, generator=gen, dtype=torch.float64) * (1 + i % 3)
        if i % 2:
            steps = torch.sort(steps).values  # convex
        losses[g.name] = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(steps, 0)])
    return losses


@pytest.mark.parametrize("metric", ["params", "flops", "effective_params", "effective_flops"])
def test_loss_allocation_is_deterministic_and_meets_the_budget_within_one_pair_per_group(resnet_pair, metric):
    a, _ = resnet_pair
    spec, sizes, base, top = _job_sizes(a, torch.randn(2, 3, 32, 32), metric)
    losses = _random_losses(spec, 0)
    for budget in torch.linspace(1.0, top, 6).tolist():
        target = budget * base
        k = allocate_by_loss(spec, losses, sizes, metric, target)
        assert k == allocate_by_loss(spec, {n: t.clone() for n, t in losses.items()}, sizes, metric, target)
        assert all(0 <= k[g.name] <= g.width for g in spec)
        widths = {g.name: 2 * g.width - k[g.name] for g in spec}
        size = sizes.measure(metric, widths)
        assert size <= target * (1 + 1e-12), budget
        for g in spec:  # unmerging one more pair of any group would break the budget
            if k[g.name] > 0:
                assert size + sizes.change(metric, widths, g.name, widths[g.name] + 1) > target, (budget, g.name)
    with pytest.raises(pleas.MergeInputError, match="budget unreachable"):
        allocate_by_loss(spec, losses, sizes, metric, 0.5 * base)


def test_loss_allocation_keeps_the_costly_group_apart():
    spec, sizes = _vgg_sizes()
    losses = {g.name: torch.linspace(0, g.width, g.width + 1, dtype=torch.float64) for g in spec}
    name = spec.groups[0].name
    losses[name] = losses[name] * 1e6
    base = sizes.measure("params", {g.name: g.width for g in spec})
    k = allocate_by_loss(spec, losses, sizes, "params", 1.3 * base)
    assert k[name] == 0 and any(k.values())


def test_merge_loss_tables_match_the_conditional_covariance():
    """L_g(k) = what the reading layers lose: tr(W Cov(z | merged units) W^T), summed over A's and B's
    readers, with z the stacked units [A | B] and the merged units those of partial_merge_map."""
    from pleas.rewrite import partial_merge_map

    spec, _ = _vgg_sizes()
    torch.manual_seed(0)
    sds = [VGGBN(width=8).state_dict(), VGGBN(width=8).state_dict()]
    gen = torch.Generator().manual_seed(3)
    covs, perms, sims = {}, {}, {}
    for g in spec:
        x = torch.randn(4 * g.width, 2 * g.width, generator=gen, dtype=torch.float64)
        covs[g.name] = x.T @ x / len(x) + 0.1 * torch.eye(2 * g.width, dtype=torch.float64)
        perms[g.name] = torch.randperm(g.width, generator=gen)
        sims[g.name] = torch.rand(g.width, generator=gen, dtype=torch.float64)
    tables = merge_loss_tables(spec, sds, covs, perms, sims, eps=0.0)
    for g in spec:
        d, c = g.width, covs[g.name]
        readers = [(m, [sd[m.param].double() for sd in sds]) for m in g.members if m.role == "in" and sds[0][m.param].dim() >= 2]
        assert tables[g.name][0] == 0
        for k in (1, d // 2, d):
            merge = partial_merge_map(perms[g.name], sims[g.name], k).merge  # (2d - k, 2d)
            mc = merge @ c
            r = c - mc.T @ torch.linalg.solve(mc @ merge.T, mc)  # Cov(z | merged layout)
            want = 0.0
            for m, (wa, wb) in readers:
                for w, block in ((wa, r[:d, :d]), (wb, r[d:, d:])):
                    w = w.movedim(m.axis, 0)[m.index].movedim(0, -1).reshape(-1, d)  # every (row, copy, tap)
                    want += float((w @ block * w).sum())
            assert tables[g.name][k].item() == pytest.approx(want, rel=1e-6, abs=1e-9), (g.name, k)


def test_merge_with_downstream_allocation():
    torch.manual_seed(0)
    a, b = randomise_norm_stats(VGGBN(), 0), randomise_norm_stats(VGGBN(), 1)
    x = torch.randn(64, 3, 16, 16)
    runs = [pleas.merge(a, b, x, method="pleas", budget=1.3, allocation="downstream", heads="separate", progress=False)
            for _ in range(2)]
    assert runs[0].merge_counts == runs[1].merge_counts
    assert runs[0].report["size"]["relative_dense"] <= 1.3 + 1e-9
    uniform = pleas.merge(a, b, x, method="pleas", budget=1.3, heads="separate", progress=False)
    assert runs[0].merge_counts != uniform.merge_counts
    # fewer samples than the classifier group's 2 x 32 units: a singular covariance, still allocated
    few = pleas.merge(a, b, x[:20], method="rebasin", budget=1.3, allocation="downstream", progress=False)
    assert few.report["size"]["relative_dense"] <= 1.3 + 1e-9
    with pytest.raises(pleas.MergeInputError, match="allocation='best'; allowed"):
        pleas.merge(a, b, x, method="pleas", allocation="best", progress=False)


def test_effective_budgets_default_to_downstream_allocation():
    torch.manual_seed(0)
    a, b = randomise_norm_stats(VGGBN(), 0), randomise_norm_stats(VGGBN(), 1)
    x = torch.randn(64, 3, 16, 16)
    eff = pleas.merge(a, b, x, method="pleas", budget=1.5, budget_metric="effective_params", heads="separate",
                      progress=False)
    assert eff.report["allocation"] == "downstream" and eff.report["budget_metric"] == "effective_params"
    assert 1.4 < eff.report["size"]["relative_effective"] <= 1.5 + 1e-9
    assert eff.report["size"]["relative_dense"] > eff.report["size"]["relative_effective"]
    dense = pleas.merge(a, b, x, method="pleas", budget=1.5, heads="separate", progress=False)
    assert dense.report["allocation"] == "uniform" and dense.report["size"]["relative_dense"] <= 1.5 + 1e-9
    asked = pleas.merge(a, b, x, method="rebasin", budget=1.5, budget_metric="effective_flops", allocation="prefix",
                        progress=False)
    assert asked.report["allocation"] == "prefix" and asked.report["size"]["relative_effective_flops"] <= 1.5 + 1e-9
    top = pleas.merge(a, b, x, method="rebasin", budget=2.0, budget_metric="effective_params", progress=False)
    assert all(k == 0 for k in top.merge_counts.values())  # 2x effective: both models whole
    with pytest.raises(pleas.MergeInputError, match=r"budget=2.1 is out of range; reachable for this model: \[1, 2"):
        pleas.merge(a, b, x, method="pleas", budget=2.1, budget_metric="effective_params", progress=False)
    with pytest.raises(pleas.MergeInputError, match="mask=False with budget_metric='effective_params'"):
        pleas.merge(a, b, x, method="pleas", budget=1.5, budget_metric="effective_params", mask=False, progress=False)
    with pytest.raises(pleas.MergeInputError, match="zipit with budget_metric='effective_flops'.*allowed: 'params'"):
        pleas.merge(a, b, x, method="zipit", budget=1.5, budget_metric="effective_flops", progress=False)


def test_merge_fraction_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from pleas.plots import plot_merge_fractions

    torch.manual_seed(0)
    a, b = randomise_norm_stats(VGGBN(), 0), randomise_norm_stats(VGGBN(), 1)
    r = pleas.merge(a, b, torch.randn(32, 3, 16, 16), method="rebasin", budget=1.3, allocation="greedy", progress=False)
    path = plot_merge_fractions(r, tmp_path / "fractions.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
