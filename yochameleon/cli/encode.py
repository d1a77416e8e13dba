"""``yochameleon encode CONCEPT_DIR --encoder E --model M --out DIR``: a concept file from photos, no training.

The concept encoder (``yochameleon encoder train``) reads the folder's photos (1 to 5; of more, 5
evenly spread ones) and writes ``OUT/NAME.safetensors`` + ``OUT/NAME.json``, the same concept file
``train`` writes: ``ask``, ``generate``, ``eval`` and ``train concept.init_from=FILE`` take it.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def run(args: argparse.Namespace) -> None:
    """Check the encoder and the folder, load the model, encode, and name the file written."""
    import torch

    from yochameleon.backends import LoadOptions, load_backend
    from yochameleon.data.concept_folder import ConceptFolder
    from yochameleon.encoder import encode_concept, read_encoder_file

    start = time.perf_counter()
    # A missing encoder or an empty folder fails before the model loads.
    read_encoder_file(args.encoder)
    folder = ConceptFolder.load(args.concept_dir, min_photos=1)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    backend = load_backend(args.model, LoadOptions(dtype=args.dtype, device=device))
    name = args.name or folder.name
    path = encode_concept(args.encoder, backend, folder.photo_paths, name, out=f"{args.out}/{name}")
    print(
        f"concept {name}: {path} (+ {path.with_suffix('.json').name}) from "
        f"{len(folder.photo_paths)} photos in {time.perf_counter() - start:.1f}s"
    )


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``encode`` to a top-level ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "encode",
        help="write a concept file from a concept folder's photos with a trained concept encoder",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("concept_dir", help="a concept folder (photos/, optional concept.yaml)")
    p.add_argument("--encoder", required=True, help="encoder file (RUN/encoder.safetensors)")
    p.add_argument("--model", required=True, help="the base model the encoder was trained on")
    p.add_argument("--out", required=True, help="folder for NAME.safetensors + NAME.json")
    p.add_argument("--name", default=None, help="concept name (default: concept.yaml's or the folder's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)
    return p
