"""``yochameleon make-tiny OUT_DIR``: a random-init model of one family, built without downloads."""

from __future__ import annotations

import argparse
from typing import Any

from yochameleon.errors import ConfigError


def run(args: argparse.Namespace) -> None:
    """Write the requested tiny model and print where it went."""
    if args.family == "chameleon":
        from yochameleon.backends.tiny import make_tiny

        out = make_tiny(args.out_dir, size=args.size, seed=args.seed)
    elif args.size != "tiny":
        raise ConfigError(f"--size {args.size} exists for the chameleon family only")
    elif args.family == "emu3":
        from yochameleon.backends.tiny_emu3 import make_tiny_emu3

        out = make_tiny_emu3(args.out_dir, seed=args.seed)
    else:
        from yochameleon.backends.tiny_janus import make_tiny_janus

        out = make_tiny_janus(args.out_dir, seed=args.seed)
    print(f"wrote a random-init {args.size} {args.family} model to {out}")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``make-tiny`` to a top-level ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "make-tiny", help="write a random-init tiny Chameleon-class model (no downloads)"
    )
    p.add_argument("out_dir")
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "anole-tiny"])
    p.add_argument("--family", default="chameleon", choices=["chameleon", "emu3", "janus"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p
