"""Tests of pleas.experiments: packaged datasets, model factories, training and the weights cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from pleas import cache, datasets as data, models as architectures
from pleas.experiments import train
from pleas.experiments import (
    Dataset,
    cached_model,
    create,
    evaluate,
    load,
    stable_hash,
    train_classifier,
)

EXPECTED = {  # name: (train size, test size, sample shape)
    "mnist": (4000, 1000, (1, 28, 28)),
    "digits": (1438, 359, (1, 8, 8)),
    "mnist1d": (4000, 1000, (1, 40)),
}


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    """Every test writes to its own cache directory, never to ~/.cache."""
    monkeypatch.setenv("PLEAS_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("split", ["train", "test"])
def test_load_shapes_dtypes_labels(name, split):
    n_train, n_test, sample_shape = EXPECTED[name]
    ds = load(name, split=split)
    assert isinstance(ds, Dataset)
    assert ds.name == name and ds.num_classes == 10
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert tuple(ds.x.shape) == ((n_train if split == "train" else n_test),) + sample_shape
    assert ds.y.shape == (len(ds),)
    assert ds.y.min() == 0 and ds.y.max() == 9
    assert torch.isfinite(ds.x).all()
    assert abs(ds.x.mean().item()) < 0.1 and 0.8 < ds.x.std().item() < 1.2  # normalised


@pytest.mark.parametrize("name", ["mnist", "digits"])
def test_split_is_deterministic_disjoint_and_stratified(name):
    y = data._mnist_raw()[1] if name == "mnist" else data._digits_raw()[1]
    tr, te = data._stratified_split(y, "train", 0), data._stratified_split(y, "test", 0)
    assert len(np.intersect1d(tr, te)) == 0
    assert len(tr) + len(te) == len(y)
    np.testing.assert_array_equal(tr, data._stratified_split(y, "train", 0))
    assert not np.array_equal(tr, data._stratified_split(y, "train", 1))
    for label in range(10):  # 80% of every class in train, up to rounding
        n = (y == label).sum()
        assert (y[tr] == label).sum() == round(0.8 * n)

    a, b = load(name, split="train"), load(name, split="train")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, load(name, split="train", seed=1).x)


def test_mnist_split_has_no_shared_images():
    tr, te = load("mnist", split="train"), load("mnist", split="test")
    rows = lambda x: {r.tobytes() for r in x.flatten(1).numpy()}  # noqa: E731
    assert not rows(tr.x) & rows(te.x)


def test_classes_subset_and_relabel_in_given_order():
    full = load("mnist", split="test")
    sub = load("mnist", split="test", classes=[7, 3])
    assert sub.num_classes == 2
    assert set(sub.y.tolist()) == {0, 1}
    assert torch.equal(sub.x[sub.y == 0], full.x[full.y == 7])
    assert torch.equal(sub.x[sub.y == 1], full.x[full.y == 3])


@pytest.mark.parametrize("name", ["mnist", "digits"])
@pytest.mark.parametrize("resolution", [16, 28])
def test_resolution_resizes_images(name, resolution):
    ds = load(name, split="test", resolution=resolution, classes=[5, 6, 7, 8, 9])
    assert tuple(ds.x.shape[1:]) == (1, resolution, resolution)
    assert ds.x.dtype == torch.float32 and ds.num_classes == 5
    assert abs(ds.x.mean().item()) < 0.2


def test_load_rejects_bad_arguments():
    with pytest.raises(ValueError, match="known datasets are 'mnist', 'digits', 'mnist1d'"):
        load("cifar10")
    with pytest.raises(ValueError, match="allowed are 'train' and 'test'"):
        load("digits", split="val")
    with pytest.raises(ValueError, match="only allowed for image datasets"):
        load("mnist1d", resolution=16)
    with pytest.raises(ValueError, match=r"allowed are ints 0\.\.9"):
        load("digits", classes=[3, 10])
    with pytest.raises(ValueError, match="must not repeat"):
        load("digits", classes=[3, 3])


def test_mnist1d_is_cached_on_disk_and_leaves_global_rngs_alone(tmp_path):
    data._mnist1d_arrays.cache_clear()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = load("mnist1d", split="test")
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    files = list((tmp_path / "cache" / "data").glob("mnist1d-*.npz"))
    assert len(files) == 1
    data._mnist1d_arrays.cache_clear()  # the second load reads the file
    second = load("mnist1d", split="test")
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)


# -------------------------------------------------------------------------------- architectures

MODELS = {  # name: (kwargs, input shape)
    "mlp": (dict(in_features=64, num_classes=5, hidden=32, depth=2), (3, 1, 8, 8)),
    "vgg": (dict(in_channels=1, num_classes=5, width=8, depth=(1, 2, 1)), (3, 1, 16, 16)),
    "resnet20": (dict(in_channels=1, num_classes=5, width=1), (3, 1, 16, 16)),
    "cnn1d": (dict(num_classes=5, width=8), (3, 1, 40)),
    "vit": (dict(in_channels=1, num_classes=5, img_size=16, embed_dim=16, depth=1, num_heads=2), (3, 1, 16, 16)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_architectures_forward_and_fx_trace(name):
    kwargs, shape = MODELS[name]
    model = create(name, seed=0, **kwargs).eval()
    x = torch.randn(shape)
    out = model(x)
    assert out.shape == (shape[0], 5)
    traced = torch.fx.symbolic_trace(model)
    assert torch.allclose(traced(x), out)


def test_create_seed_controls_init_and_keeps_global_rng():
    state = torch.random.get_rng_state()
    a = create("resnet20", 1, 10, seed=3).state_dict()
    b = create("resnet20", 1, 10, seed=3).state_dict()
    c = create("resnet20", 1, 10, seed=4).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_resnet20_structure():
    model = architectures.resnet20(3, 10, width=2)
    assert [m.conv1.out_channels for m in model.layer1] == [32] * 3
    assert model.layer3[0].conv1.out_channels == 128 and model.fc.in_features == 128
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer2[0].shortcut, nn.Sequential)  # 1x1 conv + BN
    assert sum(isinstance(m, architectures.BasicBlock) for m in model.modules()) == 9


def test_create_rejects_unknown_names_and_bad_sizes():
    with pytest.raises(ValueError, match="known architectures are 'mlp', 'vgg', 'resnet20', 'cnn1d'"):
        create("resnet50")
    with pytest.raises(ValueError, match="width must be a positive int"):
        create("resnet20", 1, 10, width=0)
    with pytest.raises(ValueError, match="depth must be an int or 3 ints"):
        create("vgg", 1, 10, depth=(1, 2))


# ------------------------------------------------------------------------------------- training


def _mnist04(split: str) -> Dataset:
    return load("mnist", split=split, classes=[0, 1, 2, 3, 4], resolution=16)


def _mlp(seed: int) -> nn.Module:
    return create("mlp", 256, 5, hidden=64, depth=2, seed=seed)


def test_tiny_training_run_beats_chance():
    model = train_classifier(_mlp(0), _mnist04("train"), seed=0, epochs=2, progress=False)
    assert not model.training
    assert evaluate(model, _mnist04("test")) > 0.85  # chance is 0.2


def test_same_seed_same_weights_different_seed_different_weights():
    ds = _mnist04("train").subset(range(600))
    runs = [train_classifier(_mlp(0), ds, seed=s, epochs=1, progress=False).state_dict() for s in (0, 0, 1)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_training_with_augmentation_and_sgd_runs():
    ds = load("digits", split="train")
    model = create("vgg", 1, 10, width=4, seed=0)
    train_classifier(model, ds, seed=0, epochs=1, optimizer="sgd", lr=0.05, augment=True, progress=False)
    assert 0.0 <= evaluate(model, ds) <= 1.0
    with pytest.raises(ValueError, match="allowed are 'adam', 'sgd'"):
        train_classifier(model, ds, seed=0, epochs=1, optimizer="lbfgs")


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        out = self.body(x)
        return out, -out


def test_evaluate_output_index_and_mode_restored():
    ds = load("digits", split="test")
    model = _TwoHeads().train()
    acc0 = evaluate(model, ds, output_index=0)
    assert model.training  # restored
    with torch.no_grad():
        pred = model(ds.x)[1].argmax(1)
    assert evaluate(model, ds, output_index=1) == pytest.approx((pred == ds.y).float().mean().item())
    assert 0.0 <= acc0 <= 1.0
    with pytest.raises(ValueError, match="pass output_index"):
        evaluate(model, ds)


def test_cached_model_trains_once_then_loads_identical_weights(tmp_path):
    ds = _mnist04("train").subset(range(600))
    key = {"arch": "mlp", "kwargs": {"hidden": 64, "depth": 2}, "dataset": "mnist", "classes": [0, 1, 2, 3, 4],
           "resolution": 16, "seed": 0, "epochs": 1}
    calls = []

    def fit(model):
        calls.append(1)
        return train_classifier(model, ds, seed=0, epochs=1, progress=False)

    first = cached_model(key, lambda: _mlp(0), fit)
    files = list((tmp_path / "cache" / "models").glob("*.safetensors"))
    assert len(calls) == 1 and len(files) == 1
    assert files[0].name == f"{stable_hash(key)}.safetensors"
    assert not list((tmp_path / "cache" / "models").glob("*.tmp"))  # no temp file left behind

    second = cached_model(dict(reversed(list(key.items()))), lambda: _mlp(99), fit)  # key order is irrelevant
    assert len(calls) == 1
    sd1, sd2 = first.state_dict(), second.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not second.training

    cached_model({**key, "seed": 1}, lambda: _mlp(1), fit)  # a different key trains again
    assert len(calls) == 2


def test_cached_model_stores_batchnorm_buffers(tmp_path):
    ds = load("digits", split="train").subset(range(256))
    build = lambda: create("vgg", 1, 10, width=4, seed=0)  # noqa: E731
    first = cached_model({"arch": "vgg"}, build, lambda m: train_classifier(m, ds, seed=0, epochs=1, progress=False))
    second = cached_model({"arch": "vgg"}, build, lambda m: pytest.fail("must not retrain"))
    assert torch.equal(first[1].running_mean, second[1].running_mean)
    assert torch.equal(first[1].num_batches_tracked, second[1].num_batches_tracked)


def test_stable_hash_is_order_independent_and_rejects_non_json():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": (1, 2), "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    with pytest.raises(TypeError, match="allowed are dict, list"):
        stable_hash({"a": object()})
    with pytest.raises(TypeError, match="key must be a dict"):
        cached_model([1], lambda: _mlp(0), lambda m: m)


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PLEAS_CACHE", str(tmp_path / "elsewhere"))
    assert cache.cache_dir("models") == tmp_path / "elsewhere" / "models"
    assert (tmp_path / "elsewhere" / "models").is_dir()
    assert train.model_path({"x": 1}).parent == tmp_path / "elsewhere" / "models"
