"""Stream targets (``targets="stream"``): the maps that write into a residual stream are found in the graph,
and fitting them to the sources' stream keeps the exact cases exact."""
import warnings

import pytest
import torch

import pleas
from conftest import assert_close
from pleas.capture import capture
from pleas.groups import analyze
from pleas.refit.stream import partners

transformers = pytest.importorskip("transformers")


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                                                n_head=4)).eval()


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)).eval()


def _ids():
    return torch.randint(0, 64, (48, 16), generator=torch.Generator().manual_seed(0))


def _writers(model, x):
    graph = analyze(capture(model, x))
    by_weight = {layer.weight: layer.name for layer in graph.layers}
    return sorted(by_weight[w] for w in partners(graph.program, graph.layers))


def test_the_maps_that_write_into_the_residual_stream_are_found():
    torch.manual_seed(0)
    assert _writers(_gpt2(), _ids()[:2]) == [f"transformer.h.{i}.{part}.c_proj" for i in (0, 1) for part in ("attn", "mlp")]
    assert _writers(_llama(), _ids()[:2]) == [f"model.layers.{i}.{part}" for i in (0, 1)
                                              for part in ("mlp.down_proj", "self_attn.o_proj")]
    torchvision = pytest.importorskip("torchvision")
    # a ResNet's convs reach their adds through BatchNorm, which changes values: no stream targets there
    assert _writers(torchvision.models.resnet18(num_classes=10).eval(), torch.randn(2, 3, 32, 32)) == []


@pytest.mark.parametrize("factory", [_gpt2, _llama])
def test_a_model_merged_with_a_permuted_copy_of_itself_comes_back_with_stream_targets(factory):
    torch.manual_seed(0)
    a = factory()
    x = _ids()
    spec = pleas.build_spec(a, x[:2])
    b = pleas.build_model(a, pleas.permute_state_dict(a.state_dict(), spec, spec.random_permutations(5))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = pleas.merge(a, b, x, method="pleas", targets="stream", progress=False).model
    with torch.no_grad():
        assert_close(merged(x[:4]).logits, a(x[:4]).logits, rel=1e-3)


def _toy_cnn():
    from torch import nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


@pytest.mark.parametrize("factory,budget", [(_gpt2, 1.0), (_llama, 1.5), (_toy_cnn, 1.5)])
def test_streamed_targets_give_the_same_merge_and_hold_few_layers_at_once(factory, budget, monkeypatch):
    from pleas.refit import propagated

    torch.manual_seed(0)
    a, b = factory(), factory()
    x = _ids() if factory is not _toy_cnn else torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    held = []
    take = propagated.StreamedTargets.take

    def counting(self, layer, maps, sizes):
        out = take(self, layer, maps, sizes)
        held.append(sum(1 for rows in self.sampler.rows.values() if rows))  # layers whose samples wait
        return out

    monkeypatch.setattr(propagated.StreamedTargets, "take", counting)
    merged, refitted = {}, None
    for streaming in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = pleas.merge(a, b, x, method="pleas", budget=budget, batch_size=16, streaming=streaming,
                                 progress=False)
        merged[streaming], refitted = result.model.state_dict(), len(result.report["refit"])
    for key, value in merged[False].items():
        if value.is_floating_point():  # the same draws and the same products: equal up to round-off
            assert_close(merged[True][key], value, rel=1e-6)
    # every layer was taken from the walk, and while one was refitted at most the next few waited
    assert len(held) == refitted >= 3 and max(held) <= 2
