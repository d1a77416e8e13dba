"""``yochameleon relate FILE_A FILE_B --model M [--facts "..." ...] [--steps N] --out DIR``."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> None:
    """Learn the facts relating concepts trained apart; print the updated concept files."""
    import torch

    from yochameleon.backends import LoadOptions, load_backend
    from yochameleon.train.relate import RelateConfig, relate_concepts

    # The settings are checked before the model loads; unset flags keep RelateConfig's defaults.
    given = {
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "replay_batch": args.replay_batch,
        "seed": args.seed,
    }
    config = RelateConfig(**{k: v for k, v in given.items() if v is not None}, progress=not args.quiet)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    backend = load_backend(args.model, LoadOptions(device=device))
    for path in relate_concepts(backend, args.concepts, args.facts or None, args.out, config):
        print(f"{path} (+ {path.with_suffix('.json').name})")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``relate`` to a top-level ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "relate",
        help="teach concepts trained apart the facts that relate them (a short joint step on their rows)",
    )
    p.add_argument("concepts", nargs="+", help="concept files (two or more)")
    p.add_argument("--model", required=True, help="the base model the concept files were trained on")
    p.add_argument(
        "--facts",
        action="append",
        default=[],
        help='a fact naming two of the concepts, e.g. "<bo> is the brother of <mắm>" (repeatable); '
        "default: the facts of the concept folders the files were trained from",
    )
    p.add_argument("--out", required=True, help="folder for the updated concept files")
    p.add_argument("--steps", type=int, help="optimizer steps (default: RelateConfig's, 300)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, help="relation records per step (default 4)")
    p.add_argument(
        "--replay-batch",
        type=int,
        help="the concepts' own recognition and text-QA records replayed per step, from the data folders "
        "their runs trained on, so they keep what they knew (default 4; 0: relation records only)",
    )
    p.add_argument("--seed", type=int, help="seed of the batch order (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p
