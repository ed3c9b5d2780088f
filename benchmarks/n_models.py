"""Merging N models at once (issue #18): MNIST split into tasks, one ResNet-20 per task from its own seed.

Tasks: 5 tasks of 2 digits ({0,1}, {2,3}, ..., {8,9}, seeds 0-4) and 3 tasks of 3 digits ({0,1,2},
{3,4,5}, {6,7,8}, seeds 0-2). Each model's head is padded to every task's classes (its own in its slot,
zeros elsewhere), so all N models share one architecture and the merged model's head holds every task; a
task is scored by the argmax over its own slot (accuracy on that task's test split), and the table gives
the mean over tasks. Calibration: 200 training images per task.

Rows: the sources (each on its own task), then every method at 1x, PLeaS and Git Re-Basin at N/2 x and N x
(effective parameters: N x is every model kept, side by side), the ensemble, and PLeaS chained pairwise at
1x (model 0 merged with model 1, the result with model 2, ...). Merge times against N for PLeaS at 1x are
printed at the end; a plot of mean accuracy against the budget is written to --plot.

Usage: python benchmarks/n_models.py [--tasks 5,3] [--plot n_models.png] [--json n_models.json]
"""
import argparse
import json
import time
import warnings

import torch
from torch import nn

import pleas
from pleas.experiments import sources

parser = argparse.ArgumentParser()
parser.add_argument("--tasks", default="5,3")
parser.add_argument("--per-task", type=int, default=200, help="calibration images per task")
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--plot")
parser.add_argument("--json")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)

SPLITS = {5: [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)], 3: [(0, 1, 2), (3, 4, 5), (6, 7, 8)]}


def padded(model: nn.Module, slot: int, n: int, k: int) -> nn.Module:
    """``model`` (k classes) with a head of n * k outputs: its own in slot ``slot``, zeros elsewhere."""
    out = pleas.models.resnet20(in_channels=1, num_classes=n * k, width=1)
    state = model.state_dict()
    full = out.state_dict()
    for key, t in state.items():
        if t.shape != full[key].shape:  # the head: rows of this task's slot
            full[key] = torch.zeros_like(full[key])
            full[key][slot * k:(slot + 1) * k] = t
        else:
            full[key] = t
    out.load_state_dict(full)
    return out.eval()


def accuracies(model, tests, k):
    accs = []
    for slot, test in enumerate(tests):
        with torch.no_grad():
            logits = torch.cat([model(x) for x in test.x.split(512)])[:, slot * k:(slot + 1) * k]
        accs.append(float((logits.argmax(1) == test.y).float().mean()))
    return accs


def quiet(*a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        result = pleas.merge(*a, progress=False, **kw)
        return result, time.perf_counter() - start


results = {}
for n in map(int, args.tasks.split(",")):
    split = SPLITS[n]
    k = len(split[0])
    trained = [sources.train_source(sources.SourceRecipe("resnet20", {"in_channels": 1, "num_classes": k, "width": 1},
                                                         "mnist", classes, 16, seed, args.epochs), name=str(seed),
                                    log=print) for seed, classes in enumerate(split)]
    models = [padded(s.model, slot, n, k) for slot, s in enumerate(trained)]
    tests = [s.test_set for s in trained]
    gen = torch.Generator().manual_seed(0)
    data = torch.cat([s.train_set.x[torch.randperm(len(s.train_set), generator=gen)[:args.per_task]] for s in trained])
    rows = []

    def add(label, budget, accs, seconds=None):
        rows.append({"row": label, "budget": budget, "accuracies": accs, "mean": sum(accs) / len(accs), "seconds": seconds})
        print(f"N={n} {label:28s} {budget if budget else '':>5} " + " ".join(f"{a:.3f}" for a in accs)
              + f"  mean {sum(accs) / len(accs):.3f}" + (f"  {seconds:.1f} s" if seconds else ""), flush=True)

    add("sources", None, [accuracies(m, tests, k)[slot] for slot, m in enumerate(models)])
    for method in ("average", "regmean", "zipit", "rebasin", "pleas"):
        result, secs = quiet(models, data, method=method)
        add(method, 1.0, accuracies(result.model, tests, k), secs)
    for budget in (n / 2, float(n)):
        for method in ("rebasin", "pleas"):
            result, secs = quiet(models, data, method=method, budget=budget, budget_metric="effective_params")
            add(method, budget, accuracies(result.model, tests, k), secs)
    result, secs = quiet(models, data, method="ensemble")
    add("ensemble", float(n), accuracies(result.model, tests, k), secs)
    start = time.perf_counter()
    merged = models[0]
    for m in models[1:]:
        merged = quiet([merged, m], data, method="pleas")[0].model
    add("pleas chained pairwise", 1.0, accuracies(merged, tests, k), time.perf_counter() - start)
    results[n] = rows

print("\nmerge time of PLeaS at 1x against N (the 5-task models):")
if 5 in results:
    split = SPLITS[5]
    trained = [sources.train_source(sources.SourceRecipe("resnet20", {"in_channels": 1, "num_classes": 2, "width": 1},
                                                         "mnist", classes, 16, seed, args.epochs)) for seed, classes in enumerate(split)]
    for n in (2, 3, 4, 5):
        models = [padded(s.model, slot, 5, 2) for slot, s in enumerate(trained[:n])]
        data = torch.cat([s.train_set.x[:args.per_task] for s in trained[:n]])
        secs = quiet(models, data, method="pleas")[1]
        print(f"  N={n}: {secs:.2f} s for {len(data)} calibration images ({secs / n:.2f} s per model)")
        results.setdefault("time", []).append({"n": n, "seconds": secs, "calibration": len(data)})

if args.json:
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=1)
if args.plot:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pleas.bench.plots import budget_panel

    ns = [n for n in results if n != "time"]
    fig, axes = plt.subplots(1, len(ns), figsize=(5 * len(ns), 3.6), squeeze=False)
    for ax, n in zip(axes[0], ns):
        references = [r for r in results[n] if r["row"] in ("sources", "ensemble", "pleas chained pairwise", "zipit", "average")]
        budget_panel(ax, results[n], ["rebasin", "pleas"], references, title=f"{n} tasks of MNIST, one ResNet-20 each",
                     ylabel="mean accuracy over tasks")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
