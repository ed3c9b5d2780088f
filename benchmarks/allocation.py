"""Per-group merge budgets: PLeaS with the greedy allocator against one uniform fraction and the
ZipIt!-style prefix schedule, at 1.2x and 1.5x.

Tasks: the demo's (MNIST digits 0-4 vs 5-9, separate heads) for each of --archs (resnet20, mlp, cnn1d
on MNIST-1D halves), and "domains": one label space in two domains (a ResNet-20 trained on MNIST, one on
the UCI digits of scikit-learn, both at 16x16, different seeds; merged head; accuracy on each domain).

Usage: python benchmarks/allocation.py [--archs resnet20,mlp,domains] [--budgets 1.2,1.5] [--metric params|flops]
"""
import argparse
import json
import time

import torch

import pleas
from pleas.demo import ARCHS, source_models
from pleas.experiments import train
from pleas.experiments.sources import domain_models

parser = argparse.ArgumentParser()
parser.add_argument("--archs", default="resnet20,mlp")
parser.add_argument("--budgets", default="1.2,1.5")
parser.add_argument("--metric", default="params")
parser.add_argument("--calibration", type=int, default=1000)
parser.add_argument("--method", default="pleas")
parser.add_argument("--allocations", default="uniform,prefix,greedy,measured")
parser.add_argument("--options", default="{}", help='method options as JSON, e.g. {"inputs": "teacher"}')
args = parser.parse_args()

print(f"{'arch':9s} {'budget':>6s} {'allocation':>10s} {'size':>6s} {'acc A':>6s} {'acc B':>6s} {'mean':>6s} {'sec':>6s}")

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
    g = torch.Generator().manual_seed(0)
    calib = torch.cat([trains[t].x[torch.randperm(len(trains[t]), generator=g)[: args.calibration // 2]] for t in trains])
    for budget in [float(b) for b in args.budgets.split(",")]:
        for allocation in args.allocations.split(","):
            start = time.perf_counter()
            r = pleas.merge(models["A"], models["B"], calib, method=args.method, budget=budget,
                            heads="shared" if shared else "separate",
                            budget_metric=args.metric, allocation=allocation, progress=False,
                            **json.loads(args.options))
            sec = time.perf_counter() - start
            acc = [train.evaluate(r.model, tests[t], output_index=None if shared else i) for i, t in enumerate(tests)]
            size = r.report["size"]["relative_dense" if args.metric == "params" else "relative_flops"]
            print(f"{arch:9s} {budget:6.2f} {allocation:>10s} {size:6.2f} {acc[0]:6.3f} {acc[1]:6.3f} "
                  f"{sum(acc) / 2:6.3f} {sec:6.1f}", flush=True)
