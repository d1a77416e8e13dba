"""The ``yochameleon`` command: one module per subcommand, each with ``register(subparsers)``.

Parsing lives here and nowhere else in the library: a command module reads its flags, builds the
typed config or arguments a library function takes, and calls it. Library functions never see an
``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from importlib import import_module

from yochameleon.errors import YoChameleonError

# In the order ``yochameleon --help`` lists them. Every module is imported when the parser is built:
# a command whose module fails to import is an error of the whole command, not a missing subcommand.
COMMAND_MODULES = (
    "make_tiny",
    "prepare",
    "train",
    "encoder",
    "encode",
    "ask",
    "generate",
    "relate",
    "index",
    "eval",
    "compare",
    "toyworld",
    "bench",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``yochameleon`` command.

    Raises:
        ImportError: a command module (or something it needs) cannot be imported.
    """
    parser = argparse.ArgumentParser(prog="yochameleon", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger("yochameleon").warning("%s", message)


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one clear line and exit with status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    if not args.verbose:
        # faiss logs which CPU build it loaded at INFO ("Could not load library with AVX512 support"),
        # two lines that read like a problem in front of every index command's own output.
        logging.getLogger("faiss").setLevel(logging.WARNING)
    # Library warnings (an empty index, skipped pool images) read like the logged ones: one line each.
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        args.func(args)
    except YoChameleonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown
    return 0


__all__ = ["COMMAND_MODULES", "build_parser", "main"]
