"""``yochameleon eval --model M --method NAME [...] --concept DIR --test-dir DIR --out DIR``.

Each method is fitted on the concept folder, scored by :func:`yochameleon.eval.harness.evaluate`,
and the records are written as one summary with its report.

CLIP-I and MyVLM's concept head use one embedder: the OpenCLIP model given by ``--pretrained`` or
``--weights`` / ``--model-config``, else the one stored with ``--index``. The test embedder (not
CLIP) is used only with ``--embedder test``; the report names the embedder either way.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from yochameleon.baselines import method_names


def run(args: argparse.Namespace) -> None:
    """Fit and score every ``--method`` in turn, then write and print the report."""
    from yochameleon.backends import LoadOptions, load_backend
    from yochameleon.baselines import ConceptData, build_method
    from yochameleon.baselines.encoded import ENCODER_METHODS
    from yochameleon.data.concept_folder import ConceptFolder
    from yochameleon.errors import ConfigError
    from yochameleon.eval.harness import TestSet, evaluate
    from yochameleon.eval.report import markdown_table, write_report
    from yochameleon.eval.schema import summarize
    from yochameleon.retrieval import resolve_embedder

    needs_encoder = [m for m in args.method if m in ENCODER_METHODS]
    if needs_encoder and not args.encoder:
        raise ConfigError(f"--method {needs_encoder[0]} needs --encoder (a concept-encoder file)")
    # Before the model loads: a missing or refused embedder fails at once.
    embedder = resolve_embedder(
        args.embedder,
        model=args.clip_model,
        pretrained=args.pretrained,
        weights=args.weights,
        model_config=args.model_config,
        index_dir=args.index,
        device=args.device,
    )
    # The test set and the concept folder too: a bad path inside them is refused before a 7B loads.
    if args.yollava:
        test = TestSet.from_yollava(args.test_dir, args.yollava, args.visual_qa, args.text_qa)
    else:
        test = TestSet.load(args.test_dir)
    folder = ConceptFolder.load(args.concept)
    backend = load_backend(args.model, LoadOptions(device=args.device))
    data = ConceptData(
        folder.name,
        folder.root,
        [p.path for p in folder.photos],
        folder.description,
        Path(args.data_dir) if args.data_dir else None,
        Path(args.index) if args.index else None,
    )
    records = []
    for name in args.method:
        options: dict[str, Any] = {}
        if name.startswith(("yochameleon", "yollava")):
            options = {"train": {"optim": {"epochs": args.epochs}}}
        if name in ENCODER_METHODS:
            options["encoder"] = args.encoder
        elif name == "myvlm":
            options = {"embedder": embedder}
        method = build_method(name, backend, **options)
        method.fit(data, Path(args.out) / "work")
        records.append(evaluate(method, test, folder.name, args.seed, data.photos, embedder))
        method.close()
    config = {"model": args.model, "test_dir": str(args.test_dir), "embedder": embedder.identity}
    summary = summarize(records, config)
    write_report(summary, args.out)
    print(markdown_table(summary))


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to a top-level ``add_subparsers()`` object.

    ``--method`` takes its choices from :func:`yochameleon.baselines.method_names`, so ``eval --help``
    lists them and a misspelt name is refused while parsing, before any model loads.
    """
    names = method_names()
    p = subparsers.add_parser("eval", help="evaluate methods on a concept's test directory")
    p.add_argument("--model", required=True)
    p.add_argument(
        "--method",
        action="append",
        required=True,
        choices=names,
        metavar="METHOD",
        help=f"method name (repeatable), one of: {', '.join(names)}",
    )
    p.add_argument("--concept", required=True, help="concept folder")
    p.add_argument("--data-dir", default=None, help="prepared data of the concept (yochameleon prepare)")
    p.add_argument(
        "--index",
        default=None,
        help="retrieval index for trained methods; its embedder scores CLIP-I unless one is given",
    )
    p.add_argument(
        "--test-dir", required=True, help="our test layout, or a Yo'LLaVA dataset root with --yollava"
    )
    p.add_argument(
        "--yollava", default=None, metavar="NAME", help="read --test-dir as the Yo'LLaVA benchmark layout"
    )
    p.add_argument("--visual-qa", default=None, help="Yo'LLaVA visual QA JSON (with --yollava)")
    p.add_argument("--text-qa", default=None, help="Yo'LLaVA / Yo'Chameleon text QA JSON (with --yollava)")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--encoder",
        default=None,
        metavar="FILE",
        help="concept-encoder file for yochameleon_zeroshot / yochameleon_warmstart (yochameleon encoder train)",
    )
    p.add_argument("--device", default="cpu")
    clip = p.add_argument_group(
        "image embedder",
        "the model behind CLIP-I and MyVLM's concept head (default: the one stored with --index)",
    )
    clip.add_argument(
        "--embedder",
        default="open_clip",
        choices=["open_clip", "test"],
        help="open_clip, or test for the test embedder (a random projection of thumbnails, not CLIP)",
    )
    clip.add_argument(
        "--clip-model", default=None, metavar="NAME", help="open_clip model name, e.g. ViT-H-14"
    )
    weights = clip.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", default=None, metavar="TAG", help="open_clip pretrained tag")
    weights.add_argument("--weights", default=None, metavar="FILE", help="local open_clip checkpoint file")
    clip.add_argument(
        "--model-config", default=None, metavar="JSON", help="custom open_clip architecture JSON"
    )
    p.set_defaults(func=run)
    return p
