"""``yochameleon toyworld ...``: commands of the toy world (``build`` now; room for more, e.g. ``bench``)."""

from __future__ import annotations

import argparse

__all__ = ["register", "run_build"]


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``toyworld`` (with its own sub-commands) to the top-level CLI's subparsers.

    Returns:
        The ``toyworld`` parser, so that other modules can add sub-commands to it.
    """
    parser = subparsers.add_parser("toyworld", help="the procedural toy world: build its base artifacts")
    commands = parser.add_subparsers(dest="toyworld_command", metavar="COMMAND")
    commands.required = True
    build = commands.add_parser(
        "build",
        help="train the VQ tokenizer, base model, embedder and scorer; index the pool; check the gates",
        description="Staged, cached and resumable: an interrupted build resumes at its first unfinished stage.",
    )
    build.add_argument("--out", default=None, help="output folder (default: eval/toyworld/artifacts)")
    build.add_argument("--seed", type=int, default=0, help="seeds every training run and photo (default 0)")
    build.add_argument("--reduced", action="store_true", help="fewer steps, same code; gates not enforced")
    build.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest on a busy 2-core machine)",
    )
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=run_build)
    return parser


def run_build(args: argparse.Namespace) -> int:
    """Run ``toyworld build`` and print a summary line.

    Raises:
        BuildError: a bad setting, a failed stage or (full build) a missed gate; the top-level CLI prints
            it as one ``error:`` line and exits with status 2.
    """
    from .build import BuildConfig, build

    config = BuildConfig.create(out=args.out, seed=args.seed, reduced=args.reduced, threads=args.threads)
    report = build(config, progress=not args.quiet)
    passed = all(g["passed"] for g in report["gates"].values())
    print(
        f"toyworld build: {'all gates passed' if passed else 'gates missed (reduced build)'}; "
        f"{report['total_seconds']:.0f}s; artifacts in {config.out}"
    )
    return 0
