"""``yochameleon toyworld build|bench|encoder``: the CPU benchmark world.

The toy world is a side project with its own commands (``yochameleon.eval.toyworld.cli``); this
module only puts them under the top-level command.
"""

from __future__ import annotations

import argparse
from typing import Any

from yochameleon.eval.toyworld import cli as toyworld_cli


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``toyworld`` to a top-level ``add_subparsers()`` object."""
    return toyworld_cli.register(subparsers)
