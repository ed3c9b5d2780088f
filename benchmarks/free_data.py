"""PLeaS without the tasks' data (issue #20): on every image pair of the benchmark whose source models are
cached (seed pair 0), PLeaS with the task's data against PLeaS-free with each free source, and the
ablation rows that say which stage of PLeaS loses what on free data.

Rows (mean accuracy over the two domains; seconds of the merge, and of the synthesis where there is one):

  pleas                 task data everywhere (the reference)
  free                  the task's free data (UCI digits, photo patches) everywhere; norm_stats "auto"
  free, norms=data      the same with the norm statistics recomputed on the free data (norm_stats="data")
  free-match            units matched on free data, refit and norm statistics on the task's data
  free-refit            units matched on the task's data, refit (and norm statistics) on free data
  synthetic             inputs synthesised from the sources' BatchNorm statistics (pleas.synthesize) everywhere

at dense budgets (``--budgets``) and at 2x effective parameters (both sources whole: the ensemble), then
the amount of free data at 1x. Run: ``python benchmarks/free_data.py`` (about 40 minutes on 2 CPU cores,
most of it the synthesis on resnet18); ``--pairs domains/resnet20 --steps 50`` for a quick look.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import pleas
from pleas.bench import tasks as task_defs
from pleas.bench.free_ablation import split_merge
from pleas.errors import MergeInputError
from pleas.experiments import train

#: The image pairs of the benchmark (task, arch).
PAIRS = ("mnist-halves/resnet20", "mnist-halves/resnet18", "domains/resnet20", "domains/resnet18", "mnist-halves/mlp")


def cached(task: task_defs.Task, arch: str) -> bool:
    """Whether seed pair 0's models of (task, arch) are in the cache (this script never trains)."""
    setup = task.archs[arch]
    for domain, seed in zip(task.domains, task_defs.pair_seeds(0)):
        recipe = task_defs.SourceRecipe(setup.factory, setup.kwargs, domain.dataset, domain.classes, setup.resolution,
                                        seed, setup.epochs)
        if not train.model_path(recipe.cache_key()).exists():
            return False
    return True


def accuracy(model, task, tests) -> float:
    separate = task.heads == "separate"
    accs = [train.evaluate(model, test, output_index=i if separate else None) for i, test in enumerate(tests)]
    return sum(accs) / len(accs)


