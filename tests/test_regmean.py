"""RegMean as published (Jin et al., ICLR 2023): W = (sum_i G~_i)^-1 sum_i G~_i W_i per linear map."""
import pytest
import torch
from torch import nn

import pleas


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 8)
        self.l2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def _pair():
    torch.manual_seed(0)
    a = TwoLayer()
    torch.manual_seed(1)
    return a, TwoLayer()


def _expected(grams, weights, alpha):
    tilde = [alpha * g + (1 - alpha) * torch.diag(g.diagonal()) for g in grams]
    return torch.linalg.solve(sum(tilde), sum(t @ w.T.double() for t, w in zip(tilde, weights))).T


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_regmean_is_the_published_closed_form(alpha):
    a, b = _pair()
    x = torch.randn(600, 5)
    merged = pleas.merge(a, b, x, method="regmean", alpha=alpha, progress=False).model
    # first layer: both models read the same inputs, so G_A = G_B and W is the plain average
    torch.testing.assert_close(merged.l1.weight, (a.l1.weight + b.l1.weight) / 2, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ha, hb = torch.relu(a.l1(x)).double(), torch.relu(b.l1(x)).double()
    want = _expected([ha.T @ ha, hb.T @ hb], [a.l2.weight.detach(), b.l2.weight.detach()], alpha)
    torch.testing.assert_close(merged.l2.weight.double(), want, atol=1e-5, rtol=1e-4)
    # biases are averaged (RegMean merges the weights of linear maps only)
    torch.testing.assert_close(merged.l2.bias, (a.l2.bias + b.l2.bias) / 2)


def test_regmean_reads_each_models_own_data():
    a, b = _pair()
    xa, xb = torch.randn(400, 5), torch.randn(400, 5) * 3 + 1
    merged = pleas.merge(a, b, pleas.per_model(xa, xb), method="regmean", alpha=1.0, progress=False).model
    ga, gb = (xa.T @ xa).double(), (xb.T @ xb).double()
    want = _expected([ga, gb], [a.l1.weight.detach(), b.l1.weight.detach()], 1.0)
    torch.testing.assert_close(merged.l1.weight.double(), want, atol=1e-5, rtol=1e-4)
    shared = pleas.merge(a, b, torch.cat([xa, xb]), method="regmean", alpha=1.0, progress=False).model
    assert not torch.allclose(shared.l1.weight, merged.l1.weight, atol=1e-3)


def test_per_model_data_must_match_the_models():
    a, b = _pair()
    with pytest.raises(pleas.MergeInputError, match="needs one calibration set per source model"):
        pleas.per_model(torch.randn(4, 5))
    with pytest.raises(pleas.MergeInputError, match="alpha=1.5; allowed: a number >= 0 and <= 1"):
        pleas.merge(a, b, torch.randn(4, 5), method="regmean", alpha=1.5)


def test_identity_matching_keeps_the_old_ablation():
    """PLeaS's refit without permutations (what pleas called regmean before) stays available."""
    a, b = _pair()
    result = pleas.merge(a, b, torch.randn(200, 5), method="pleas", matching="identity", progress=False)
    assert result.report["matching"] == "identity" and result.report["refit"]
