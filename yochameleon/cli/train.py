"""``yochameleon train RECIPE.yaml [key.sub=value ...] [--resume]``."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> None:
    """Load the recipe with its overrides, train, and name the concept files written."""
    from yochameleon.config import load_config, to_dict
    from yochameleon.train.checkpoint import check_run_dir
    from yochameleon.train.config import TrainConfig
    from yochameleon.train.trainer import Trainer

    cfg = load_config(TrainConfig, args.recipe, args.overrides)
    # A refused resume (or a start over a finished run) before the model loads and the data is read.
    check_run_dir(cfg.output_dir, to_dict(cfg), args.resume)
    trainer = Trainer(cfg)
    trainer.setup()
    result = trainer.train(resume=args.resume)
    print(
        f"trained {result.steps} steps; final loss {result.losses[-1]:.4f}"
        if result.losses
        else "nothing to do"
    )
    for name, path in result.concept_files.items():
        print(f"concept {name}: {path} (+ {path.with_suffix('.json').name})")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train`` to a top-level ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "train", help="train concept tokens from a recipe: train RECIPE.yaml [key.sub=value ...]"
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir after an interruption"
    )
    p.set_defaults(func=run)
    return p
