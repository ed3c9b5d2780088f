"""The transformer benchmark's parts that run in seconds: its plan of merges, the report it renders from
measured rows, the plot, and the LM distillation baseline."""
import math

import pytest
import torch

from pleas.bench import transformers as T

transformers = pytest.importorskip("transformers")


def test_every_method_is_planned_at_1x_and_pleas_at_every_budget_with_both_stream_alignments():
    plan = T._plan(True, (1.0, 1.5, 2.0))
    methods_1x = {m for _, m, b, _ in plan if b == 1.0}
    assert {"average", "regmean", "zipit", "rebasin", "pleas"} <= methods_1x
    for budget in (1.0, 1.5, 2.0):
        residuals = {e.get("residual", "permutation") for _, m, b, e in plan if m == "pleas" and b == budget}
        assert residuals == {"permutation", "orthogonal"}
    assert not any(e.get("residual") for _, _, _, e in T._plan(False, (1.0,)))
    distilled = {b for _, m, b, e in plan if m == "pleas" and e.get("distill_steps")}
    assert distilled == {1.0, 2.0}


def _lm_results():
    def row(label, method, budget, code, prose, seconds=None):
        return {"row": label, "method": method, "budget": budget, "code": code, "prose": prose,
                "mean": (code + prose) / 2, "seconds": seconds}
    rows = [row("source A (code)", "source", None, 2.0, 4.0), row("source B (prose)", "source", None, 4.0, 2.2),
            row("logit average", "logit average", None, 2.4, 2.5), row("mixture", "mixture", None, 2.3, 2.4),
            row("weight average", "average", 1.0, 6.0, 6.0, 1.0), row("PLeaS", "pleas", 1.0, 3.0, 3.0, 4.0),
            row("PLeaS", "pleas", 2.0, 2.5, 2.6, 6.0), row("PLeaS + 50 distillation steps", "pleas", 2.0, 2.4, 2.55, 9.0)]
    return {"lm": [{"family": "gpt2", "recipes": ["a", "b"], "calibration_windows": 8, "window": 16,
                    "eval_windows": 4, "forward_floor_seconds": 2.0, "rows": rows}]}


def test_the_report_gives_the_share_of_the_gap_closed_and_the_time_over_the_floor():
    text = T.render(_lm_results())
    line = next(l for l in text.splitlines() if l.startswith("| PLeaS | 1.0 "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # mean 3.0: (6.0 - 3.0) / (6.0 - 3.0 (better source's mean)) = 100%; 4 s over a 2 s floor
    assert cells[4] == "3.000" and cells[5] == "100%" and cells[7] == "2.0"
    assert "| weight average | 1.0 |" in text and "0%" in text
    # 2x against the logit average (mean 2.45): PLeaS 2.55, with distillation 2.475
    assert "PLeaS +0.100 bits per byte; PLeaS + 50 distillation steps +0.025 bits per byte" in text


def test_the_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    T.plot(_lm_results(), tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_distillation_moves_a_student_toward_the_teachers_average():
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    models = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        models.append(transformers.GPT2LMHeadModel(config).eval())
    a, b, student = models
    ids = torch.randint(0, 32, (32, 16), generator=torch.Generator().manual_seed(0))

    def kl(model):
        from pleas.experiments.lm import lm_logits
        with torch.no_grad():
            t = torch.log_softmax((lm_logits(a, ids) + lm_logits(b, ids)) / 2, -1)
            s = torch.log_softmax(lm_logits(model, ids), -1)
        return float(torch.nn.functional.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True,
                                                reduction="batchmean"))

    trained, steps = T.distill_lm(student, a, b, ids, seconds=3.0)
    assert steps > 0 and not trained.training
    assert kl(trained) < kl(student)  # the start is a copy: the student passed in is unchanged
    assert math.isfinite(kl(trained))
