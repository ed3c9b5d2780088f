"""Linear assignment and Git Re-Basin weight matching (pleas.matching)."""
import itertools

import pytest
import torch
from torch import nn

import pleas
from pleas.errors import MergeInputError
from pleas.matching import (
    Matching,
    activation_matching,
    linear_assignment,
    unit_cosine_similarity,
    weight_matching,
)
from pleas.groups import Group
from toy_models import MLP, VGGBN, Mixed, randomise_norm_stats


def objective(sim, perm):
    return float(sim[torch.arange(len(perm)), perm].sum())


# ----------------------------------------------------------------------------------------------------
# linear_assignment
# ----------------------------------------------------------------------------------------------------


def test_linear_assignment_recovers_planted_permutation_from_noisy_similarity():
    gen = torch.Generator().manual_seed(0)
    d = 60
    planted = torch.randperm(d, generator=gen)
    sim = 0.25 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    sim[torch.arange(d), planted] += 1.0
    assert not torch.equal(sim.argmax(1), planted)  # noisy enough that a row-wise argmax fails
    perm = linear_assignment(sim)
    assert perm.dtype == torch.long and perm.shape == (d,)
    assert torch.equal(perm, planted)


def test_linear_assignment_is_optimal_by_brute_force():
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    best = max(objective(sim, torch.tensor(p)) for p in itertools.permutations(range(6)))
    assert objective(sim, linear_assignment(sim)) == pytest.approx(best, abs=1e-9)


