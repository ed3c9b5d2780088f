"""Tests of the transformer benchmarks' sources: the byte-level text data (pleas.datasets), the byte LMs
and their metrics (pleas.experiments.lm), and the ViT recipe (pleas.experiments.sources)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from pleas import datasets as data
from pleas import models as architectures
from pleas.experiments import lm, sources, train

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    """Every test writes to its own cache directory, never to ~/.cache."""
    monkeypatch.setenv("PLEAS_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("domain", data.BYTE_DOMAINS)
def test_byte_corpus_splits_every_document_in_two(domain):
    documents = data._code_documents() if domain == "code" else data._prose_documents()
    train_text, heldout = data.byte_corpus(domain, "train"), data.byte_corpus(domain, "heldout")
    assert train_text.dtype == torch.uint8 and heldout.dtype == torch.uint8 and train_text.dim() == 1
    total = sum(len(text) for _, text in documents)
    # Neither text holds the separator, so the separators are exactly the joins between documents' parts.
    assert not any(data.BYTE_SEPARATOR in text for _, text in documents)
    parts = [data._split_document(text) for _, text in documents]
    assert all(tr + ho == text for (tr, ho), (_, text) in zip(parts, documents))
    assert all(not ho or tr.endswith(b"\n") for tr, ho in parts)  # cut at a line start
    assert all(len(tr) >= data.BYTE_TRAIN_FRACTION * len(tr + ho) for tr, ho in parts)
    assert bytes(train_text.tolist()) == data.BYTE_SEPARATOR.join(tr for tr, _ in parts if tr)
    assert bytes(heldout.tolist()) == data.BYTE_SEPARATOR.join(ho for _, ho in parts if ho)
    assert 0.05 < len(heldout) / total < 0.12
    # Deterministic: the same bytes on a second read (the cache is per process, so reread the files).
    data._byte_splits.cache_clear()
    assert torch.equal(data.byte_corpus(domain, "train"), train_text)
    assert data.corpus_digest(domain, "train") != data.corpus_digest(domain, "heldout")


def test_code_is_the_stdlib_without_tests_packages_or_the_prose():
    paths = [path for path, _ in data._code_documents()]
    assert paths == sorted(paths) and "os.py" in paths and "json/decoder.py" in paths
    assert all(path.endswith(".py") for path in paths)
    excluded = data._CODE_EXCLUDED_DIRS
    assert not any(set(path.split("/")[:-1]) & excluded for path in paths)
    assert not any(path.startswith("config-") or "/_sysconfigdata_" in "/" + path for path in paths)


def test_prose_is_the_pydoc_topics():
    from pydoc_data.topics import topics

    documents = data._prose_documents()
    assert [name for name, _ in documents] == sorted(topics)
    assert documents[0][1] == topics[documents[0][0]].encode("utf-8")


def test_byte_corpus_rejects_unknown_domains_and_splits():
    with pytest.raises(ValueError, match="unknown byte domain 'poetry'"):
        data.byte_corpus("poetry")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        data.byte_corpus("code", "test")


def test_byte_windows_are_seeded_and_half_from_each_domain():
    windows = data.byte_windows(7, 24, seed=3)
    assert windows.shape == (7, 24) and windows.dtype == torch.int64
    assert torch.equal(windows, data.byte_windows(7, 24, seed=3))
    assert not torch.equal(windows, data.byte_windows(7, 24, seed=4))
    code, prose = (bytes(data.byte_corpus(d).tolist()) for d in data.BYTE_DOMAINS)
    rows = [bytes(row.tolist()) for row in windows]
    assert all(row in code for row in rows[:3])  # n // 2 = 3 rows of code, then 4 of prose
    assert all(row in prose for row in rows[3:])
    heldout = bytes(data.byte_corpus("prose", "heldout").tolist())
    assert all(bytes(r.tolist()) in heldout for r in data.byte_windows(3, 24, split="heldout", domains=("prose",)))
    with pytest.raises(ValueError, match="n must be a positive int"):
        data.byte_windows(0)


def test_spaced_windows_cover_the_text_evenly():
    text = torch.arange(100, dtype=torch.uint8)
    windows = data.spaced_windows(text, 4, 10)
    assert windows[:, 0].tolist() == [0, 30, 60, 90] and windows[-1, -1] == 99
    assert torch.equal(windows[1], torch.arange(30, 40))
    assert data.spaced_windows(text, 1, 100).shape == (1, 100)
    with pytest.raises(ValueError, match="do not fit"):
        data.spaced_windows(text, 2, 101)
    with pytest.raises(ValueError, match="count must be a positive int"):
        data.random_windows(text, 0, 5, torch.Generator())


# ------------------------------------------------------------------------------------------ LMs


@pytest.mark.parametrize("family", lm.FAMILIES)
def test_lm_families_are_the_configured_hugging_face_classes(family):
    model = lm.build_lm(family, seed=0)
    assert type(model).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]
    assert model.config.vocab_size == 256 and not model.training
    ids = torch.randint(0, 256, (2, 9))
    assert lm.lm_logits(model, ids).shape == (2, 9, 256)
    if family == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight  # tied head
    else:
        assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
        assert model.model.layers[0].self_attn.k_proj.out_features == 64  # 2 KV heads of 32
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), lm.build_lm(family, seed=0).parameters()))
    with pytest.raises(ValueError, match="unknown LM family 'bert'"):
        lm.build_lm("bert")


@pytest.mark.parametrize("family", lm.FAMILIES)
def test_tiny_lm_training_is_deterministic_for_a_seed(family):
    text = data.byte_corpus("prose")

    def run(seed):
        model = lm.build_lm(family, seed=0)
        losses = lm.train_lm(model, text, seed=seed, steps=3, batch_size=2, length=16, warmup=1, progress=False)
        return model, losses

    (m1, l1), (m2, l2), (_, l3) = run(0), run(0), run(1)
    assert l1 == l2 and len(l1) == 3  # same machine and thread count: bitwise equal
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert l3 != l1  # another seed draws other windows
    assert not m1.training


def test_lm_training_lowers_the_loss():
    model = lm.build_lm("llama", seed=0)
    losses = lm.train_lm(model, data.byte_corpus("code"), seed=0, steps=20, batch_size=4, length=32, lr=1e-2,
                         warmup=2, progress=False)
    assert losses[0] > math.log(256) - 0.3  # starts near uniform
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0


def test_train_lm_rejects_bad_arguments():
    model = lm.build_lm("gpt2", seed=0)
    with pytest.raises(ValueError, match="steps must be an int"):
        lm.train_lm(model, data.byte_corpus("prose"), seed=0, steps=-1)
    with pytest.raises(ValueError, match="length must be at least 2"):
        lm.train_lm(model, data.byte_corpus("prose"), seed=0, steps=1, length=1)


def test_cached_lm_trains_once_and_stores_its_config():
    recipe = lm.LMRecipe("llama", "prose", seed=5, steps=2, batch_size=2, length=16, warmup=1)
    first = lm.train_lm_source(recipe)
    assert first.train_seconds > 0 and len(first.losses) == 2
    path = train.model_path(recipe.cache_key())
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["config"]) == json.loads(json.dumps(lm.LM_CONFIGS["llama"]))
    assert meta["family"] == "llama"
    second = lm.train_lm_source(recipe)
    assert second.train_seconds == 0 and second.losses == []
    assert all(torch.equal(p, q) for p, q in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    assert recipe.cache_key()["data"] == data.corpus_digest("prose")
    assert lm.LMRecipe("llama", "code", seed=0).steps == lm.LM_STEPS["llama"]  # the family's default
    with pytest.raises(ValueError, match="unknown byte domain"):
        lm.LMRecipe("llama", "poetry", seed=0)


# -------------------------------------------------------------------------------------- metrics


class FixedLogits(nn.Module):
    """Logits that do not depend on the input: ``logits`` (vocab,) at every position, as a tensor or
    (``hf=True``) as an output object with ``.logits``."""

    def __init__(self, logits, hf=False):
        super().__init__()
        self.register_buffer("logits", logits)
        self.hf = hf

    def forward(self, ids):
        out = self.logits.expand(*ids.shape, -1)
        if self.hf:
            from transformers.modeling_outputs import CausalLMOutput

            return CausalLMOutput(logits=out)
        return out


class PeekAhead(nn.Module):
    """A model that reads the byte it should predict (offset 1) or the current byte (offset 0) and puts
    a large logit on it: bits per byte near 0 only when targets are aligned as next-byte predictions."""

    def __init__(self, offset):
        super().__init__()
        self.offset = offset

    def forward(self, ids):
        target = torch.roll(ids, -self.offset, dims=1)
        return 50.0 * nn.functional.one_hot(target, 256).float()


@pytest.mark.parametrize("hf", [False, True])
def test_uniform_logits_give_eight_bits_per_byte(hf):
    model = FixedLogits(torch.zeros(256), hf=hf)
    for domain in data.BYTE_DOMAINS:
        assert lm.bits_per_byte(model, domain, count=8, length=32) == pytest.approx(8.0, abs=1e-9)


def test_bits_per_byte_scores_next_byte_predictions():
    assert lm.bits_per_byte(PeekAhead(1), "prose", count=8, length=32) < 1e-6
    assert lm.bits_per_byte(PeekAhead(0), "prose", count=8, length=32) > 20


def test_logit_average_and_mixture_on_fixed_distributions():
    generator = torch.Generator().manual_seed(0)
    la, lb = torch.randn(256, generator=generator) * 3, torch.randn(256, generator=generator) * 3
    a, b = FixedLogits(la), FixedLogits(lb, hf=True)
    targets = lm.heldout_windows("code", 8, 32)[:, 1:].reshape(-1)

    def expected(probs):
        return (-probs.double().log()[targets].mean() / math.log(2)).item()

    pa, pb = la.double().softmax(0), lb.double().softmax(0)
    assert lm.bits_per_byte(a, "code", count=8, length=32) == pytest.approx(expected(pa), rel=1e-6)
    assert lm.logit_average_bits_per_byte(a, b, "code", count=8, length=32) == pytest.approx(
        expected(((la.double() + lb.double()) / 2).softmax(0)), rel=1e-6)
    assert lm.mixture_bits_per_byte(a, b, "code", count=8, length=32) == pytest.approx(expected((pa + pb) / 2), rel=1e-6)
    # The mixture of a model with itself is the model; so is its logit average.
    assert lm.mixture_bits_per_byte(a, a, "code", count=8, length=32) == pytest.approx(expected(pa), rel=1e-6)
    assert lm.logit_average_bits_per_byte(a, a, "code", count=8, length=32) == pytest.approx(expected(pa), rel=1e-6)


def test_bits_per_byte_restores_the_training_mode():
    model = FixedLogits(torch.zeros(256)).train()
    lm.bits_per_byte(model, "prose", count=2, length=8)
    assert model.training


def test_lm_logits_rejects_other_outputs():
    with pytest.raises(TypeError, match="expected a tensor of logits"):
        lm.lm_logits(lambda ids: (ids,), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="expected \\(N, T, vocab\\)"):
        lm.lm_logits(lambda ids: torch.zeros(1, 256), torch.zeros(1, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------ ViT


def test_vit_recipe_builds_trains_and_runs():
    pytest.importorskip("timm")
    recipe = sources.vit_recipe(1, seed=1, epochs=1)
    assert recipe.classes == (5, 6, 7, 8, 9) and recipe.resolution == sources.VIT_RESOLUTION
    train_set = recipe.load_split("train").subset(range(64))
    assert train_set.sample_shape == (1, 16, 16) and int(train_set.y.max()) < 5
    model = architectures.create(recipe.arch, seed=recipe.seed, **recipe.kwargs)
    assert type(model).__name__ == "VisionTransformer" and model.patch_embed.num_patches == 16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train.train_classifier(model, train_set, seed=1, epochs=1, batch_size=32, progress=False)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model(train_set.x[:3]).shape == (3, 5)
    assert 0.0 <= train.evaluate(model, train_set) <= 1.0
