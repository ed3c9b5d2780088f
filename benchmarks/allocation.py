"""Per-group merge budgets: PLeaS with each allocator (one uniform fraction, the ZipIt!-style prefix
schedule, the greedy and measured allocators) at 1.2x and 1.5x, over several calibration seeds.

Tasks: the demo's (MNIST digits 0-4 vs 5-9, separate heads) for each of --archs (resnet20, mlp, cnn1d
on MNIST-1D halves), and "domains": one label space in two domains (a ResNet-20 trained on MNIST, one on
the UCI digits of scikit-learn, both at 16x16, different seeds; merged head; accuracy on each domain).

Calibration seed s draws the calibration images (half from each task's training split) and is the
merge's seed (the refit's row sampling). Differences of half a point between allocators are within
what a change of s moves, so compare means over seeds. Each merge is also scored, without labels,
by its outputs' distance to the two sources' (the permuted ensemble's) on held-out training inputs
(disjoint from the calibration images): "mse" is the squared logit error relative to the logits'
variance, "agree" the fraction of inputs whose argmax agrees with the ensemble's.

Usage: python benchmarks/allocation.py [--archs resnet20,domains] [--budgets 1.2,1.5] [--seeds 0,1,2]
       [--metric params|flops|effective_params|effective_flops] [--allocations uniform,prefix,downstream]
       [--json out.json]
"""
import argparse
import json
import statistics
import time

import torch

import pleas
from pleas.demo import ARCHS, source_models
from pleas.experiments import train
from pleas.experiments.sources import domain_models

parser = argparse.ArgumentParser()
parser.add_argument("--archs", default="resnet20,domains")
parser.add_argument("--budgets", default="1.2,1.5")
parser.add_argument("--seeds", default="0,1,2", help="calibration seeds (also the merge seed)")
parser.add_argument("--metric", default="params")
parser.add_argument("--calibration", type=int, default=1000)
parser.add_argument("--held-out", type=int, default=1000, help="training inputs outside the calibration set, "
                    "for the label-free distance to the ensemble")
parser.add_argument("--method", default="pleas")
parser.add_argument("--allocations", default="uniform,prefix,greedy,measured")
parser.add_argument("--options", default="{}", help='method options as JSON, e.g. {"inputs": "teacher"}')
parser.add_argument("--json", default=None, help="write every merge's numbers here")
args = parser.parse_args()
SIZE_KEYS = {"params": "relative_dense", "flops": "relative_flops", "effective_params": "relative_effective",
             "effective_flops": "relative_effective_flops"}
torch.set_num_threads(1)


def draw(trains, seed: int):
    """Calibration images and held-out training inputs, half from each task, disjoint."""
    g = torch.Generator().manual_seed(seed)
    calib, held = [], []
    for t in trains:
        p = torch.randperm(len(trains[t]), generator=g)
        calib.append(trains[t].x[p[: args.calibration // 2]])
        held.append(trains[t].x[p[args.calibration // 2: (args.calibration + args.held_out) // 2]])
    return torch.cat(calib), torch.cat(held)


def distance(model, x, sources, shared: bool) -> dict:
    """Label-free distance of the merged model's outputs to the ensemble's on inputs x."""
    with torch.no_grad():
        out = model(x)
        a, b = (m(x) for m in sources)
    pairs = [(out, (a + b) / 2)] if shared else list(zip(out, (a, b)))
    mse = statistics.mean(float((p - q).pow(2).mean() / q.var()) for p, q in pairs)
    agree = statistics.mean(float((p.argmax(1) == q.argmax(1)).float().mean()) for p, q in pairs)
    return {"mse": mse, "agree": agree}


def spread(values):
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


seeds = [int(s) for s in args.seeds.split(",")]
budgets = [float(b) for b in args.budgets.split(",")]
allocations = args.allocations.split(",")
rows = []
print(f"{'arch':9s} {'budget':>6s} {'allocation':>10s} {'seed':>4s} {'size':>6s} {'acc A':>6s} {'acc B':>6s} "
      f"{'mean':>6s} {'mse':>6s} {'agree':>6s} {'sec':>6s}")
for arch in args.archs.split(","):
    shared = arch == "domains"
    if shared:
        models, trains, tests = domain_models()
    else:
        config = ARCHS[arch]
        models, trains, tests = source_models(config, config.epochs, print)
    for t in tests:
        print(f"{arch:9s} source {t}: {train.evaluate(models[t], tests[t]):.3f}")
    ens = pleas.merge(models["A"], models["B"], trains["A"].x[:8], method="ensemble",
                      heads="shared" if shared else "separate", progress=False)
    acc = [train.evaluate(ens.model, tests[t], output_index=None if shared else i) for i, t in enumerate(tests)]
    print(f"{arch:9s} ensemble {sum(acc) / 2:.3f}")
    for seed in seeds:
        calib, held = draw(trains, seed)
        for budget in budgets:
            for allocation in allocations:
                start = time.perf_counter()
                r = pleas.merge(models["A"], models["B"], calib, method=args.method, budget=budget,
                                heads="shared" if shared else "separate", seed=seed,
                                budget_metric=args.metric, allocation=allocation, progress=False,
                                **json.loads(args.options))
                sec = time.perf_counter() - start
                acc = [train.evaluate(r.model, tests[t], output_index=None if shared else i) for i, t in enumerate(tests)]
                size = r.report["size"][SIZE_KEYS[args.metric]]
                dist = distance(r.model, held, (models["A"], models["B"]), shared)
                rows.append({"arch": arch, "budget": budget, "allocation": allocation, "seed": seed, "size": size,
                             "acc": acc, "mean": sum(acc) / 2, "sec": sec, **dist, "merge_counts": r.merge_counts})
                print(f"{arch:9s} {budget:6.2f} {allocation:>10s} {seed:4d} {size:6.3f} {acc[0]:6.3f} {acc[1]:6.3f} "
                      f"{sum(acc) / 2:6.3f} {dist['mse']:6.4f} {dist['agree']:6.3f} {sec:6.1f}", flush=True)

print(f"\nmean ± standard deviation over calibration seeds {seeds}; sec: median merge time")
print(f"{'arch':9s} {'budget':>6s} {'allocation':>10s} {'accuracy':>15s} {'mse':>15s} {'agree':>15s} {'sec':>6s}")
for arch in args.archs.split(","):
    for budget in budgets:
        for allocation in allocations:
            sel = [r for r in rows if r["arch"] == arch and r["budget"] == budget and r["allocation"] == allocation]
            print(f"{arch:9s} {budget:6.2f} {allocation:>10s} {spread([r['mean'] for r in sel]):>15s} "
                  f"{spread([r['mse'] for r in sel]):>15s} {spread([r['agree'] for r in sel]):>15s} "
                  f"{statistics.median(r['sec'] for r in sel):6.1f}")
if args.json:
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
