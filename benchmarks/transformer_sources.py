"""The source models of the transformer benchmarks (issue #17), trained (or loaded from the cache) and
measured: two byte-level LM pairs (GPT-2-style and Llama-style; model A on Python's standard library
source, seed 0; model B on the English help texts of pydoc_data, seed 1) and a ViT pair (MNIST digits
0-4 vs 5-9, seeds 0 and 1).

For each LM: training time and held-out bits per byte on both domains; for each LM pair: the
logit-average ensemble and the probability mixture; then whether pleas captures the LMs
(``pleas.build_spec`` on calibration windows) and what ``pleas.merge`` with methods "ensemble" and
"average" gives (bits per byte, or the error). For each ViT: training time and test accuracy.

Usage: python benchmarks/transformer_sources.py [--families gpt2,llama] [--no-vit] [--no-merge]
       [--calibration 64] [--json out.json]
Models are trained once and cached (PLEAS_CACHE, default ~/.cache/pleas).
"""
import argparse
import json
import time
import traceback

import torch

import pleas
from pleas.datasets import BYTE_DOMAINS, byte_windows
from pleas.experiments import lm, sources, train

parser = argparse.ArgumentParser()
parser.add_argument("--families", default=",".join(lm.FAMILIES))
parser.add_argument("--no-vit", action="store_true")
parser.add_argument("--no-merge", action="store_true")
parser.add_argument("--calibration", type=int, default=64, help="calibration windows for build_spec / merge")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--steps", type=int, help="LM training steps (default: the recipe's); for smoke runs")
parser.add_argument("--vit-epochs", type=int, default=sources.VIT_EPOCHS)
parser.add_argument("--json")
args = parser.parse_args()
torch.set_num_threads(args.threads)


def bpb_row(label, fn):
    """{domain: bits per byte} and their mean, printed as one line."""
    row = {d: fn(d) for d in BYTE_DOMAINS}
    row["mean"] = sum(row.values()) / len(BYTE_DOMAINS)
    print(f"  {label:28s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return row


results = {"lm": {}, "vit": {}}
for family in args.families.split(","):
    a, b = lm.lm_pair(family, log=print, **({} if args.steps is None else {"steps": args.steps}))
    out = results["lm"][family] = {"recipes": {}, "bpb": {}, "cache": {}}
    print(f"{family}: {sum(p.numel() for p in a.model.parameters())} parameters")
    for name, source in zip("AB", (a, b)):
        out["recipes"][name] = source.recipe.describe()
        out["cache"][name] = str(train.model_path(source.recipe.cache_key()))
        out.setdefault("train_seconds", {})[name] = source.train_seconds
        if source.losses:
            out.setdefault("final_train_loss", {})[name] = sum(source.losses[-20:]) / min(20, len(source.losses))
        print(f"  model {name}: {source.recipe.describe()}; trained in {source.train_seconds:.1f} s"
              f"{' (cached)' if not source.train_seconds else ''}; {out['cache'][name]}", flush=True)
        out["bpb"][name] = bpb_row(f"model {name}", lambda d, m=source.model: lm.bits_per_byte(m, d))
    out["bpb"]["logit_average"] = bpb_row("logit average", lambda d: lm.logit_average_bits_per_byte(a.model, b.model, d))
    out["bpb"]["mixture"] = bpb_row("mixture", lambda d: lm.mixture_bits_per_byte(a.model, b.model, d))
    if args.no_merge:
        continue
    ids = byte_windows(args.calibration, lm.LM_LENGTH, seed=0)
    checks = out["merge"] = {}
    start = time.perf_counter()
    try:
        spec = pleas.build_spec(a.model, ids[:2])
        checks["build_spec"] = f"ok: {len(spec.groups)} groups in {time.perf_counter() - start:.1f} s"
    except Exception as exc:  # noqa: BLE001 - reporting what happens is the point of this check
        checks["build_spec"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    print(f"  build_spec: {checks['build_spec']}", flush=True)
    for method in ("ensemble", "average"):
        start = time.perf_counter()
        try:
            merged = pleas.merge(a.model, b.model, ids, method=method, progress=False).model
            row = bpb_row(f"merge {method}", lambda d: lm.bits_per_byte(merged, d))
            checks[method] = {"bpb": row, "class": type(merged).__name__,
                              "seconds": time.perf_counter() - start}
        except Exception as exc:  # noqa: BLE001
            checks[method] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            print(f"  merge {method}: {checks[method]}", flush=True)

if not args.no_vit:
    vits = sources.vit_models(epochs=args.vit_epochs, log=print)
    for half, (source, seed, (name, classes)) in enumerate(zip(vits, (0, 1), sources.HALVES)):
        acc = train.evaluate(source.model, source.test_set)
        recipe = sources.vit_recipe(half, seed, args.vit_epochs)
        results["vit"][name] = {"recipe": recipe.describe(), "kwargs": sources.VIT_KWARGS, "test_accuracy": acc,
                                "test_size": len(source.test_set), "train_seconds": source.train_seconds,
                                "cache": str(train.model_path(recipe.cache_key()))}
        print(f"vit {name} (digits {classes[0]}-{classes[-1]}): test accuracy {acc:.4f} on {len(source.test_set)}"
              f" images; trained in {source.train_seconds:.1f} s", flush=True)

if args.json:
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=1)
