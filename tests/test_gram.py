"""Blocked Gram products and quadratic traces equal the plain ones."""
import pytest
import torch

from pleas.statistics.gram import gram, quadratic_trace


@pytest.mark.parametrize("cols", [3, 255, 256, 257, 700, 2305])
def test_gram_equals_the_plain_product(cols):
    torch.manual_seed(cols)
    x = torch.relu(torch.randn(300, cols, dtype=torch.float64))
    g = gram(x)
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, x.T @ x, rtol=1e-12, atol=1e-9)
    assert torch.equal(g, g.T)  # exactly symmetric by construction (gram mirrors the upper triangle), on any CPU


def test_gram_of_float32_rows_is_float64():
    x = torch.randn(100, 600)
    torch.testing.assert_close(gram(x), (x.double().T @ x.double()), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("cols", [5, 256, 1000])
def test_quadratic_trace_equals_the_plain_one(cols):
    torch.manual_seed(cols)
    x = torch.randn(2 * cols, cols, dtype=torch.float64)
    g = x.T @ x
    w = torch.randn(7, cols, dtype=torch.float64)
    torch.testing.assert_close(quadratic_trace(w, g), (w @ g * w).sum(), rtol=1e-12, atol=1e-9)
