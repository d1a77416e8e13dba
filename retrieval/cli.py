"""Command-line pieces for retrieval: ``yochameleon index`` and ``yochameleon bench retrieval``.

The top-level ``yochameleon`` parser lives in ``yochameleon/cli/``; its ``index`` module calls
:func:`register`, and ``bench`` wires :func:`add_bench_retrieval_args` / :func:`run_bench_retrieval`::

    yochameleon index POOL_DIR --out INDEX_DIR --embedder open_clip --model ViT-H-14 --pretrained laion2b_s32b_b79k
    yochameleon index POOL_DIR --out INDEX_DIR --embedder test
    yochameleon bench retrieval --n-exact 100000 --n-approx 1000000
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from yochameleon.errors import ConfigError

from .embedders import Embedder, build_embedder
from .index import INDEX_KINDS, build_index

__all__ = [
    "add_bench_retrieval_args",
    "add_index_args",
    "embedder_from_args",
    "register",
    "run_bench_retrieval",
    "run_index",
]


def add_index_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``index`` command's arguments to ``parser``."""
    parser.add_argument("pool_dir", metavar="POOL_DIR", help="directory of images to index (recursive)")
    parser.add_argument(
        "--out", required=True, metavar="INDEX_DIR", help="index directory (created; resumable)"
    )
    parser.add_argument(
        "--embedder", required=True, choices=["open_clip", "test"], help="embedding model family"
    )
    parser.add_argument("--model", help="open_clip model name, e.g. ViT-H-14 or hf-hub:org/repo")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--pretrained", metavar="TAG", help="open_clip pretrained tag, e.g. laion2b_s32b_b79k"
    )
    weights.add_argument("--weights", metavar="FILE", help="local open_clip checkpoint file")
    parser.add_argument(
        "--model-config", metavar="JSON", help="custom open_clip architecture JSON to register"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="allow a randomly initialised open_clip model (tests only)",
    )
    parser.add_argument(
        "--kind", default="auto", choices=INDEX_KINDS, help="FAISS index type (default: auto)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images embedded and saved per step")
    parser.add_argument("--device", default="cpu", help="torch device for the embedder (default: cpu)")
    parser.add_argument("--dim", type=int, default=64, help="vector size of the test embedder")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``index`` subcommand to a top-level ``add_subparsers()`` object.

    The parser's default ``func`` is :func:`run_index`, so the caller can dispatch with ``args.func(args)``.
    """
    parser = subparsers.add_parser(
        "index",
        help="build or update a FAISS index over an image pool",
        description="Embed every image under POOL_DIR and write a searchable index. Re-running resumes an "
        "interrupted build and only embeds new images.",
    )
    add_index_args(parser)
    parser.set_defaults(func=run_index)
    return parser


def embedder_from_args(args: argparse.Namespace) -> Embedder:
    """Build the embedder described by parsed ``index`` arguments.

    Raises:
        ConfigError: open_clip options given for the test embedder, or a bad open_clip setup.
    """
    if args.embedder == "test":
        stray = [
            flag
            for flag, value in (
                ("--model", args.model),
                ("--pretrained", args.pretrained),
                ("--weights", args.weights),
                ("--model-config", args.model_config),
            )
            if value
        ]
        if stray or args.random_weights:
            raise ConfigError(
                f"--embedder test takes no open_clip options (got {stray or ['--random-weights']})"
            )
        return build_embedder("test", dim=args.dim)
    return build_embedder(
        "open_clip",
        model=args.model,
        pretrained=args.pretrained,
        weights=args.weights,
        model_config=args.model_config,
        device=args.device,
        batch_size=args.batch_size,
        random_weights=args.random_weights,
    )


def run_index(args: argparse.Namespace) -> int:
    """Run ``yochameleon index``; prints a short summary and returns the exit code."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    embedder = embedder_from_args(args)
    index = build_index(
        args.pool_dir,
        args.out,
        embedder,
        kind=args.kind,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    report = index.report
    assert report is not None  # build always attaches one
    print(
        f"indexed {report.count} images from {index.pool_root} into {index.out_dir} ({report.kind}, dim {index.dim})\n"
        f"  found {report.found}, embedded {report.embedded}, reused {report.reused}, skipped {report.skipped}"
        f" unreadable or over the pixel limit, {report.seconds:.1f} s"
    )
    return 0


def add_bench_retrieval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``bench retrieval`` arguments to ``parser`` (and set ``func`` to :func:`run_bench_retrieval`)."""
    parser.add_argument("--n-exact", type=int, default=100_000, help="vectors for the exact flat index")
    parser.add_argument("--n-approx", type=int, default=1_000_000, help="vectors for the approximate index")
    parser.add_argument("--dim", type=int, default=512, help="vector dimension")
    parser.add_argument(
        "--approx-kind", default="ivf", choices=["ivf", "hnsw"], help="approximate index type"
    )
    parser.add_argument("--queries", type=int, default=100, help="queries per batched search")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--json", metavar="FILE", help="also write the full result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run_bench_retrieval)
    return parser


def run_bench_retrieval(args: argparse.Namespace) -> int:
    """Run ``yochameleon bench retrieval``; prints a table (and writes JSON if asked)."""
    from .bench import bench_retrieval, format_bench

    result = bench_retrieval(
        n_exact=args.n_exact,
        n_approx=args.n_approx,
        dim=args.dim,
        seed=args.seed,
        n_queries=args.queries,
        k=args.k,
        approx_kind=args.approx_kind,
        progress=not args.no_progress,
    )
    print(format_bench(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0
