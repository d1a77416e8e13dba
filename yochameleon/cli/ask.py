"""``yochameleon ask QUESTION --model M --concept FILE [--image PHOTO]``."""

from __future__ import annotations

import argparse
from typing import Any

STRICT_HELP = "a <NAME> in the prompt that is not an attached concept is an error, not a warning"


def run(args: argparse.Namespace) -> None:
    """Answer one question with the concepts attached."""
    from yochameleon.data.photos import load_image_file
    from yochameleon.infer import PersonalizedModel

    # Read the photo before loading the model: a bad path fails at once.
    image = load_image_file(args.image) if args.image is not None else None
    pm = PersonalizedModel.load(args.model, args.concept, device=args.device, strict=args.strict)
    print(pm.ask(args.question, image=image, force_tokens=args.force_tokens, related=not args.no_related))


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``ask`` to a top-level ``add_subparsers()`` object."""
    p = subparsers.add_parser("ask", help="ask a personalized model a question")
    p.add_argument("question")
    p.add_argument("--model", required=True)
    p.add_argument("--concept", action="append", default=[], help="concept file (repeatable)")
    p.add_argument("--image", default=None)
    p.add_argument(
        "--force-tokens",
        action="store_true",
        help="force the u-tokens instead of letting the model emit them",
    )
    p.add_argument(
        "--no-related",
        action="store_true",
        help="leave out the concepts related to those the question names (their concept files' relations)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p.set_defaults(func=run)
    return p
