"""Transformers (issue #17): Hugging Face GPT-2, Llama (grouped-query attention, rotary embeddings) and BERT,
timm's and torchvision's ViTs are merged into their own class at any budget, round-trip through
save_pretrained, keep their function under permutations of every group, and their ensembles are exact."""
import copy
import warnings

import pytest
import torch

import pleas
from conftest import assert_close

transformers = pytest.importorskip("transformers")


def _gpt2(vocab: int = 64):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32,
                                                                n_layer=2, n_head=4))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32))


def _bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32))


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, num_heads=4, depth=2,
                             num_classes=5, pretrained=False)


def _torchvision_vit():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5)
    torch.nn.init.normal_(model.heads.head.weight, std=0.1)  # zero-initialised: its outputs would all be 0
    return model


LANGUAGE = {"gpt2": _gpt2, "llama": _llama, "bert": _bert}
VISION = {"timm_vit": _timm_vit, "torchvision_vit": _torchvision_vit}


def _pair(factory):
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(factory().eval())
    return out


def _data(name):
    gen = torch.Generator().manual_seed(0)
    if name in LANGUAGE:
        return torch.randint(0, 64, (48, 16), generator=gen)
    return torch.randn(48, 3, 16, 16, generator=gen)


def _out(model, x):
    with torch.no_grad():
        y = model(x)
    return y.logits if hasattr(y, "logits") else y


def _merge(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pleas.merge(*args, progress=False, **kwargs)


@pytest.mark.parametrize("name,budget", [*((n, b) for n in LANGUAGE for b in (1.0, 1.7)), *((n, 1.5) for n in VISION)])
def test_merged_model_is_the_inputs_class_and_meets_the_budget(name, budget, tmp_path):
    factory = {**LANGUAGE, **VISION}[name]
    a, b = _pair(factory)
    x = _data(name)
    result = _merge(a, b, x, method="pleas", budget=budget, heads="shared")
    assert type(result.model) is type(a)
    assert result.report["size"]["relative_dense"] <= budget + 1e-9
    out = _out(result.model, x[:4])
    assert out.shape == _out(a, x[:4]).shape and torch.isfinite(out).all()
    if name in LANGUAGE:
        assert hasattr(result.model(x[:2]), "logits")  # the input's output type
        result.model.save_pretrained(tmp_path)
        loaded = type(a).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(_out(loaded, x[:4]), out)


@pytest.mark.parametrize("name", [*LANGUAGE, *VISION])
def test_permuting_every_group_keeps_the_function(name):
    factory = {**LANGUAGE, **VISION}[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = _data(name)[:4]
    spec = pleas.build_spec(model, x)
    assert any(g.width < 8 for g in spec)  # attention heads are groups (a few units each)
    permuted = pleas.build_model(model, pleas.permute_state_dict(model.state_dict(), spec, spec.random_permutations(2)))
    assert_close(_out(model, x), _out(permuted.eval(), x))


@pytest.mark.parametrize("name", [*LANGUAGE, *VISION])
def test_a_model_merged_with_a_permuted_copy_of_itself_comes_back(name):
    factory = {**LANGUAGE, **VISION}[name]
    torch.manual_seed(0)
    a = factory().eval()
    x = _data(name)
    spec = pleas.build_spec(a, x[:2])
    b = pleas.build_model(a, pleas.permute_state_dict(a.state_dict(), spec, spec.random_permutations(5))).eval()
    merged = _merge(a, b, x, method="rebasin", matching="weight", norm_stats="sources").model
    assert_close(_out(merged, x[:4]), _out(a, x[:4]), rel=1e-3)


@pytest.mark.parametrize("name,budget", [("gpt2", 2.0), ("bert", 2.0), ("llama", 2.0)])
def test_a_model_beside_a_permuted_copy_of_itself_comes_back(name, budget):
    """Side by side (effective 2x) a norm over the widened stream sees the same statistics when both halves
    are one model (not so for a partial merge, whose kept units would count twice in the norm), so the
    merged model is that model's function, including
    where the output layer is tied to the input embedding (GPT-2, BERT), whose kept units must count
    half (rewrite/tied.py), not twice."""
    factory = LANGUAGE[name]
    torch.manual_seed(0)
    a = factory().eval()
    x = _data(name)
    spec = pleas.build_spec(a, x[:2])
    b = pleas.build_model(a, pleas.permute_state_dict(a.state_dict(), spec, spec.random_permutations(5))).eval()
    merged = _merge(a, b, x, method="rebasin", matching="weight", norm_stats="sources", budget=budget,
                    budget_metric="effective_params").model
    assert merged.config.hidden_size > a.config.hidden_size
    assert_close(_out(merged, x[:4]), _out(a, x[:4]), rel=1e-3)


@pytest.mark.parametrize("name", [*LANGUAGE, *VISION])
def test_the_ensemble_reproduces_both_sources(name):
    a, b = _pair({**LANGUAGE, **VISION}[name])
    x = _data(name)
    result = _merge(a, b, x, method="ensemble")
    assert_close(_out(result.model, x[:4]), (_out(a, x[:4]) + _out(b, x[:4])) / 2)
    if result.report["ensemble"] == "modules":  # a norm over the widened stream: says so
        assert "deviates" in result.report["ensemble_reason"]


def test_token_ids_and_masks_are_accepted_as_a_tokenizer_returns_them():
    a, b = _pair(_bert)
    ids = _data("bert")
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = _merge(a, b, data, method="pleas", budget=1.2)
    with torch.no_grad():
        assert torch.isfinite(result.model(**{k: v[:2] for k, v in data.items()}).logits).all()


def test_a_model_type_pleas_cannot_rebuild_is_named():
    config = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=32)
    pair = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        pair.append(transformers.GPTNeoXForCausalLM(config).eval())
    with pytest.raises(pleas.PleasError, match=r"gpt_neox"):
        _merge(*pair, _data("gpt2"), method="rebasin", budget=1.5)


def test_the_cli_merges_hugging_face_directories_into_one(tmp_path, capsys):
    from pleas.cli import main

    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        _gpt2(vocab=256).save_pretrained(tmp_path / name)  # byte-level: the text's bytes are its ids
    text = tmp_path / "text.txt"
    text.write_text("def merge(a, b):\n    return (a + b) / 2\n" * 40)
    out = tmp_path / "merged"
    args = ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--data", str(text), "--seq-len", "16", "--budget",
            "1.5", "--out", str(out), "--report", str(tmp_path / "report.json")]
    assert main(args) == 0
    assert "token ids" in capsys.readouterr().out
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged) is transformers.GPT2LMHeadModel and merged.config.n_embd > 32
    assert (out / "pleas_report.json").is_file() and (tmp_path / "report.json").is_file()
    assert main(args) == 2  # never over an existing directory
    assert "exists" in capsys.readouterr().err


