"""PLeaS against RegMean at 1x over several calibration seeds, on the demo's pair and two others.

Pairs: "demo" (the demo's ResNet-20s, MNIST digits 0-4 vs 5-9 at 16x16, separate heads), "mlp" (the
demo's MLP pair, same task), "domains" (ResNet-20s trained on MNIST and on the UCI digits, one shared
10-class head). Calibration seed s draws the images as ``pleas demo --seed s`` does (half of
``--calibration`` seeded images from each task's training split) and merges with ``seed=s``; seed 0
is the default demo run. Also PLeaS at 1.2x and 1.5x on the demo pair (``--budgets``).

Variants (``--variant``), each a change tried to put PLeaS ahead of RegMean on the demo pair:
- ``default``: the library as it is.
- ``prescale``: scale-fair averaging. Before merging, each source is reparametrised so that every unit
  has unit scale where averaging sees it: a conv/Linear followed by BatchNorm has its output rows
  multiplied by 1/sqrt(running_var + eps) and the norm's statistics set to match (exact in eval mode);
  in the MLP, each hidden Linear's rows (and bias) are divided by its pre-activation std on 1,000
  training images per task and the next Linear's columns multiplied by it (exact through ReLU). Every
  method then averages these reparametrised sources.
- ``pre-sites``: activation matching on the units before the ReLU (BatchNorm output, or the residual
  sum) instead of after it.
- ``zipit-units``: PLeaS's refit on ZipIt!'s merge (greedy over the stacked units of both models,
  same-model merges allowed) instead of the permutation; replaces ``pleas`` in ``--methods``.
``--options`` (JSON) passes method options or merge arguments to every merge (e.g. ``{"ridge": 0.1}``,
``{"fold_bn": true}``, ``{"min_rows": 16384}``, ``{"matching": "weight"}``).

Usage: python benchmarks/pleas_vs_regmean.py [--pairs demo,mlp,domains] [--seeds 0,1,2,3,4]
           [--methods pleas,regmean] [--budgets 1.2,1.5] [--variant default] [--options '{}']
"""
import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

import pleas
import pleas.job
from pleas.demo import ARCHS, source_models
from pleas.experiments import train
from pleas.experiments.sources import domain_models
from pleas.fold import layer_norm_pairs
from pleas.graph import trace_graph
from pleas.spec import Site

VARIANTS = ("default", "prescale", "pre-sites", "zipit-units")
parser = argparse.ArgumentParser()
parser.add_argument("--pairs", default="demo,mlp,domains")
parser.add_argument("--seeds", default="0,1,2,3,4")
parser.add_argument("--methods", default="pleas,regmean")
parser.add_argument("--budgets", default="1.2,1.5", help="extra PLeaS budgets on the demo pair ('' for none)")
parser.add_argument("--calibration", type=int, default=1000)
parser.add_argument("--variant", default="default", choices=VARIANTS)
parser.add_argument("--options", default="{}", help="method options / merge arguments for every merge, as JSON")
args = parser.parse_args()
torch.set_num_threads(1)
options = json.loads(args.options)
seeds = [int(s) for s in args.seeds.split(",")]


# --- variants ------------------------------------------------------------------------------------
@torch.no_grad()
def normalise_batchnorm_inputs(model: nn.Module) -> nn.Module:
    """Every BatchNorm fed only by a Conv/Linear sees unit-variance inputs: the layer's rows times
    s = 1/sqrt(var + eps), the norm's running mean times s and its running variance 1 - eps."""
    model = copy.deepcopy(model).eval()
    for _, layer, bn in layer_norm_pairs(model):
        s = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
        layer.weight.copy_(layer.weight.double() * s.reshape(-1, *([1] * (layer.weight.dim() - 1))))
        if layer.bias is not None:
            layer.bias.copy_(layer.bias.double() * s)
        bn.running_mean.copy_(bn.running_mean.double() * s)
        bn.running_var.fill_(1.0 - bn.eps)
    return model


@torch.no_grad()
def normalise_mlp_units(model: nn.Sequential, x: torch.Tensor) -> nn.Module:
    """A [Flatten,] (Linear, ReLU)* Linear MLP with each hidden unit's pre-activation std on ``x`` set
    to 1 (rows divided by it, the next layer's columns multiplied by it)."""
    model = copy.deepcopy(model).eval()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    h = x.flatten(1)
    for a, b in zip(linears[:-1], linears[1:]):
        s = a(h).std(0).clamp_min(1e-6)
        a.weight.div_(s[:, None])
        a.bias.div_(s)
        b.weight.mul_(s[None, :])
        h = torch.relu(a(h))
    return model


