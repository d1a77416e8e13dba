"""``yochameleon prepare CONCEPT_DIR --out DATA_DIR [--index INDEX_DIR] [--model MODEL]``."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> None:
    """Build the manifest (and, with ``--model``, the token cache) and print a summary."""
    from yochameleon.data.manifest import read_manifest, summary_table
    from yochameleon.data.pipeline import PrepareOptions, base_model_answerer, prepare_concept, token_lookup

    backend = None
    if args.model:
        from yochameleon.backends import load_backend

        backend = load_backend(args.model)
    opts = PrepareOptions(n_g=args.n_g, soft_prompt_form=args.soft_prompt_form, seed=args.seed)
    prepare_concept(
        args.concept_dir,
        args.out,
        args.index,
        opts,
        answerer=base_model_answerer(backend) if backend is not None else None,
    )
    manifest = read_manifest(args.out)
    print(summary_table(manifest))
    if backend is not None:
        stats = token_lookup(backend, manifest).cache.stats
        print(f"token cache: {stats['encoded']} images VQ-encoded now, {stats['hits']} already cached")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``prepare`` to a top-level ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "prepare", help="build training records and the token cache for a concept folder"
    )
    p.add_argument("concept_dir")
    p.add_argument("--out", required=True, help="data directory to write")
    p.add_argument("--index", default=None, help="FAISS index directory (yochameleon index)")
    p.add_argument("--model", default=None, help="model whose VQ tokens to cache")
    p.add_argument("--n-g", type=int, default=16)
    p.add_argument("--soft-prompt-form", default="paper", choices=["paper", "code"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p