# ------------------------------------------------------------------------ orthogonal residual matching

def _random_rotation(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _rotated_copy(model, x, seed=3):
    """``model`` with its RMSNorm weights folded into their readers and its residual stream rotated at
    random: the same function in another basis, and no permutation away from it."""
    from pleas.groups import analyze
    from pleas.capture import capture
    from pleas.rewrite.rotate import fold_norm_weights, norm_readers, rotate_group, stream_group

    graph = analyze(capture(model, x[:2]))
    group = stream_group(graph.spec, model)
    state = dict(model.state_dict())
    readers = norm_readers(graph, group, state)
    fold_norm_weights(readers, graph.spec, state)
    state = rotate_group(graph.spec, group, _random_rotation(group.width, seed), state, list(readers))
    return pleas.build_model(model, state).eval()


def test_folding_rmsnorm_weights_and_rotating_the_stream_keeps_the_function():
    torch.manual_seed(0)
    a = _llama().eval()
    for norm in [m for m in a.modules() if type(m).__name__ == "LlamaRMSNorm"]:
        torch.nn.init.normal_(norm.weight, 1.0, 0.3)  # not all ones: the fold has something to do
    x = _data("llama")
    assert_close(_out(_rotated_copy(a, x), x[:4]), _out(a, x[:4]), rel=1e-4)


def test_a_llama_merged_with_a_rotated_copy_of_itself_comes_back_only_with_orthogonal_matching():
    torch.manual_seed(0)
    a = _llama().eval()
    x = _data("llama")
    b = _rotated_copy(a, x)
    before = copy.deepcopy(a.state_dict())
    result = _merge(a, b, x, method="rebasin", residual="orthogonal", norm_stats="sources")
    assert all(torch.equal(before[k], t) for k, t in a.state_dict().items())  # the fold and rotation copy first
    assert type(result.model) is type(a) and result.report["aligned"]
    assert_close(_out(result.model, x[:4]), _out(a, x[:4]), rel=1e-3)
    permuted = _merge(a, b, x, method="rebasin", norm_stats="sources").model  # a rotation is no permutation
    err = (_out(permuted, x[:4]) - _out(a, x[:4])).abs().max() / _out(a, x[:4]).abs().max()
    assert err > 0.05
    assert all(torch.isfinite(p).all() for p in a.parameters())


def test_orthogonal_matching_refuses_a_layernorm_stream():
    a, b = _pair(_gpt2)
    with pytest.raises(pleas.MergeInputError, match="LayerNorm"):
        _merge(a, b, _data("gpt2"), residual="orthogonal")
    with pytest.raises(pleas.MergeInputError, match="residual="):
        _merge(a, b, _data("gpt2"), residual="rotation")
