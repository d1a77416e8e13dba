"""``yochameleon index POOL_DIR --out INDEX_DIR --embedder ...``.

The arguments and the runner live beside the retriever (``yochameleon.retrieval.cli``), which is
usable without the rest of the library.
"""

from __future__ import annotations

import argparse
from typing import Any

from yochameleon.retrieval import cli as retrieval_cli


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``index`` to a top-level ``add_subparsers()`` object."""
    return retrieval_cli.register(subparsers)
