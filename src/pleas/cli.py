"""The ``pleas`` command line: parses arguments, calls the library, prints."""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__


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
    from .graph import build_spec

    model = create_model(args.arch, **args.kwargs)
    spec = build_spec(model, torch.randn(*args.input_shape))
    print(spec)
    if args.json:
        spec.to_json(args.json)
        print(f"wrote {args.json}")
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
