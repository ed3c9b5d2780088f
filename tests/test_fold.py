"""Folding BatchNorm into the layer that feeds it keeps the function and the state-dict keys."""
import torch
import torchvision
from torch import nn

import pleas
from pleas.norms import fold_batchnorm, norm_pairs


def _folded(model, x):
    """A folded copy of ``model`` and the names of the norms folded (the model is not modified)."""
    import copy

    folded = copy.deepcopy(model).eval()
    graph = pleas.analyze(pleas.capture(folded, x))
    return folded, fold_batchnorm(graph, folded.state_dict(keep_vars=True))


def _randomise_norms(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def test_folding_keeps_the_function_of_resnet18():
    model = _randomise_norms(torchvision.models.resnet18(num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    folded, names = _folded(model, x)
    assert len(names) == 20  # every BatchNorm of resnet18 follows a conv
    assert list(folded.state_dict()) == list(before)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    for name in names:
        norm = dict(folded.named_modules())[name]
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the caller's model is untouched


def test_only_norms_fed_by_a_layer_alone_are_paired():
    class Shared(nn.Module):  # conv output read by the norm and by a skip: cannot be folded
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y + self.bn2(self.conv2(y))

    graph = pleas.analyze(pleas.capture(Shared().eval(), torch.randn(2, 3, 8, 8)))
    assert [norm.name for _, norm in norm_pairs(graph)] == ["bn2"]
