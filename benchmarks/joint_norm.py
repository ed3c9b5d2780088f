"""Where a side-by-side merge of the benchmark's Llama pair loses to the logit average (docs/transformers.md).

At 2x (both models side by side, budget in effective parameters) every RMSNorm normalises A's and B's stream
units together. As a diagnostic (not a model pleas returns), each norm can be swapped for one that normalises
each model's units separately, with the same weights: with all of them swapped, the unrefitted side-by-side
model (Git Re-Basin at 2x) should compute the logit average exactly, and leaving one norm joint shows what that
norm alone costs. Then PLeaS at 2x with 0, 50 and 100 distillation steps (the pleas option
``distill_steps``). Mean bits per byte over code and prose, as in ``pleas bench --part transformers``.

    OMP_NUM_THREADS=1 python benchmarks/joint_norm.py [--family llama] [--steps 0,50,100]
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import nn

import pleas


class PerModelRMSNorm(nn.Module):
    """RMSNorm over each model's units separately (``parts``: index tensors), with the joint norm's weight."""

    def __init__(self, norm: nn.Module, parts: list[torch.Tensor]):
        super().__init__()
        self.weight, self.parts = norm.weight, parts
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        out = torch.empty_like(x)
        for part in self.parts:
            u = x[..., part]
            out[..., part] = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * out.to(h.dtype)


def norm_sites(model) -> list[tuple[str, nn.Module, str]]:
    sites = []
    for i, layer in enumerate(model.model.layers):
        sites += [(f"layer {i} input", layer, "input_layernorm"), (f"layer {i} post-attention", layer,
                                                                    "post_attention_layernorm")]
    return sites + [("final", model.model, "norm")]


def stream_owner(merged, a, b) -> list[torch.Tensor]:
    """Each model's stream units in an unrefitted side-by-side merge: the merged embedding's columns are
    copies of A's or B's."""
    e = merged.model.embed_tokens.weight.detach()
    exact = "donot_use_mm_for_euclid_dist"  # the matrix-product form's round-off would hide a copy
    da = torch.cdist(e.T, a.model.embed_tokens.weight.detach().T, compute_mode=exact).min(1).values
    db = torch.cdist(e.T, b.model.embed_tokens.weight.detach().T, compute_mode=exact).min(1).values
    if float(torch.minimum(da, db).max()) > 1e-5:
        raise RuntimeError("the merged embedding's columns are not copies of the sources'")
    owner = (db < da).long()
    return [torch.nonzero(owner == k).squeeze(1) for k in (0, 1)]


def per_model_norms(model, parts, sites: set[str]):
    out = copy.deepcopy(model)
    for name, parent, attr in norm_sites(out):
        if name in sites:
            setattr(parent, attr, PerModelRMSNorm(getattr(parent, attr), parts))
    return out


def stream_ratios(model, parts, ids: torch.Tensor) -> dict[str, tuple[float, float, float]]:
    """At every norm's input: the mean and sd over tokens of log(RMS of A's units / RMS of B's), and the
    share of its variance the current byte explains (on a model with per-model norms: the sources' own
    streams side by side)."""
    seen = {}
    hooks = [getattr(parent, attr).register_forward_pre_hook(
        lambda _m, inp, name=name: seen.__setitem__(name, inp[0].detach().double()))
        for name, parent, attr in norm_sites(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, h in seen.items():
        ratio = (h[..., parts[0]].pow(2).mean(-1).sqrt() / h[..., parts[1]].pow(2).mean(-1).sqrt()).log().flatten()
        byte = ids.flatten()
        means = torch.zeros(256, dtype=torch.float64).index_add_(0, byte, ratio) / \
            torch.bincount(byte, minlength=256).clamp(min=1)
        out[name] = (float(ratio.mean()), float(ratio.std()), 1 - float((ratio - means[byte]).var() / ratio.var()))
    return out


def main() -> None:
    from pleas.bench.transformers import LM_CALIBRATION, LM_EVAL_WINDOWS
    from pleas.datasets import BYTE_DOMAINS, byte_windows
    from pleas.experiments import lm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama")
    parser.add_argument("--steps", default="0,50,100")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pa, pb = lm.lm_pair(args.family)
    a, b = pa.model, pb.model
    ids = byte_windows(LM_CALIBRATION, lm.LM_LENGTH, seed=0)

    def score(model) -> float:
        return sum(lm.bits_per_byte(model, d, count=LM_EVAL_WINDOWS) for d in BYTE_DOMAINS) / len(BYTE_DOMAINS)

    def merge(method, **options):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            result = pleas.merge(a, b, ids, method=method, budget=2.0, budget_metric="effective_params",
                                 progress=False, **options)
            return result.model, time.perf_counter() - start

    reference = sum(lm.logit_average_bits_per_byte(a, b, d, count=LM_EVAL_WINDOWS) for d in BYTE_DOMAINS) / 2
    print(f"{args.family}: logit average {reference:.4f} mean bits per byte")
    side, _ = merge("rebasin")
    parts = stream_owner(side, a, b)
    names = [n for n, _, _ in norm_sites(side)]
    print(f"side by side, no refit, joint norms          {score(side):.4f}")
    print(f"side by side, no refit, every norm per model {score(per_model_norms(side, parts, set(names))):.4f}")
    ratios = stream_ratios(per_model_norms(side, parts, set(names)), parts, ids[:128])  # the sources' streams
    for name in names:
        alone = score(per_model_norms(side, parts, set(names) - {name}))
        mean, sd, byte = ratios[name]
        print(f"  only the {name:24s} norm joint: {alone:.4f} ({alone - reference:+.3f}); log RMS ratio A/B "
              f"mean {mean:+.2f} sd {sd:.2f}, {byte:.0%} of its variance explained by the current byte")
    for steps in (int(s) for s in args.steps.split(",")):
        model, seconds = merge("pleas", distill_steps=steps)
        value = score(model)
        print(f"PLeaS 2x, {steps:3d} distillation steps: {value:.4f} ({value - reference:+.3f}), {seconds:.1f} s")


if __name__ == "__main__":
    main()
