"""``yochameleon compare SUMMARY_OR_RUN_DIR ... --out DIR``: the paper-style table and plots."""

from __future__ import annotations

import argparse
from typing import Any

from yochameleon.eval.schema import DEFAULT_REFERENCE


def run(args: argparse.Namespace) -> None:
    """Merge the summaries, write the report and print the table."""
    from yochameleon.eval.report import compare, markdown_table, write_report

    summary = compare(args.inputs, reference=args.reference, n_boot=args.n_boot, seed=args.seed)
    paths = write_report(summary, args.out)
    print(markdown_table(summary))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in paths.items()))


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``compare`` to a top-level ``add_subparsers()`` object."""
    p = subparsers.add_parser("compare", help="merge results into the paper-style table and plots")
    p.add_argument("inputs", nargs="+", help="summary JSON files or run directories holding report.json")
    p.add_argument("--out", required=True, help="directory for report.json, report.md and the PNGs")
    p.add_argument(
        "--reference",
        default=DEFAULT_REFERENCE,
        help="method the others are compared with (paired differences)",
    )
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=run)
    return p
