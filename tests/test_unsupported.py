"""Ops without a handler are errors that name them; a user handler makes them work."""
import pytest
import torch
from torch import nn

import pleas
from conftest import assert_close


class ChannelRoll(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.roll(self.a(x), 1, dims=1))


class ChannelScale(nn.Module):
    """Scales each channel, written with einsum, which pleas has no handler for."""

    def __init__(self, channels):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return torch.einsum("nchw,c->nchw", x, self.scale)


class WithScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = ChannelScale(8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.scale(self.a(x))))


def test_unknown_function_is_named():
    with pytest.raises(pleas.UnsupportedOpError, match=r"torch.*roll.*register"):
        pleas.build_spec(ChannelRoll(), torch.randn(2, 3, 8, 8))


def test_unknown_op_inside_custom_module_names_the_module():
    with pytest.raises(pleas.UnsupportedOpError, match=r"einsum.*inside 'scale'"):
        pleas.build_spec(WithScale(), torch.randn(2, 3, 8, 8))


def test_unhandled_torch_module_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PixelShuffle(2))
    with pytest.raises(pleas.UnsupportedOpError, match=r"'1'.*PixelShuffle"):
        pleas.build_spec(model, torch.randn(2, 3, 8, 8))


def test_grouped_conv_units_move_only_inside_their_convolution_group():
    """A grouped convolution is supported: each convolution group's units are a group of their own, tied
    to the others (they keep their proportions), and permuting them keeps the function."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                          nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    spec = pleas.build_spec(model, x)
    assert sorted(g.width for g in spec) == [4, 4, 4, 4]
    assert len(spec.ties()) == 2 and all(len(v) == 2 for v in spec.ties().values())
    permuted = pleas.build_model(model, pleas.permute_state_dict(model.state_dict(), spec, spec.random_permutations(1)))
    with torch.no_grad():
        assert_close(model(x), permuted(x))


def test_untraceable_model_gives_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else x

    with pytest.raises(pleas.UnsupportedOpError, match="could not trace DataDependent"):
        pleas.build_spec(DataDependent(), torch.randn(2, 4))


@pytest.fixture
def scale_handler():
    def trace(ctx):
        x = ctx.units(ctx.arg(0))
        ctx.attach(ctx.param("scale"), 0, "out", x)
        return x

    pleas.register_module_handler(ChannelScale, trace)
    yield
    from pleas.ops.registry import MODULE_HANDLERS

    MODULE_HANDLERS.pop(ChannelScale)


def test_user_handler_makes_it_work(scale_handler):
    torch.manual_seed(0)
    model = WithScale().eval()
    x = torch.randn(2, 3, 8, 8)
    spec = pleas.build_spec(model, x)
    assert ("scale.scale", 0) in {(m.param, m.axis) for m in spec["a"].members}
    permuted = pleas.build_model(model, pleas.permute_state_dict(model.state_dict(), spec, spec.random_permutations(2)))
    with torch.no_grad():
        assert_close(model(x), permuted(x))
