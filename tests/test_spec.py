"""The spec's structure on known architectures, and its life as data (print, JSON)."""
import json

import pytest
import torch

import pleas
from toy_models import MLP, VGGBN, CatSkip, Mixed


def test_mlp_groups_are_the_hidden_layers():
    spec = pleas.build_spec(MLP(d_in=20, hidden=32, depth=3), torch.randn(2, 20))
    assert [g.width for g in spec] == [32, 32, 32]
    first = spec.groups[0]
    assert {(m.param, m.axis, m.role) for m in first.members} == {
        ("body.0.weight", 0, "out"), ("body.0.bias", 0, "out"), ("body.2.weight", 1, "in"),
    }
    # Inputs and the class axis of the head are never permuted.
    params = {(m.param, m.axis) for g in spec for m in g.members}
    assert ("body.0.weight", 1) not in params and ("head.weight", 0) not in params and ("head.bias", 0) not in params


def test_resnet18_residual_streams_are_single_groups():
    torchvision = pytest.importorskip("torchvision")
    spec = pleas.build_spec(torchvision.models.resnet18(), torch.randn(2, 3, 32, 32))
    # one group per stage's residual stream + one per block's inner conv
    assert len(spec) == 4 + 8
    stream = spec["layer4.0.conv2"]
    params = {m.param for m in stream.members}
    assert {"layer4.0.downsample.0.weight", "layer4.1.bn2.running_var", "fc.weight"} <= params
    assert stream.width == 512 and [s.node for s in stream.sites] == ["layer4_0_relu_1", "flatten"]
    assert [g.name for g in spec.outputs] == ["fc"] and spec.outputs[0].width == 1000


def test_flatten_and_cat_members_cover_slices():
    spec = pleas.build_spec(VGGBN(width=8), torch.randn(2, 3, 16, 16))
    m = next(m for m in spec["features.7"].members if m.param == "classifier.1.weight")
    assert (m.axis, m.role, m.regular) == (1, "in", {"offset": 0, "copies": 16, "major": "unit"})
    assert m.index.shape == (16, 16) and m.index[1, 0] == 16  # channel c owns entries 16c ... 16c + 15
    spec = pleas.build_spec(CatSkip(w=6), torch.randn(2, 3, 8, 8))
    offsets = {g.name: [m.regular["offset"] for m in g.members if m.param == "bn_cat.weight"] for g in spec}
    assert offsets["a"] == [3] and offsets["b"] == [9]  # the 3 input channels stay fixed


def test_groupnorm_keeps_units_inside_their_blocks():
    """GroupNorm(2, 8) normalises channels 0-3 and 4-7 together: each block is a group of its own, and
    the two keep their proportions (one tie)."""
    spec = pleas.build_spec(Mixed(w=8), torch.randn(2, 3, 8, 8))
    blocks = [spec["stem"], spec["stem#2"]]
    assert [g.width for g in blocks] == [4, 4] and blocks[0].tie == blocks[1].tie == "stem"
    gn = [next(m for m in g.members if m.param == "gn.weight") for g in blocks]
    assert gn[0].index.flatten().tolist() == [0, 1, 2, 3] and gn[1].index.flatten().tolist() == [4, 5, 6, 7]


def test_print_lists_one_line_per_group():
    spec = pleas.build_spec(VGGBN(), torch.randn(2, 3, 16, 16))
    lines = str(spec).splitlines()
    assert len(lines) == 1 + len(spec)
    assert "features.0: width=8" in lines[1] and "features.3.weight:1(in)" in lines[1]


def test_json_round_trip(tmp_path):
    spec = pleas.build_spec(CatSkip(), torch.randn(2, 3, 8, 8))
    path = tmp_path / "spec.json"
    spec.to_json(path)
    data = json.loads(path.read_text())
    assert data["format"] == "pleas.spec/2" and len(data["groups"]) == len(spec)
    back = pleas.PermutationSpec.from_json(path)
    assert back.to_dict() == spec.to_dict()
    assert pleas.PermutationSpec.from_json(spec.to_json()).to_dict() == spec.to_dict()


def test_from_json_rejects_other_documents():
    with pytest.raises(pleas.SpecError, match="not a pleas spec"):
        pleas.PermutationSpec.from_dict({"groups": []})


def test_state_dict_check_names_the_problem():
    model = MLP()
    spec = pleas.build_spec(model, torch.randn(2, 20))
    sd = model.state_dict()
    sd["body.2.weight"] = sd["body.2.weight"][:, :10]
    with pytest.raises(pleas.SpecError, match="body.2.weight"):
        spec.check_state_dict(sd)
