"""``yochameleon generate PROMPT --model M --concept FILE --out DIR``."""

from __future__ import annotations

import argparse
from typing import Any

from yochameleon.cli.ask import STRICT_HELP


def run(args: argparse.Namespace) -> None:
    """Generate ``--n`` images and print their paths."""
    from yochameleon.infer import PersonalizedModel

    pm = PersonalizedModel.load(args.model, args.concept, device=args.device, strict=args.strict)
    for path in pm.generate_to_dir(args.prompt, args.out, n=args.n, seed=args.seed):
        print(path)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``generate`` to a top-level ``add_subparsers()`` object."""
    p = subparsers.add_parser("generate", help="generate images of a concept")
    p.add_argument("prompt")
    p.add_argument("--model", required=True)
    p.add_argument("--concept", action="append", default=[], help="concept file (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p.set_defaults(func=run)
    return p
