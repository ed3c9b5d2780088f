"""ZipIt!-style greedy unit merging (pleas.zipit_match.zip_units)."""
import time

import pytest
import torch

from pleas import GroupMap
from pleas.errors import MergeInputError
from pleas.matching import zip_units


def clusters(gm: GroupMap) -> list[tuple[int, ...]]:
    return [tuple(torch.nonzero(row).flatten().tolist()) for row in gm.unmerge.T]


def check_map(gm: GroupMap, total: int, target: int):
    assert gm.merge.shape == (target, total) and gm.unmerge.shape == (total, target)
    assert torch.allclose(gm.merge.sum(1), torch.ones(target, dtype=gm.merge.dtype))
    assert bool(((gm.unmerge == 0) | (gm.unmerge == 1)).all())
    assert torch.equal(gm.unmerge.sum(1), torch.ones(total, dtype=gm.unmerge.dtype))
    # merge averages exactly the cluster that unmerge reads
    assert torch.equal(gm.merge > 0, gm.unmerge.T > 0)
    firsts = [c[0] for c in clusters(gm)]
    assert firsts == sorted(firsts)  # ordered by smallest member


def planted_pair(d=32, samples=2000, noise=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xa = torch.randn(samples, d, generator=gen, dtype=torch.float64)
    perm = torch.randperm(d, generator=gen)
    xb = xa[:, perm] + noise * torch.randn(samples, d, generator=gen, dtype=torch.float64)  # B's j = A's perm[j]
    return torch.corrcoef(torch.cat([xa, xb], 1).T), perm


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_two_models_with_planted_permutation_pair_up(alpha):
    d = 32
    corr, perm = planted_pair(d)
    gm = zip_units(corr, n_models=2, target=d, alpha=alpha)
    check_map(gm, 2 * d, d)
    twin = torch.argsort(perm)  # A's unit i is B's unit twin[i]
    assert clusters(gm) == [(i, d + int(twin[i])) for i in range(d)]
    assert torch.allclose(gm.merge[gm.merge > 0], torch.tensor(0.5, dtype=torch.float64))


def test_target_equal_to_total_is_identity():
    corr, _ = planted_pair(8)
    gm = zip_units(corr, n_models=2, target=16)
    assert torch.equal(gm.merge, torch.eye(16, dtype=gm.merge.dtype))
    assert torch.equal(gm.unmerge, torch.eye(16, dtype=gm.unmerge.dtype))


def redundant_a_noise_b(d=16, samples=3000, seed=1):
    """A's units come in identical pairs (2k, 2k+1); B's units are independent noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(samples, d // 2, generator=gen, dtype=torch.float64)
    xa = base.repeat_interleave(2, dim=1) + 0.05 * torch.randn(samples, d, generator=gen, dtype=torch.float64)
    xb = torch.randn(samples, d, generator=gen, dtype=torch.float64)
    return torch.corrcoef(torch.cat([xa, xb], 1).T)


def test_same_model_merges_happen_when_allowed():
    d = 16
    gm = zip_units(redundant_a_noise_b(d), n_models=2, target=d, alpha=1.0, beta=1.0)
    check_map(gm, 2 * d, d)
    cs = clusters(gm)
    for k in range(d // 2):
        # A's duplicated features were zipped together (complete linkage may add a B unit afterwards)
        assert any({2 * k, 2 * k + 1} <= set(c) for c in cs), cs


@pytest.mark.parametrize("alpha, beta", [(0.0, 1.0), (1.0, 0.0)])
def test_same_model_merges_can_be_forbidden(alpha, beta):
    d = 16
    gm = zip_units(redundant_a_noise_b(d), n_models=2, target=d, alpha=alpha, beta=beta)
    check_map(gm, 2 * d, d)
    for c in clusters(gm):
        models = [u // d for u in c]
        assert len(models) == len(set(models)), c


def test_beta_caps_same_model_merges_per_model():
    d = 16
    # budget = floor(0.5 * (32 - 16) / 2) = 4 same-model merges per model
    gm = zip_units(redundant_a_noise_b(d), n_models=2, target=d, alpha=1.0, beta=0.5)
    check_map(gm, 2 * d, d)
    within_a = sum(1 for c in clusters(gm) if sum(u < d for u in c) > 1)
    assert within_a == 4


def test_three_models_and_full_reduction():
    corr = planted_pair(6)[0]
    corr3 = torch.block_diag(corr, torch.eye(6, dtype=torch.float64))  # 3 models of width 6
    gm = zip_units(corr3, n_models=3, target=1)
    check_map(gm, 18, 1)
    assert clusters(gm) == [tuple(range(18))]


def test_deterministic_and_ties_broken_by_lowest_index():
    corr = torch.zeros(8, 8)  # every pair tied
    gm = zip_units(corr, n_models=2, target=4, alpha=0.0)
    # greedy: (0, 4), then (1, 5), (2, 6), (3, 7) -- lowest cluster index, then lowest partner
    assert clusters(gm) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    corr, _ = planted_pair(16, noise=1.0)
    a = zip_units(corr, n_models=2, target=10)
    b = zip_units(corr, n_models=2, target=10)
    assert torch.equal(a.merge, b.merge) and torch.equal(a.unmerge, b.unmerge)


@pytest.mark.parametrize("target", [0, -1, 65, 2.5])
def test_bad_targets_raise(target):
    corr, _ = planted_pair(32)
    with pytest.raises(MergeInputError, match="target"):
        zip_units(corr, n_models=2, target=target)


def test_unreachable_target_and_bad_inputs_raise():
    corr, _ = planted_pair(8)
    with pytest.raises(MergeInputError, match="cannot reach target"):
        zip_units(corr, n_models=2, target=7, alpha=0.0)  # cross-model pairs only: at least d units
    with pytest.raises(MergeInputError, match="square"):
        zip_units(corr[:, :10], n_models=2, target=8)
    with pytest.raises(MergeInputError, match="n_models"):
        zip_units(corr[:15, :15], n_models=2, target=8)
    bad = corr.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(MergeInputError, match="non-finite"):
        zip_units(bad, n_models=2, target=8)
    with pytest.raises(MergeInputError, match="alpha"):
        zip_units(corr, n_models=2, target=8, alpha=-1.0)


def test_large_input_is_fast():
    corr, perm = planted_pair(512, samples=1500, noise=0.3, seed=3)
    start = time.perf_counter()
    gm = zip_units(corr, n_models=2, target=512, alpha=0.0)
    assert time.perf_counter() - start < 5.0
    twin = torch.argsort(perm)
    assert clusters(gm) == [(i, 512 + int(twin[i])) for i in range(512)]
