"""pleas.io: checkpoints in, calibration data in, merged models out and back."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import pleas
from pleas.io import load_calibration, load_checkpoint, load_merged, load_model, read_merged_metadata, save_merged
from conftest import assert_close
from toy_models import VGGBN, randomise_norm_stats


def _vgg(seed: int) -> VGGBN:
    torch.manual_seed(seed)
    return randomise_norm_stats(VGGBN(), seed=seed)


@pytest.fixture(scope="module")
def models():
    return _vgg(0), _vgg(1)


@pytest.fixture(scope="module")
def calib():
    return torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _state(model):
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _contiguous_copy(model):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.contiguous()
    return model


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, tuple) else (out,)


# ----------------------------------------------------------------------------- merged round trip


@pytest.mark.parametrize(
    "method, budget, heads",
    [("rebasin", 1.0, "shared"), ("zipit", 1.0, "separate"), ("rebasin", 1.5, "separate")],
)
def test_save_then_load_merged_gives_the_same_outputs(tmp_path, models, calib, method, budget, heads):
    result = pleas.merge(*models, calib, method=method, budget=budget, heads=heads, progress=False)
    path, report = tmp_path / "merged.safetensors", tmp_path / "merged.json"
    save_merged(result, path, report)

    loaded = load_merged(VGGBN(), path)
    assert not loaded.training
    assert isinstance(loaded, pleas.SeparateHeads) == (heads == "separate")
    saved, merged = loaded.state_dict(), result.model.state_dict()
    assert saved.keys() == merged.keys()
    assert all(torch.equal(saved[k], v) for k, v in merged.items())  # bit for bit
    x = torch.randn(5, 3, 16, 16)
    for got, want, want_contiguous in zip(
        _outputs(loaded, x), _outputs(result.model, x), _outputs(_contiguous_copy(result.model), x), strict=True
    ):
        assert torch.equal(got, want_contiguous)
        assert_close(got, want, rel=1e-5)  # merged weights may be strided views: same values, other round-off

    meta = read_merged_metadata(path)
    assert meta["method"] == method and meta["budget"] == budget and meta["heads"] == heads
    assert meta["widths"] == result.widths
    if heads == "separate":
        assert meta["head_sizes"] == [10, 10]
    assert json.loads(report.read_text())["size"] == result.report["size"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.json", "merged.safetensors"]  # no temp files


def test_save_merged_writes_contiguous_cpu_tensors_and_keeps_caller_state(tmp_path, models, calib):
    result = pleas.merge(*models, calib, method="rebasin", budget=1.0, progress=False)
    before = {k: v.clone() for k, v in result.model.state_dict().items()}
    save_merged(result, tmp_path / "m.safetensors")
    state = load_checkpoint(tmp_path / "m.safetensors")
    assert state.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(state[k], v) and torch.equal(result.model.state_dict()[k], v)


def test_failed_save_leaves_no_file_and_keeps_existing_ones(tmp_path, models, calib):
    result = pleas.merge(*models, calib, method="rebasin", budget=1.0, progress=False)
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(pleas.MergeInputError, match="does not exist"):
        save_merged(result, path, tmp_path / "missing_dir" / "r.json")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    with pytest.raises(pleas.MergeInputError, match="same file"):
        save_merged(result, path, path)


def test_load_merged_rejects_plain_checkpoints_and_wrong_templates(tmp_path, models, calib):
    plain = tmp_path / "plain.safetensors"
    save_file(_state(models[0]), str(plain))
    with pytest.raises(pleas.MergeInputError, match="not written by pleas.io.save_merged"):
        load_merged(VGGBN(), plain)
    result = pleas.merge(*models, calib, method="rebasin", budget=1.0, progress=False)
    save_merged(result, tmp_path / "m.safetensors")
    with pytest.raises(pleas.MergeInputError, match="does not fit the template"):
        load_merged(torch.nn.Linear(3, 4), tmp_path / "m.safetensors")


# ----------------------------------------------------------------------------------- checkpoints


def test_checkpoint_formats(tmp_path, models):
    state = _state(models[0])
    save_file(state, str(tmp_path / "a.safetensors"))
    torch.save(state, tmp_path / "raw.pt")
    torch.save({"state_dict": state, "epoch": 3, "lr": 0.1}, tmp_path / "wrapped.pt")
    torch.save({"model": state, "optimizer": {"step": 1}}, tmp_path / "model.pth")
    save_file(state, str(tmp_path / "misnamed.pt"))  # recognised by content, not by name
    for name in ("a.safetensors", "raw.pt", "wrapped.pt", "model.pth", "misnamed.pt"):
        loaded = load_checkpoint(tmp_path / name)
        assert loaded.keys() == state.keys(), name
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), name


def test_load_model_loads_strictly(tmp_path, models):
    torch.save({"state_dict": _state(models[1])}, tmp_path / "b.pt")
    model = load_model("toy_models:VGGBN", {}, tmp_path / "b.pt")
    assert not model.training
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(model(x), models[1](x))


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.safetensors", None, "does not exist"),
        ("garbage.safetensors", b"\x00" * 5 + b"not a checkpoint" * 20, "could not be read"),
        ("garbage.pt", b"PK\x03\x04 truncated zip", "could not be read"),
        ("header.safetensors", (1000).to_bytes(8, "little") + b"{bad", "not a valid safetensors"),
        ("empty.pt", b"", "could not be read"),
    ],
)
def test_bad_checkpoint_files(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(pleas.MergeInputError, match=match) as info:
        load_checkpoint(path)
    assert name in str(info.value)
    if content is not None:
        assert "safetensors" in str(info.value)  # names the accepted formats


def test_checkpoints_that_are_not_state_dicts(tmp_path, models):
    torch.save(models[0], tmp_path / "module.pt")  # a pickled nn.Module: refused by weights_only=True
    with pytest.raises(pleas.MergeInputError, match="weights_only=True"):
        load_checkpoint(tmp_path / "module.pt")
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(pleas.MergeInputError, match="keys \\['epoch', 'weights'\\], not a state dict"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(pleas.MergeInputError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_wrong_architecture_is_a_clear_error(tmp_path, models):
    save_file(_state(models[0]), str(tmp_path / "a.safetensors"))
    with pytest.raises(pleas.MergeInputError, match=r"does not fit architecture 'toy_models:VGGBN'.*other shapes"):
        load_model("toy_models:VGGBN", {"width": 4}, tmp_path / "a.safetensors")
    with pytest.raises(pleas.MergeInputError, match="missing"):
        load_model("toy_models:MLP", {}, tmp_path / "a.safetensors")
    with pytest.raises(pleas.MergeInputError, match="cannot build architecture"):
        load_model("toy_models:VGGBN", {"no_such_arg": 1}, tmp_path / "a.safetensors")


# ----------------------------------------------------------------------------------- calibration


def test_calibration_from_packaged_datasets():
    x = load_calibration("digits")
    assert x.dtype == torch.float32 and tuple(x.shape) == (1438, 1, 8, 8)
    sub = load_calibration("digits:16", 50, seed=3)
    assert tuple(sub.shape) == (50, 1, 16, 16)
    assert torch.equal(sub, load_calibration("digits:16", 50, seed=3))  # deterministic
    assert not torch.equal(sub, load_calibration("digits:16", 50, seed=4))
    assert load_calibration("digits", 10_000).shape[0] == 1438  # at most what there is


def test_calibration_from_files(tmp_path):
    array = np.random.default_rng(0).normal(size=(20, 3, 4, 4)).astype(np.float64)
    np.save(tmp_path / "x.npy", array)
    x = load_calibration(str(tmp_path / "x.npy"))
    assert x.dtype == torch.float32 and torch.allclose(x, torch.from_numpy(array).float())
    t = torch.randn(12, 5)
    torch.save(t, tmp_path / "t.pt")
    torch.save((t, torch.zeros(12, dtype=torch.long)), tmp_path / "pair.pt")
    assert torch.equal(load_calibration(tmp_path / "t.pt"), t)
    assert torch.equal(load_calibration(tmp_path / "pair.pt"), t)
    assert load_calibration(tmp_path / "t.pt", 4).shape == (4, 5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: "no_such_dataset", "unknown calibration data 'no_such_dataset'.*mnist"),
        (lambda d: "digits:abc", "not a positive integer"),
        (lambda d: "mnist1d:16", "resolution is only allowed for image datasets"),
        (lambda d: str(d / "missing.npy"), "does not exist"),
        (lambda d: (np.save(d / "empty.npy", np.zeros((0, 3))), str(d / "empty.npy"))[1], "is empty"),
        (lambda d: (np.save(d / "flat.npy", np.zeros(5)), str(d / "flat.npy"))[1], "at least 2 dimensions"),
        (lambda d: (np.save(d / "nan.npy", np.full((2, 2), np.nan)), str(d / "nan.npy"))[1], "NaN"),
        (lambda d: ((d / "bad.npy").write_bytes(b"junk"), str(d / "bad.npy"))[1], "not a valid .npy"),
        (lambda d: ((d / "bad.pt").write_bytes(b"junk"), str(d / "bad.pt"))[1], "weights_only=True"),
        (lambda d: ((d / "x.csv").write_text("1,2"), str(d / "x.csv"))[1], "unsupported type"),
    ],
)
def test_calibration_errors(tmp_path, make, match):
    with pytest.raises(pleas.MergeInputError, match=match):
        load_calibration(make(tmp_path))


def test_calibration_sample_count_must_be_positive():
    with pytest.raises(pleas.MergeInputError, match="samples=0"):
        load_calibration("digits", 0)
