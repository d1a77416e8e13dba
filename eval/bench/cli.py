"""The ``bench`` command: ``bench train``, ``bench estimate`` and ``bench retrieval``."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` with its subcommands to a top-level ``add_subparsers()`` object.

    Each subcommand sets ``func``, so the caller dispatches with ``args.func(args)``.
    """
    from yochameleon.eval.bench.estimate import add_estimate_args
    from yochameleon.eval.bench.train_bench import add_train_args
    from yochameleon.retrieval import cli as retrieval_cli

    bench = subparsers.add_parser("bench", help="performance benchmarks")
    sub = bench.add_subparsers(dest="bench", required=True)
    add_train_args(
        sub.add_parser(
            "train",
            help="the fast training path against a straightforward trainer, with an ablation",
            description="Time and memory of the fast path and of the reference trainer, each run in its own "
            "subprocess (A B A B), plus one row per fast-path feature switched off.",
        )
    )
    add_estimate_args(
        sub.add_parser(
            "estimate",
            help="memory and time of a training step from a model's shape (e.g. Anole-7B)",
        )
    )
    retrieval_cli.add_bench_retrieval_args(
        sub.add_parser("retrieval", help="FAISS build/search time and memory")
    )
    return bench
