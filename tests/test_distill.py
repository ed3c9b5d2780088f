"""The pleas option ``distill_steps`` (src/pleas/refit/distill.py): Adam steps on the whole merged model
toward the sources' ensemble, with the merge's zero blocks kept at zero."""
from __future__ import annotations

import warnings

import pytest
import torch

import pleas
from pleas.refit.distill import loss_of, output_tensors
from toy_models import VGGBN, randomise_norm_stats

transformers = pytest.importorskip("transformers")


def _llamas():
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.3)).eval())
    return out


def _ids():
    return torch.randint(0, 64, (48, 16), generator=torch.Generator().manual_seed(0))


def _merge(a, b, x, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pleas.merge(a, b, x, method="pleas", progress=False, **options)


def _teacher_loss(model, a, b, x, kind="kl"):
    with torch.no_grad():
        want = [(a(x).logits + b(x).logits) / 2]
        return float(loss_of(output_tensors(model(x)), want, kind))


def test_distillation_brings_a_side_by_side_llama_toward_the_logit_average_and_keeps_its_zero_blocks():
    a, b = _llamas()
    x = _ids()
    options = dict(budget=2.0, budget_metric="effective_params")
    plain = _merge(a, b, x, **options)
    tuned = _merge(a, b, x, distill_steps=20, distill_lr=1e-3, distill_batch=16, **options)
    entry = tuned.report["distill"]
    assert entry["steps"] == 20 and "restored" not in entry
    assert entry["loss_after"] < 0.8 * entry["loss_before"]
    assert _teacher_loss(tuned.model, a, b, x) < 0.8 * _teacher_loss(plain.model, a, b, x)
    assert entry["loss_before"] == pytest.approx(_teacher_loss(plain.model, a, b, x), rel=1e-4)
    zeros = 0
    for (k, p), q in zip(plain.model.state_dict().items(), tuned.model.state_dict().values()):
        if p.is_floating_point():
            assert bool((q[p == 0] == 0).all()), k  # masked by construction: the size is unchanged
            zeros += int((p == 0).sum())
    assert zeros > 0  # a side-by-side merge has zero blocks
    assert tuned.report["size"] == plain.report["size"]


def test_distillation_is_deterministic():
    a, b = _llamas()
    x = _ids()
    runs = [_merge(a, b, x, budget=1.0, distill_steps=5, distill_batch=16).model.state_dict() for _ in range(2)]
    for k, v in runs[0].items():
        torch.testing.assert_close(runs[1][k], v, rtol=0, atol=0, msg=k)  # one process, one thread count


def test_distillation_that_makes_things_worse_is_undone_with_a_warning():
    a, b = _llamas()
    x = _ids()
    plain = _merge(a, b, x, budget=1.0)
    with pytest.warns(UserWarning, match="distillation undone"):
        result = pleas.merge(a, b, x, method="pleas", budget=1.0, progress=False, distill_steps=5, distill_lr=50.0)
    assert "restored" in result.report["distill"]
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_separate_heads_distil_each_head_toward_its_own_source_with_mse():
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(randomise_norm_stats(VGGBN(), seed=seed).eval())
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = _merge(*models, x, budget=1.0, heads="separate", distill_steps=10, distill_loss="mse", distill_lr=3e-4)
    entry = result.report["distill"]
    assert "restored" not in entry and entry["loss_after"] < entry["loss_before"]
    with torch.no_grad():
        outs = result.model(x)
        want = [m(x) for m in models]
    assert isinstance(outs, tuple) and len(outs) == 2
    assert float(loss_of(list(outs), want, "mse")) == pytest.approx(entry["loss_after"], rel=1e-4)


def test_bad_distillation_options_are_refused():
    a, b = _llamas()
    for bad, says in (({"distill_steps": -1}, "distill_steps"), ({"distill_loss": "ce"}, "distill_loss"),
                      ({"distill_lr": 0.0}, "distill_lr")):
        with pytest.raises(pleas.MergeInputError, match=says):
            pleas.merge(a, b, _ids(), method="pleas", progress=False, **bad)


def test_a_teacher_too_large_to_keep_is_computed_again_per_step_with_the_same_result(monkeypatch):
    from pleas.refit import distill as module

    a, b = _llamas()
    x = _ids()
    kept = _merge(a, b, x, budget=1.0, distill_steps=5, distill_batch=16).model.state_dict()
    monkeypatch.setattr(module, "TEACHER_CACHE_BYTES", 0)
    again = _merge(a, b, x, budget=1.0, distill_steps=5, distill_batch=16).model.state_dict()
    for k, v in kept.items():  # the teacher's outputs from a sub-batch: float32 round-off apart, then 5 Adam steps
        torch.testing.assert_close(again[k], v, rtol=1e-4, atol=1e-5, msg=k)
