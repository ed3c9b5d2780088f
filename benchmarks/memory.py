"""Peak memory of a PLeaS merge at 1x against its estimate and the size of the weights (docs/memory.md).

For each model, a fresh subprocess builds two randomly initialised copies (seeds 0 and 1), merges them with
``pleas.merge(a, b, data, method="pleas", budget=1.0)`` and prints: the resident memory before the merge
(``getrusage`` ru_maxrss: torch, the caller's two models and the data), the peak resident memory of the
process (the same high-water mark after the merge), the merge's wall time, the estimate made
before the merge (``report["memory"]["estimated_peak"]``), the bytes of A + B + merged weights, and how many
layers each solver solved. Models: torchvision resnet50 and vgg11_bn (10 classes, 32x32 inputs, 64 images)
and a 12-layer, 768-wide GPT-2 LM (vocabulary 256, 64 sequences of 32 tokens).

    OMP_NUM_THREADS=1 python benchmarks/memory.py [--models resnet50 vgg11_bn gpt2] [--max-memory 6GB]
        [--budget 1.5] [--method ensemble] [--streaming]

Columns: GiB. ``libs``: resident memory after importing torch and torchvision (transformers for the LM);
``merge``: peak minus ``libs`` (models, data and the merge); ``bound``: 2 x (A + B + merged weights) plus the
float64 Gram of the map with the most input columns, the bound the issue on memory asks of a streaming merge.
``--streaming`` merges with ``streaming=True`` (the refit's targets taken while it runs, not held for every
layer from the matching's pass).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MODELS = ("resnet50", "vgg11_bn", "gpt2")


def _models(name: str):
    import torch

    if name == "gpt2":
        import transformers

        config = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=768, n_layer=12, n_head=12)
        make = lambda: transformers.GPT2LMHeadModel(config).eval()  # noqa: E731
        data = torch.randint(0, 256, (64, 32), generator=torch.Generator().manual_seed(2))
    else:
        import torchvision

        make = lambda: getattr(torchvision.models, name)(num_classes=10).eval()  # noqa: E731
        data = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    a = make()
    torch.manual_seed(1)
    b = make()
    return a, b, data


def _largest_gram(model) -> int:
    """Bytes of the float64 Gram of the linear map with the most input columns (bias included)."""
    import torch

    columns = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            inputs = w.shape[0] if type(module).__name__ == "Conv1D" else w[0].numel()  # Conv1D stores (in, out)
            columns = max(columns, inputs + (getattr(module, "bias", None) is not None))
    return 8 * columns * columns


def child(name: str, max_memory: str | None, budget: float, method: str, streaming: bool = False) -> None:
    import resource
    import time

    import torch

    import pleas

    torch.set_num_threads(1)
    __import__("transformers" if name == "gpt2" else "torchvision")
    runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the libraries alone
    a, b, data = _models(name)
    start = time.perf_counter()
    kwargs = {"max_memory": max_memory} if max_memory else {}
    if streaming:
        kwargs["streaming"] = True
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # torch, the models and the data
    result = pleas.merge(a, b, data, method=method, budget=budget, progress=False, **kwargs)
    seconds = time.perf_counter() - start

    def size(model):
        seen, total = set(), 0
        for t in model.state_dict().values():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    # a finite sum means finite entries; only then is the elementwise check run (its temporaries are as large
    # as the tensor, 2.3 GB on the vgg11_bn ensemble's classifier, and used to set the peak reported here)
    finite = all(bool(torch.isfinite(t.sum()) or torch.isfinite(t).all())
                 for t in result.model.state_dict().values() if t.is_floating_point())
    memory = result.report["memory"]
    print(json.dumps({
        "model": name, "method": method, "budget": budget, "streaming": streaming, "before_gb": before,
        "runtime_gb": runtime, "largest_gram_gb": _largest_gram(result.model) / 2**30,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "seconds": seconds, "estimate_gb": memory["estimated_peak"] / 2**30,
        "weights_gb": (size(a) + size(b) + size(result.model)) / 2**30,
        "largest_layer": {k: memory["largest_layer"].get(k) for k in ("layer", "columns", "rows", "solver")},
        "solvers": memory["solvers"], "finite": finite}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--max-memory", default=None)
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--method", default="pleas")
    parser.add_argument("--streaming", action="store_true", help="pleas with streaming=True (targets taken in the refit)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.max_memory, args.budget, args.method, args.streaming)
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"{'model':10s} {'method':8s} {'budget':>6s} {'stream':>6s} {'libs':>6s} {'before':>7s} {'peak RSS':>8s} "
          f"{'estimate':>8s} {'A+B+merged':>10s} {'merge':>7s} {'bound':>7s} {'seconds':>7s}  "
          f"largest layer (columns, rows, solver); solvers")
    for name in args.models:
        cmd = [sys.executable, __file__, "--child", name, "--budget", str(args.budget), "--method", args.method]
        if args.max_memory:
            cmd += ["--max-memory", args.max_memory]
        if args.streaming:
            cmd += ["--streaming"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(f"{name:10s} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(lines[-1])
        big = r["largest_layer"]
        merge = r["peak_rss_gb"] - r["runtime_gb"]  # the process's peak without the libraries' own memory
        bound = 2 * r["weights_gb"] + r["largest_gram_gb"]
        print(f"{name:10s} {r['method']:8s} {r['budget']:6.2f} {'on' if r['streaming'] else 'off':>6s} "
              f"{r['runtime_gb']:5.2f}G {r['before_gb']:6.2f}G {r['peak_rss_gb']:7.2f}G {r['estimate_gb']:7.2f}G "
              f"{r['weights_gb']:9.2f}G {merge:6.2f}G {bound:6.2f}G {r['seconds']:7.1f}  "
              f"{big['layer']} ({big['columns']}, {big['rows']}, "
              f"{big['solver']}); {r['solvers']}{'' if r['finite'] else '  NOT FINITE'}")


if __name__ == "__main__":
    main()
