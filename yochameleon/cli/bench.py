"""``yochameleon bench train|estimate|retrieval``: speed and memory benchmarks.

The subcommands' arguments live beside the benchmarks (``yochameleon.eval.bench.cli``).
"""

from __future__ import annotations

import argparse
from typing import Any

from yochameleon.eval.bench import cli as bench_cli


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` to a top-level ``add_subparsers()`` object."""
    return bench_cli.register(subparsers)
