"""``yochameleon prepare RECIPE.yaml [key.sub=value ...]``: a recipe's training data, ahead of ``train``.

Prepare reads the same recipe and overrides as ``train`` and does what training would do before its
first step, for every concept of the recipe: records into ``concept.data_dir`` (default
``OUTPUT_DIR/data/NAME``), with the recipe's ``data`` settings recorded in the manifest header, and
the VQ token cache. Training with the same recipe then uses the folder as is; training with other
data settings refuses it and names the keys that differ.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from yochameleon.errors import ConfigError


def run(args: argparse.Namespace) -> None:
    """Prepare every concept of the recipe and print its record counts and token-cache use."""
    import torch

    from yochameleon.backends import LoadOptions, load_backend
    from yochameleon.config import load_config
    from yochameleon.data.manifest import read_manifest, summary_table
    from yochameleon.data.pipeline import base_model_answerer, prepare_concept, token_lookup
    from yochameleon.train.config import TrainConfig

    if Path(args.recipe).is_dir():
        raise ConfigError(
            f"{args.recipe} is a folder; prepare takes a recipe: yochameleon prepare RECIPE.yaml "
            "concept.concept_dir=CONCEPT_DIR concept.data_dir=DATA_DIR [data.index_dir=INDEX_DIR ...]"
        )
    cfg = load_config(TrainConfig, args.recipe, args.overrides)
    entries = cfg.concept_entries()
    missing = [e["name"] for e in entries if not e["concept_dir"]]
    if missing:
        raise ConfigError(f"concept(s) {', '.join(missing)} have no concept_dir to prepare from")
    m = cfg.model
    device = "cuda" if m.device == "auto" and torch.cuda.is_available() else m.device
    device = "cpu" if device == "auto" else device
    backend = load_backend(
        m.name_or_path, LoadOptions(dtype=m.dtype, quantization=m.quantization, device=device)
    )
    # The base model answers text QA for a folder without qa.jsonl, as it does when training prepares.
    answerer = base_model_answerer(backend)
    for entry in entries:
        prepare_concept(
            entry["concept_dir"],
            entry["data_dir"],
            cfg.data,
            cfg.concept.n_g,
            name=entry["name"],
            answerer=answerer,
        )
        manifest = read_manifest(entry["data_dir"])
        print(summary_table(manifest))
        stats = token_lookup(backend, manifest).cache.stats
        print(
            f"token cache: {stats['encoded']} images VQ-encoded now, {stats['hits']} already cached\n"
            f"prepared {entry['data_dir']}"
        )


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``prepare`` to a top-level ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "prepare",
        help="build a recipe's training records and token cache: prepare RECIPE.yaml [key.sub=value ...]",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, the same as for train")
    p.set_defaults(func=run)
    return p
