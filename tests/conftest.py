import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded: models are built from configs

from toy_models import MLP, VGGBN, CatSkip, Mixed, Seq1d, randomise_norm_stats


def _torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.get_model(name, weights=None)


def _timm(name):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False)


# name -> (factory, example input shape)
MODELS = {
    "mlp": (lambda: MLP(), (4, 20)),
    "vgg_bn": (lambda: VGGBN(), (4, 3, 16, 16)),
    "cat_skip": (lambda: CatSkip(), (4, 3, 8, 8)),
    "mixed": (lambda: Mixed(), (4, 3, 8, 8)),
    "seq1d": (lambda: Seq1d(), (4, 1, 24)),
    "resnet18": (lambda: _torchvision("resnet18"), (2, 3, 32, 32)),
    "resnet50": (lambda: _torchvision("resnet50"), (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: _torchvision("mobilenet_v2"), (2, 3, 32, 32)),
    "timm_convnext_atto": (lambda: _timm("convnext_atto"), (2, 3, 32, 32)),
    "timm_efficientnet_b0": (lambda: _timm("efficientnet_b0"), (2, 3, 32, 32)),
    "regnet_x_400mf": (lambda: _torchvision("regnet_x_400mf"), (2, 3, 32, 32)),  # grouped convolutions
    "shufflenet_v2_x0_5": (lambda: _torchvision("shufflenet_v2_x0_5"), (2, 3, 32, 32)),  # channel shuffle
}
#: Architectures whose groups change when every unit is doubled: a channel shuffle deep in a network
#: splits the doubled channels more finely than the original ones (their ensemble is the models as modules).
NOT_WIDENABLE = {"shufflenet_v2_x0_5"}


@pytest.fixture(params=list(MODELS))
def model_and_input(request):
    factory, shape = MODELS[request.param]
    torch.manual_seed(0)
    model = randomise_norm_stats(factory())
    model.pleas_test_name = request.param
    return model, torch.randn(*shape)


def assert_close(a, b, rel=1e-4):
    """Outputs equal up to float32 round-off, relative to the output's scale."""
    scale = max(float(a.abs().max()), 1e-6)
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= rel * scale, float((a - b).abs().max()) / scale
