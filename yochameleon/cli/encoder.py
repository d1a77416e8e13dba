"""``yochameleon encoder train RECIPE.yaml [key.sub=value ...] [--resume]``: train a concept encoder.

An encoder turns a few photos of a new object into a concept file without training
(``yochameleon encode``). It trains on many identities at once, the base model frozen, with the
same self-prompting losses as ``train``; see ``recipes/tiny-encoder.yaml``.
"""

from __future__ import annotations

import argparse
from typing import Any


def run_train(args: argparse.Namespace) -> None:
    """Load the recipe with its overrides, train the encoder, and name the file written."""
    from yochameleon.config import load_config
    from yochameleon.train.encoder import EncoderTrainConfig, train_encoder

    cfg = load_config(EncoderTrainConfig, args.recipe, args.overrides)
    result = train_encoder(cfg, resume=args.resume)
    print(
        f"trained {result.steps} steps on {len(result.identities)} identities"
        + (f"; final loss {result.losses[-1]:.4f}" if result.losses else "")
    )
    print(f"encoder: {result.encoder_file} (+ {result.encoder_file.with_suffix('.json').name})")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``encoder`` (with its ``train`` subcommand) to a top-level ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "encoder", help="concept encoders (zero-shot concepts): encoder train RECIPE.yaml [key.sub=value ...]"
    )
    sub = p.add_subparsers(dest="encoder_command", required=True)
    t = sub.add_parser(
        "train",
        help="train a concept encoder on many identities",
        description=__doc__.split("\n\n", 1)[1],
    )
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    t.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir after an interruption"
    )
    t.set_defaults(func=run_train)
    return p
