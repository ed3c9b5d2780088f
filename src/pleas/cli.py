"""The ``pleas`` command line: parses arguments, calls the library, prints."""
from __future__ import annotations

import argparse
import json
import sys

from .version import __version__
from .budget import METRICS


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,3,32,32, got {text!r}") from None


def _kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"num_classes\": 10}}': {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def cmd_spec(args: argparse.Namespace) -> int:
    import torch

    from .factory import create_model
    from . import build_spec

    from .files import check_outputs

    check_outputs({"--json": args.json}, [])
    model = create_model(args.arch, **args.kwargs)
    spec = build_spec(model, torch.randn(*args.input_shape))
    print(spec)
    if args.json:
        spec.to_json(args.json)
        print(f"wrote {args.json}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1.0,1.5, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names like ensemble,zipit, got {text!r}")
    return values


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that would overwrite an input or each other, before any work is done."""
    from pathlib import Path

    from .errors import MergeInputError
    from .files import check_outputs
    from .io import is_pretrained_dir

    if is_pretrained_dir(args.models[0]):  # the merged model is a new Hugging Face directory
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise MergeInputError(f"--out {args.out!r} exists; give a new directory for the merged model "
                                  "(pleas never overwrites)")
        check_outputs({"--report": args.report, "--plot": args.plot}, [*args.models, args.data, args.out])
        return
    check_outputs({"--out": args.out, "--report": args.report, "--plot": args.plot}, [*args.models, args.data])


def _memory(text: str) -> int:
    from .errors import MergeInputError
    from .memory import parse_bytes

    try:
        return parse_bytes(text)
    except MergeInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def cmd_merge(args: argparse.Namespace) -> int:
    import time

    from .errors import MergeInputError
    from .methods import METHODS
    from .synthesis import OPTIONS as SYNTHESIS_OPTIONS
    from .synthesis import synthetic_count

    start = time.perf_counter()
    synthetic = synthetic_count(args.data)
    if synthetic is not None and args.input_shape is None:
        raise MergeInputError(f"--data {args.data} needs --input-shape: the shape of one input, e.g. 1,32,32 for "
                              "one-channel 32x32 images")
    unknown = sorted(set(args.synthesis) - set(SYNTHESIS_OPTIONS))
    if unknown:
        raise MergeInputError(f"--synthesis names unknown options {unknown}; allowed: {list(SYNTHESIS_OPTIONS)}")
    if synthetic is not None and args.samples is not None:
        raise MergeInputError(f"--samples does not apply to --data {args.data}: N is the number of inputs synthesised")
    method = args.method or "pleas"
    if method not in METHODS:
        hint = "" if args.method else " (the default); pass --method"
        raise MergeInputError(f"unknown method {method!r}{hint}; known methods: {sorted(METHODS)}")
    if len(args.models) < 2:
        raise MergeInputError(f"pleas merge needs at least two models; got {len(args.models)}")
    _check_outputs(args)
    if args.nproc > 1:
        from . import distributed

        distributed.launch(args.nproc, merge_rank, (args, method, start))
        return 0
    return merge_rank(args, method, start)


def merge_rank(args: argparse.Namespace, method: str, start: float) -> int:
    """Load, merge and write (the last two on rank 0 only in a process group of ``--nproc`` ranks, each of
    which merges from its own run of whole calibration batches)."""
    import time

    from . import distributed
    from .api import merge
    from .errors import MergeInputError
    from .files import write_atomically
    from .io import (is_pretrained_dir, load_calibration, load_model, load_pretrained, load_tokenizer, merged_files,
                     report_bytes, save_pretrained_atomically)
    from .synthesis import synthesize, synthetic_count

    pretrained = is_pretrained_dir(args.models[0])
    if pretrained:
        sources = [load_pretrained(path) for path in args.models]
        tokenizer = load_tokenizer(args.models[0])
    elif args.arch is None:
        raise MergeInputError("--arch is needed for checkpoint files (not for Hugging Face model directories)")
    else:
        sources = [load_model(args.arch, args.kwargs, path) for path in args.models]
        tokenizer = None
    synthesis = None
    synthetic = synthetic_count(args.data)
    if synthetic is not None:  # every rank synthesises the same inputs (seeded), then takes its share
        began = time.perf_counter()
        data = synthesize(sources, synthetic, shape=args.input_shape, seed=args.seed, progress=sys.stderr.isatty(),
                          **args.synthesis)
        synthesis = {"samples": synthetic, "shape": list(args.input_shape), "options": args.synthesis,
                     "seconds": time.perf_counter() - began}
    else:
        data = load_calibration(args.data, args.samples, seed=args.seed, tokenizer=tokenizer, seq_len=args.seq_len)
    samples = data.shape[0]
    if distributed.active():
        data = distributed.shard(data, args.batch_size)
    result = merge(
        sources, data, method=method, budget=args.budget, budget_metric=args.budget_metric,
        heads=args.heads, matching=args.matching, norm_stats=args.norm_stats, residual=args.residual,
        seed=args.seed, batch_size=args.batch_size, progress=sys.stderr.isatty(), max_memory=args.max_memory,
        **args.options,
    )
    if distributed.rank() != 0:
        return 0  # every rank holds the same merged model; rank 0 writes it
    if synthesis is not None:  # its time next to the merge's
        result.report["synthesis"] = synthesis
        result.report["seconds"] = {**result.report.get("seconds", {}), "synthesis": synthesis["seconds"]}
    info = {"arch": args.arch, "kwargs": args.kwargs} if not pretrained else {"pretrained": True}
    from pathlib import Path

    extra = {}
    if args.plot:
        from .plots import merge_fractions_png

        extra[Path(args.plot)] = merge_fractions_png(result)
    if pretrained and hasattr(result.model, "save_pretrained"):
        report = report_bytes(result, info)
        if args.report:
            extra[Path(args.report)] = report
        write_atomically(extra)  # the report and the plot first: the model directory appears last, whole
        save_pretrained_atomically(result.model, args.out, {"pleas_report.json": report})
    else:
        contents = merged_files(result, args.out, args.report, info=info)
        write_atomically({**contents, **extra})  # every output, or none
    for warning in result.report.get("warnings", []):
        print(f"warning  {warning}", file=sys.stderr)
    groups = result.report.get("groups", [])
    src_units = sum(g["width"] for g in groups)
    new_units = sum(g["merged_width"] for g in groups)
    ratios = [g["merged_width"] / g["width"] for g in groups if g["width"]]
    size = result.report.get("size", {})
    print(f"method   {method} (budget {args.budget:g}, heads {args.heads}, matching {args.matching}, seed {args.seed})")
    print(f"size     {size.get('relative_dense', float('nan')):.3f}x one source model "
          f"({size.get('merged_params', 0):,} vs {size.get('source_params', 0):,} entries), "
          f"{size.get('relative_effective', float('nan')):.3f}x without the zero blocks")
    if "allocation" in result.report:
        print(f"budget   {args.budget_metric}, spread by allocation={result.report['allocation']!r}")
    if ratios:
        print(f"widths   {len(groups)} groups, {new_units} units from {src_units} per source "
              f"(per group {min(ratios):.2f}x to {max(ratios):.2f}x)")
    print(f"calib    {samples} samples of shape {tuple(data.shape[1:])}"
          + (" (token ids)" if not data.dtype.is_floating_point else "")
          + (f", synthesised from the sources' BatchNorm statistics in {synthesis['seconds']:.2f} s" if synthesis else "")
          + (f", {distributed.world_size()} processes" if distributed.active() else ""))
    print(f"wrote    {args.out}" + (f" and {args.report}" if args.report else "") + (f" and {args.plot}" if args.plot else ""))
    print(f"seconds  {time.perf_counter() - start:.2f} (merge {result.report.get('seconds', {}).get('total', 0):.2f})")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import describe_methods

    print(describe_methods())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        arch=args.arch, budgets=args.budgets, methods=args.methods, calibration=args.calibration,
        epochs=args.epochs, quick=args.quick, seed=args.seed,
    )
    return 0


def _bench_command(args: argparse.Namespace) -> str:
    """The command line that repeats this run (recorded in BENCHMARKS.md)."""
    import shlex

    words = ["pleas", "bench"]
    if args.quick:
        words.append("--quick")
    for flag, value in (("--tasks", args.tasks), ("--archs", args.archs), ("--methods", args.methods)):
        if value:
            words += [flag, ",".join(value)]
    if args.budgets:
        words += ["--budgets", ",".join(f"{b:g}" for b in args.budgets)]
    for flag, value in (("--seeds", args.seeds), ("--calibration", args.calibration), ("--epochs", args.epochs)):
        if value is not None:
            words += [flag, str(value)]
    if args.out != ".":
        words += ["--out", args.out]
    return shlex.join(words)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run, suite

    if args.report_only:
        suite.rerender(args.out)
        print(f"wrote {suite.OutputPaths.under(args.out).report} from the saved results")
        return 0
    if args.part == "transformers":
        suite.run_transformer_suite(args.out)
        if suite.OutputPaths.under(args.out).results.exists():
            suite.rerender(args.out)
        return 0
    config = run.make_config(
        tasks=args.tasks, archs=args.archs, quick=args.quick, methods=args.methods, budgets=args.budgets,
        seed_pairs=args.seeds, calibration=args.calibration, epochs=args.epochs,
    )
    narrowed = args.tasks or args.archs or args.methods or args.budgets or args.seeds
    if args.part == "all" and not args.quick and not narrowed:  # a narrowed run asks for CNN pairs only
        suite.run_transformer_suite(args.out)
    suite.run_suite(config, args.out, command=_bench_command(args), progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pleas",
        description="Merge two neural networks trained from different initialisations (PLeaS).",
    )
    parser.add_argument("--version", action="version", version=f"pleas {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("spec", help="trace an architecture and print its permutation groups")
    p.add_argument("arch", help="torchvision/timm/pleas model name, or module.path:factory")
    p.add_argument("--kwargs", type=_kwargs, default={}, help="JSON object of factory arguments")
    p.add_argument("--input-shape", type=_shape, default=(2, 3, 64, 64), help="example input shape (default 2,3,64,64)")
    p.add_argument("--json", help="also write the spec as JSON to this path")
    p.set_defaults(func=cmd_spec)

    p = sub.add_parser("methods", help="list the merging methods and their options")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser(
        "merge",
        help="merge two or more checkpoints of one architecture into one model",
        description="Merge two or more checkpoints of one architecture; writes the merged state dict as safetensors "
        "(rebuild it with pleas.io.load_merged) and optionally a JSON report. Nothing is written on error.",
    )
    p.add_argument("models", nargs="+", metavar="model", help="two or more checkpoints (.safetensors, or torch files "
                   "with a state dict) of one architecture, or Hugging Face model directories (config.json + "
                   "safetensors); the first is the one the others are matched to")
    p.add_argument("--arch", default=None, help="torchvision/timm/pleas model name, or module.path:factory (for "
                   "checkpoint files)")
    p.add_argument("--kwargs", type=_kwargs, default={}, help="JSON object of factory arguments")
    p.add_argument("--data", required=True,
                   help="calibration inputs: mnist, digits, mnist1d (optionally name:resolution, e.g. digits:16), "
                   "a .npy / .pt file holding an array (N, ...) (integers: token ids), or a .txt file of text (cut "
                   "into --seq-len tokens with the model directory's tokenizer, or bytes), or synthetic:N: N inputs "
                   "synthesised from the sources' BatchNorm statistics (DeepInversion; needs --input-shape)")
    p.add_argument("--input-shape", type=_shape, default=None, help="shape of one input for --data synthetic:N, "
                   "comma-separated, e.g. 1,32,32")
    p.add_argument("--synthesis", type=_kwargs, default={}, help="JSON object of pleas.synthesize options for "
                   "--data synthetic:N, e.g. '{\"steps\": 100}'")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per calibration window of a .txt file "
                   "(default 128)")
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="use at most this many calibration samples, chosen with --seed (default: all)")
    p.add_argument("--budget", type=float, default=1.0, help="merged size relative to one source model (default 1.0)")
    p.add_argument("--method", default=None, help="merging method (default: pleas)")
    p.add_argument("--options", type=_kwargs, default={}, help="JSON object of method options, e.g. '{\"alpha\": 0.5}'")
    p.add_argument("--heads", choices=("shared", "separate"), default="shared",
                   help="shared: one label space; separate: each source keeps its own head (default shared)")
    p.add_argument("--matching", choices=("activation", "weight", "identity"), default="activation",
                   help="how units are matched (default activation)")
    p.add_argument("--norm-stats", choices=("auto", "data", "sources"), default="auto",
                   help="where running norm statistics come from (default auto: the data when it matches the "
                   "sources' stored statistics)")
    p.add_argument("--residual", choices=("permutation", "orthogonal"), default="permutation",
                   help="align the residual stream of a language model by a permutation or, for RMSNorm models "
                   "(Llama, Mistral, Qwen2), by a rotation (default permutation)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="calibration batch size (default 256)")
    p.add_argument("--nproc", type=_positive_int, default=1,
                   help="processes that share the statistics (torch.distributed, gloo on this machine); each "
                        "passes its own run of whole calibration batches (default 1)")
    p.add_argument("--out", required=True, help="where to write the merged model (.safetensors; a new directory for "
                   "Hugging Face models)")
    p.add_argument("--report", help="also write the JSON report (sizes, widths, timings) here")
    p.add_argument("--plot", help="also save a bar chart of each group's merged fraction here (.png; needs matplotlib)")
    p.add_argument("--budget-metric", choices=METRICS, default="params",
                   help="what the budget counts: dense parameters, Linear/Conv multiply-adds, or either without the "
                   "zero blocks (effective_params, effective_flops: the paper's count; range [1, 2]) (default params)")
    p.add_argument("--max-memory", type=_memory, default=None,
                   help="most resident memory the merge may reach, e.g. 6GB (binary units); the merge's peak is "
                   "estimated first and a merge that would not fit fails at once, writing nothing (default: the "
                   "machine's available memory)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "demo",
        help="train two models on MNIST halves (cached), merge them with every method, print accuracies",
        description="Two models trained on MNIST digits 0-4 and 5-9 from different seeds (trained once, cached "
        "under $PLEAS_CACHE or ~/.cache/pleas) merged with separate heads by every registered method; prints "
        "each merge's size and accuracy on both tasks.",
    )
    p.add_argument("--arch", choices=("resnet20", "mlp"), default="resnet20", help="source architecture (default resnet20)")
    p.add_argument("--budgets", type=_floats, default=None, help="comma-separated budgets (default 1.0,1.2,1.5)")
    p.add_argument("--methods", type=_names, default=None, help="comma-separated methods (default: every registered one)")
    p.add_argument("--calibration", type=_positive_int, default=1000,
                   help="calibration images, half from each task's training set (default 1000)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="training epochs of the source models")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample and the merges (default 0)")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: few epochs, methods and budgets")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench",
        help="the benchmark suite: every method on real tasks, written to BENCHMARKS.md with plots",
        description="Trains pairs of source models (cached under $PLEAS_CACHE or ~/.cache/pleas) on MNIST halves, "
        "MNIST vs UCI digits and MNIST-1D halves, merges them with every method at every budget, and writes "
        "BENCHMARKS.md, plots and the raw results (docs/bench/results.json) under --out. The full run takes "
        "roughly half an hour on 2 CPU cores (the first time; trained models are cached); --quick takes seconds.",
    )
    p.add_argument("--out", default=".", help="directory of BENCHMARKS.md; plots and results go to OUT/docs/bench "
                   "(default: the current directory)")
    p.add_argument("--quick", action="store_true", help="smoke run: mnist-halves with the MLP, 1 seed pair, budgets "
                   "1,1.5, few epochs, 200 calibration samples")
    p.add_argument("--report-only", action="store_true", help="render BENCHMARKS.md and the plots again from the "
                   "saved results; run nothing")
    p.add_argument("--tasks", type=_names, default=None, help="comma-separated tasks (default: all)")
    p.add_argument("--archs", type=_names, default=None, help="comma-separated architectures (default: all)")
    p.add_argument("--methods", type=_names, default=None, help="comma-separated methods (default: all)")
    p.add_argument("--budgets", type=_floats, default=None, help="comma-separated budgets (default 1,1.2,1.5,1.8,2)")
    p.add_argument("--seeds", type=_positive_int, default=None, help="number of seed pairs (default 3)")
    p.add_argument("--calibration", type=_positive_int, default=None,
                   help="calibration samples per merge, half from each domain (default 1000)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="training epochs of every source model (default: each architecture's own)")
    p.add_argument("--part", choices=("all", "cnn", "transformers"), default="all",
                   help="all (default), the CNN pairs only, or the transformer pairs only (byte-level GPT-2 and "
                   "Llama LMs, a ViT pair), whose section is added to BENCHMARKS.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import PleasError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PleasError as exc:
        print(f"pleas: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