def _random_block_permutation(d, block, gen):
    """A uniformly random permutation that maps blocks of ``block`` units onto blocks."""
    order = torch.randperm(d // block, generator=gen)
    return torch.cat([order[b] * block + torch.randperm(block, generator=gen) for b in range(d // block)])


def _is_block_respecting(perm, block):
    tiles = perm.view(-1, block) // block
    return bool((tiles == tiles[:, :1]).all()) and len(set(tiles[:, 0].tolist())) == len(tiles)


def test_block_assignment_maps_blocks_onto_blocks_and_beats_random_block_permutations():
    gen = torch.Generator().manual_seed(2)
    d, block = 32, 4
    sim = torch.randn(d, d, generator=gen, dtype=torch.float64)
    perm = linear_assignment(sim, block=block)
    assert sorted(perm.tolist()) == list(range(d))
    assert _is_block_respecting(perm, block)
    best_random = max(objective(sim, _random_block_permutation(d, block, gen)) for _ in range(300))
    assert objective(sim, perm) >= best_random - 1e-12
    # The unconstrained optimum is at least as good, and here strictly better (the constraint binds).
    free = linear_assignment(sim)
    assert not _is_block_respecting(free, block)
    assert objective(sim, free) > objective(sim, perm)


def test_block_assignment_is_optimal_among_block_permutations_by_brute_force():
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    best = max(
        objective(sim, torch.tensor(p))
        for p in itertools.permutations(range(6))
        if _is_block_respecting(torch.tensor(p), 2)
    )
    perm = linear_assignment(sim, block=2)
    assert _is_block_respecting(perm, 2)
    assert objective(sim, perm) == pytest.approx(best, abs=1e-12)


def test_block_assignment_recovers_planted_block_permutation():
    gen = torch.Generator().manual_seed(4)
    d = 24
    planted = _random_block_permutation(d, 8, gen)
    sim = 0.3 * torch.randn(d, d, generator=gen)
    sim[torch.arange(d), planted] += 1.0
    assert torch.equal(linear_assignment(sim, block=8), planted)


@pytest.mark.parametrize(
    "sim, block, match",
    [
        (torch.zeros(3, 4), 1, "square"),
        (torch.zeros(4), 1, "square"),
        (torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), 1, "non-finite"),
        (torch.tensor([[0.0, float("inf")], [1.0, 0.0]]), 1, "non-finite"),
        (torch.zeros(6, 6), 4, "does not divide"),
        (torch.zeros(6, 6), 0, "positive"),
    ],
)
def test_linear_assignment_rejects_bad_input(sim, block, match):
    with pytest.raises(MergeInputError, match=match):
        linear_assignment(sim, block=block)


# ----------------------------------------------------------------------------------------------------
# weight_matching
# ----------------------------------------------------------------------------------------------------


class ResLinear(nn.Module):
    """Residual d->d Linears: their weights have both axes in the one residual group."""

    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(10, d)
        self.l1 = nn.Linear(d, d)
        self.l2 = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.l1(h)
        h = h + torch.relu(self.l2(h))
        return self.head(h)


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(weights=None)


CASES = {
    "mlp_20_64_64_64_5": (lambda: MLP(d_in=20, hidden=64, d_out=5, depth=3), (2, 20)),
    "vgg_bn_flatten_repeat": (lambda: VGGBN(), (2, 3, 16, 16)),
    "mixed_groupnorm_block": (lambda: Mixed(), (2, 3, 8, 8)),
    "residual_square_linear": (lambda: ResLinear(), (2, 10)),
    "resnet18": (_resnet18, (2, 3, 32, 32)),
}


@pytest.fixture(scope="module", params=list(CASES))
def planted(request):
    factory, shape = CASES[request.param]
    torch.manual_seed(0)
    model = randomise_norm_stats(factory()).eval()
    spec = pleas.build_spec(model, torch.randn(*shape))
    sd_a = model.state_dict()
    planted_perms = spec.random_permutations(seed=7)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in planted_perms.values())
    sd_b = pleas.permute_state_dict(sd_a, spec, planted_perms)
    return request.param, spec, sd_a, sd_b, planted_perms, weight_matching(spec, sd_a, sd_b, seed=0)


def test_weight_matching_recovers_planted_permutations_exactly(planted):
    name, spec, sd_a, sd_b, planted_perms, found = planted
    assert isinstance(found, Matching) and found.converged
    assert set(found.perms) == {g.name for g in spec}
    for g in spec:
        # B's unit j is A's unit P[j], so A's unit i is B's unit argsort(P)[i].
        assert found.perms[g.name].dtype == torch.long
        assert torch.equal(found.perms[g.name], torch.argsort(planted_perms[g.name])), (name, g.name)
    if name == "mixed_groupnorm_block":
        assert spec.ties()  # GroupNorm's blocks: one group each, keeping their proportions
    if name == "vgg_bn_flatten_repeat":
        assert any(m.copies > 1 for g in spec for m in g.members)
    if name == "residual_square_linear":
        assert any(len({m.axis for m in g.members if m.param == "l1.weight"}) == 2 for g in spec)


def test_aligning_b_with_found_perms_gives_back_a(planted):
    _, spec, sd_a, sd_b, _, found = planted
    aligned = pleas.permute_state_dict(sd_b, spec, found.perms)
    assert list(aligned) == list(sd_a)
    for key in sd_a:
        assert torch.equal(aligned[key], sd_a[key]), key


def test_planted_match_similarities_are_one(planted):
    _, spec, _, _, _, found = planted
    for g in spec:
        s = found.similarity[g.name]
        assert s.dtype == torch.float64 and s.shape == (g.width,)
        assert torch.allclose(s, torch.ones_like(s), atol=1e-9), g.name


def _objective(spec, sd_a, sd_b, perms):
    aligned = pleas.permute_state_dict(sd_b, spec, perms)
    return sum(float((sd_a[p].double() * aligned[p].double()).sum()) for p in spec.params)


def test_weight_matching_of_independent_models_improves_alignment_and_is_deterministic():
    torch.manual_seed(1)
    model_a, model_b = MLP(hidden=48), MLP(hidden=48)
    spec = pleas.build_spec(model_a, torch.randn(2, 20))
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    first = weight_matching(spec, sd_a, sd_b, seed=3)
    again = weight_matching(spec, sd_a, sd_b, seed=3)
    for g in spec:
        p = first.perms[g.name]
        assert sorted(p.tolist()) == list(range(g.width))
        assert torch.equal(p, again.perms[g.name])
        assert torch.equal(first.similarity[g.name], again.similarity[g.name])
        s = first.similarity[g.name]
        assert bool((s <= 1 + 1e-12).all() and (s >= -1 - 1e-12).all()) and float(s.max()) < 0.99
    identity = {g.name: torch.arange(g.width) for g in spec}
    assert _objective(spec, sd_a, sd_b, first.perms) > _objective(spec, sd_a, sd_b, identity) + 1e-3
    # The reported similarity is the cosine of the aligned pair, as unit_cosine_similarity computes it.
    recomputed = unit_cosine_similarity(spec, sd_a, sd_b, first.perms)
    assert all(torch.allclose(recomputed[g], first.similarity[g]) for g in recomputed)
    aligned, expected = first.align(spec, sd_b), pleas.permute_state_dict(sd_b, spec, first.perms)
    assert all(torch.equal(aligned[k], expected[k]) for k in sd_b)


def test_weight_matching_tolerates_noise_on_planted_permutation():
    torch.manual_seed(2)
    model = MLP(hidden=64)
    spec = pleas.build_spec(model, torch.randn(2, 20))
    sd_a = model.state_dict()
    perms = spec.random_permutations(seed=5)
    gen = torch.Generator().manual_seed(0)
    sd_b = {
        k: v + 0.3 * v.std() * torch.randn(v.shape, generator=gen)
        for k, v in pleas.permute_state_dict(sd_a, spec, perms).items()
    }
    found = weight_matching(spec, sd_a, sd_b)
    for g in spec:
        assert torch.equal(found.perms[g.name], torch.argsort(perms[g.name]))
        assert 0.8 < float(found.similarity[g.name].min()) < 1.0


def test_weight_matching_rejects_mismatched_state_dicts():
    torch.manual_seed(0)
    model = MLP()
    spec = pleas.build_spec(model, torch.randn(2, 20))
    sd_a = model.state_dict()
    sd_b = dict(sd_a)
    sd_b["head.weight"] = torch.zeros(5, 33)
    with pytest.raises(pleas.PleasError, match="head.weight"):
        weight_matching(spec, sd_a, sd_b)
    with pytest.raises(MergeInputError, match="max_iter"):
        weight_matching(spec, sd_a, sd_a, max_iter=0)


# ----------------------------------------------------------------------------------------------------
# activation_matching
# ----------------------------------------------------------------------------------------------------


def test_activation_matching_recovers_planted_permutation_from_correlations():
    gen = torch.Generator().manual_seed(0)
    d, samples = 24, 2000
    spec = pleas.PermutationSpec([Group("g", d), Group("h", 8)])
    planted = {g.name: g.random_permutation(gen) for g in spec}
    corrs = {}
    for g in spec:
        xa = torch.randn(samples, g.width, generator=gen, dtype=torch.float64)
        xb = xa[:, planted[g.name]] + 0.2 * torch.randn(samples, g.width, generator=gen, dtype=torch.float64)
        corrs[g.name] = torch.corrcoef(torch.cat([xa, xb], 1).T)
    found = activation_matching(spec, corrs)
    for g in spec:
        assert torch.equal(found.perms[g.name], torch.argsort(planted[g.name]))
        s = found.similarity[g.name]
        assert s.dtype == torch.float64 and bool((s > 0.9).all() and (s < 1).all())
    with pytest.raises(MergeInputError, match="'h'"):
        activation_matching(spec, {"g": corrs["g"]})
    with pytest.raises(MergeInputError, match="shape"):
        activation_matching(spec, {"g": corrs["g"], "h": corrs["g"]})


def test_cross_moments_give_the_cross_block_of_the_full_correlation():
    """CrossMoments (what activation matching gathers for two models) hold exactly the A-by-B block
    of the full moments' correlation, and refuse to give any other block."""
    from pleas.statistics import CrossMoments, Moments

    torch.manual_seed(0)
    full, cross = Moments.zeros(12), CrossMoments.zeros(6)
    for _ in range(3):
        z = torch.randn(50, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64) + 3.0
        full.update(z)
        cross.update(z[:, :6], z[:, 6:])
    block = full.correlation(rows=slice(0, 6), cols=slice(6, 12))
    torch.testing.assert_close(cross.correlation(rows=slice(0, 6), cols=slice(6, 12)), block)
    assert cross.count == full.count == 150
    with pytest.raises(ValueError, match="only the block"):
        cross.correlation()


def test_activation_matching_is_the_same_from_cross_and_full_moments():
    a, b = (randomise_norm_stats(VGGBN(), s) for s in (0, 1))
    x = torch.randn(64, 3, 16, 16)
    spec = pleas.build_spec(a, x[:2])
    from pleas.statistics import collect_moments

    full = activation_matching(spec, collect_moments([a, b], spec, [x], progress=False))
    cross = activation_matching(spec, collect_moments([a, b], spec, [x], progress=False, cross=True))
    for g in spec:
        assert torch.equal(full.perms[g.name], cross.perms[g.name])
        torch.testing.assert_close(full.similarity[g.name], cross.similarity[g.name], atol=1e-5, rtol=1e-5)