def prescale(models, trains):
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models["A"].modules()):
        new = {k: normalise_batchnorm_inputs(m) for k, m in models.items()}
    else:
        x = torch.cat([trains[t].x[:1000] for t in trains])
        new = {k: normalise_mlp_units(m, x) for k, m in models.items()}
    x = torch.cat([trains[t].x[:200] for t in trains])
    change = max(float((new[k](x) - models[k](x)).abs().max()) for k in models)
    print(f"prescale: largest change of a logit {change:.2e}")
    return new


_build_spec = pleas.job.build_spec


def build_spec_pre_relu(model, example):
    """The spec with each site that is a ReLU's output moved to the ReLU's input."""
    spec = _build_spec(model, example)
    nodes = {n.name: n for n in trace_graph(model).graph.nodes}
    modules = dict(model.named_modules())
    for g in spec:
        sites = []
        for s in g.sites:
            n = nodes[s.node]
            if n.op == "call_module" and isinstance(modules[n.target], nn.ReLU):
                src = n.args[0]
                s = Site(src.name, str(src.target), s.dim, s.offset, s.repeat)
            sites.append(s)
        g.sites = sites
    return spec


if args.variant == "pre-sites":
    pleas.job.build_spec = build_spec_pre_relu
if args.variant == "zipit-units":
    from pleas.methods.pleas import PLeaS
    from pleas.methods.rebasin import Rebasin
    from pleas.methods.registry import register_method
    from pleas.methods.zipit import ZipIt

    class _ZipItUnits(Rebasin):
        zip_widths = staticmethod(ZipIt.zip_widths)
        alpha, beta = 0.5, 1.0  # ZipIt!'s defaults

        def plan(self, job):
            return ZipIt.plan(self, job)

    @register_method
    class PLeaSZipIt(PLeaS, _ZipItUnits):
        """PLeaS with ZipIt!'s merge maps: PLeaS.plan's super().plan is _ZipItUnits.plan (MRO)."""

        name = "pleas-zipit"


# --- measurement ---------------------------------------------------------------------------------
def load(pair):
    if pair == "domains":
        return domain_models(log=print), True
    config = ARCHS["resnet20" if pair == "demo" else pair]
    return source_models(config, config.epochs, print), False


def calibration(trains, seed):
    """The demo's draw (pleas/demo.py): half the images from each task, one generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([trains[t].x[torch.randperm(len(trains[t]), generator=g)[: (args.calibration + i) // 2]]
                      for i, t in enumerate(trains)])


def run(models, trains, tests, shared, method, budget, seed):
    start = time.perf_counter()
    r = pleas.merge(models["A"], models["B"], calibration(trains, seed), method=method, budget=budget,
                    heads="shared" if shared else "separate", seed=seed, progress=False, **options)
    sec = time.perf_counter() - start
    acc = [train.evaluate(r.model, tests[t], output_index=None if shared else i) for i, t in enumerate(tests)]
    return sum(acc) / 2, sec


print(f"variant: {args.variant}; options: {options}")
pleas_name = "pleas-zipit" if args.variant == "zipit-units" else "pleas"
for pair in args.pairs.split(","):
    (models, trains, tests), shared = load(pair)
    if args.variant == "prescale":
        models = prescale(models, trains)
    jobs = [(pleas_name if m == "pleas" else m, 1.0) for m in args.methods.split(",")]
    if pair == "demo" and args.budgets:
        jobs += [(pleas_name, float(b)) for b in args.budgets.split(",")]
    for method, budget in jobs:
        accs, secs = [], []
        for seed in seeds:
            acc, sec = run(models, trains, tests, shared, method, budget, seed)
            accs.append(acc)
            secs.append(sec)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{pair:8s} {method:11s} {budget:4.1f}x  mean {statistics.mean(accs):.4f} sd {sd:.4f}  per seed "
              + " ".join(f"{a:.3f}" for a in accs) + f"  ({statistics.mean(secs):.1f} s per merge)", flush=True)