def run_pair(name: str, args) -> list[dict]:
    task_name, arch = name.split("/")
    task = task_defs.TASKS[task_name]
    a, b = task_defs.source_models(task, arch, 0, task.archs[arch].epochs)
    tests = (a.test_set, b.test_set)
    models = [a.model, b.model]
    n = args.calibration
    data = {"task": task_defs.task_calibration(a, b, n, seed=0),
            "free": task.free_data(n, task.archs[arch].resolution, 0)}
    shape = tuple(data["task"].shape[1:])
    synthesis_seconds = None
    try:
        start = time.perf_counter()
        data["synthetic"] = pleas.synthesize(models, n, shape=shape, steps=args.steps, seed=0, progress=False)
        synthesis_seconds = time.perf_counter() - start
    except MergeInputError as exc:
        print(f"{name}: no synthetic data: {exc}", flush=True)
    rows = []

    def record(label, budget, metric, model, report, extra=None):
        row = {"pair": name, "label": label, "budget": budget, "metric": metric, "acc": accuracy(model, task, tests),
               "norm_stats": report.get("norm_stats"), "seconds": report["seconds"]["total"],
               "dense": report["size"]["relative_dense"], "effective": report["size"]["relative_effective"],
               **(extra or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def merged(label, source, budget, metric, norm_stats="auto", **extra):
        if source not in data:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = pleas.merge(models, data[source], budget=budget, heads=task.heads, seed=0, progress=False,
                                 norm_stats=norm_stats, budget_metric=metric)
        record(label, budget, metric, result.model, result.report, extra)

    budgets = [(b, "params") for b in args.budgets] + [(2.0, "effective_params")]
    for budget, metric in budgets:
        merged("pleas", "task", budget, metric)
        merged("free", "free", budget, metric)
        merged("free, norms=data", "free", budget, metric, norm_stats="data")
        for label, match, refit in (("free-match", "free", "task"), ("free-refit", "task", "free")):
            model, report = split_merge(models, data[match], data[refit], budget=budget, heads=task.heads,
                                        budget_metric=metric)
            record(label, budget, metric, model, report)
        merged("synthetic", "synthetic", budget, metric, synthesis_seconds=synthesis_seconds)
    for size in args.sizes:  # the amount of free data, at 1x
        if size > n:
            continue
        for source in ("task", "free", "synthetic"):
            if source in data:
                # the task's sample drawn again (half from each domain); free and synthetic data: a prefix
                # (synthetic batches are independent: its first 256 inputs are what synthesize(256) gives)
                x = task_defs.task_calibration(a, b, size, seed=0) if source == "task" else data[source][:size]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = pleas.merge(models, x, heads=task.heads, seed=0, progress=False)
                record(f"size:{source}", 1.0, "params", result.model, result.report, {"samples": size})
    return rows


def table(rows: list[dict]) -> str:
    """The acceptance table: per pair and budget, PLeaS, each free variant and its difference in points."""
    lines = []
    for pair in dict.fromkeys(r["pair"] for r in rows):
        lines.append(f"\n{pair}")
        labels = [lb for lb in dict.fromkeys(r["label"] for r in rows if r["pair"] == pair) if not lb.startswith("size:")]
        cells = sorted({(r["budget"], r["metric"]) for r in rows if r["pair"] == pair and not r["label"].startswith("size:")},
                       key=lambda c: (c[1] != "params", c[0]))
        lines.append("  " + "row".ljust(18) + "".join(f"{b:g}x {'eff' if m != 'params' else 'dense'}".rjust(22) for b, m in cells))
        by = {(r["label"], r["budget"], r["metric"]): r for r in rows if r["pair"] == pair}
        for label in labels:
            text = "  " + label.ljust(18)
            for b, m in cells:
                r, ref = by.get((label, b, m)), by.get(("pleas", b, m))
                if r is None:
                    text += "-".rjust(22)
                    continue
                diff = "" if label == "pleas" else f" {100 * (r['acc'] - ref['acc']):+5.1f}"
                text += f"{r['acc']:.3f}{diff} {r['seconds']:5.1f}s".rjust(22)
            lines.append(text)
        synth = [r.get("synthesis_seconds") for r in rows if r["pair"] == pair and r.get("synthesis_seconds")]
        if synth:
            lines.append(f"  synthesis: {synth[0]:.1f}s")
        sizes = [r for r in rows if r["pair"] == pair and r["label"].startswith("size:")]
        for source in dict.fromkeys(r["label"][5:] for r in sizes):
            lines.append(f"  1x on {source} data: " + ", ".join(f"{r['samples']}: {r['acc']:.3f}" for r in sizes
                                                                if r["label"] == f"size:{source}"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated task/arch pairs")
    parser.add_argument("--budgets", default="1,1.5,2", help="dense budgets (2x effective is always added)")
    parser.add_argument("--calibration", type=int, default=1000, help="calibration samples of every kind")
    parser.add_argument("--steps", type=int, default=200, help="synthesis steps per batch")
    parser.add_argument("--sizes", default="128,256,512,1000", help="free-data amounts at 1x")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    torch.set_num_threads(1)
    rows = []
    for name in args.pairs.split(","):
        task_name, arch = name.split("/")
        if not cached(task_defs.TASKS[task_name], arch):
            print(f"{name}: source models not cached; skipped (pleas bench --tasks {task_name} --archs {arch} trains them)")
            continue
        rows += run_pair(name, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
