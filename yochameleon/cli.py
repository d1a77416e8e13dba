"""The ``yochameleon`` command. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from yochameleon.errors import ConfigError, YoChameleonError


def _cmd_make_tiny(args: argparse.Namespace) -> None:
    if args.family == "chameleon":
        from yochameleon.backends.tiny import make_tiny

        out = make_tiny(args.out_dir, size=args.size, seed=args.seed)
    elif args.size != "tiny":
        raise ConfigError(f"--size {args.size} exists for the chameleon family only")
    elif args.family == "emu3":
        from yochameleon.backends.tiny_emu3 import make_tiny_emu3

        out = make_tiny_emu3(args.out_dir, seed=args.seed)
    else:
        from yochameleon.backends.tiny_janus import make_tiny_janus

        out = make_tiny_janus(args.out_dir, seed=args.seed)
    print(f"wrote a random-init {args.size} {args.family} model to {out}")


def _cmd_train(args: argparse.Namespace) -> None:
    from yochameleon.config import load_config
    from yochameleon.train.config import TrainConfig
    from yochameleon.train.trainer import Trainer

    cfg = load_config(TrainConfig, args.recipe, args.overrides)
    trainer = Trainer(cfg)
    trainer.setup()
    result = trainer.train(resume=args.resume)
    print(
        f"trained {result.steps} steps; final loss {result.losses[-1]:.4f}"
        if result.losses
        else "nothing to do"
    )
    for name, path in result.concept_files.items():
        print(f"concept {name}: {path} (+ {path.with_suffix('.json').name})")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from yochameleon.data.pipeline import prepare_from_cli

    prepare_from_cli(args)


def _cmd_ask(args: argparse.Namespace) -> None:
    from yochameleon.data.photos import load_image_file
    from yochameleon.infer import PersonalizedModel

    # Read the photo before loading the model: a bad path fails at once.
    image = load_image_file(args.image) if args.image is not None else None
    pm = PersonalizedModel.load(args.model, args.concept, device=args.device, strict=args.strict)
    print(pm.ask(args.question, image=image, force_tokens=args.force_tokens))


def _cmd_generate(args: argparse.Namespace) -> None:
    from yochameleon.infer import PersonalizedModel

    pm = PersonalizedModel.load(args.model, args.concept, device=args.device, strict=args.strict)
    paths = pm.generate_to_dir(args.prompt, args.out, n=args.n, seed=args.seed)
    for p in paths:
        print(p)


_STRICT_HELP = "a <NAME> in the prompt that is not an attached concept is an error, not a warning"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``yochameleon`` command."""
    parser = argparse.ArgumentParser(prog="yochameleon", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a random-init tiny Chameleon-class model (no downloads)")
    p.add_argument("out_dir")
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "anole-tiny"])
    p.add_argument("--family", default="chameleon", choices=["chameleon", "emu3", "janus"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser(
        "train", help="train concept tokens from a recipe: train RECIPE.yaml [key.sub=value ...]"
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir after an interruption"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("prepare", help="build training records and the token cache for a concept folder")
    p.add_argument("concept_dir")
    p.add_argument("--out", required=True, help="data directory to write")
    p.add_argument("--index", default=None, help="FAISS index directory (yochameleon index)")
    p.add_argument("--model", default=None, help="model whose VQ tokens to cache")
    p.add_argument("--n-g", type=int, default=16)
    p.add_argument("--soft-prompt-form", default="paper", choices=["paper", "code"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("ask", help="ask a personalized model a question")
    p.add_argument("question")
    p.add_argument("--model", required=True)
    p.add_argument("--concept", action="append", default=[], help="concept file (repeatable)")
    p.add_argument("--image", default=None)
    p.add_argument(
        "--force-tokens",
        action="store_true",
        help="force the u-tokens instead of letting the model emit them",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--strict", action="store_true", help=_STRICT_HELP)
    p.set_defaults(func=_cmd_ask)

    p = sub.add_parser("generate", help="generate images of a concept")
    p.add_argument("prompt")
    p.add_argument("--model", required=True)
    p.add_argument("--concept", action="append", default=[], help="concept file (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--strict", action="store_true", help=_STRICT_HELP)
    p.set_defaults(func=_cmd_generate)

    _register_optional(sub)
    return parser


def _register_optional(sub) -> None:
    """Subcommands owned by the retrieval / eval / toy-world packages."""
    from importlib import import_module

    for module in (
        "yochameleon.retrieval.cli",
        "yochameleon.eval.report",
        "yochameleon.eval.harness",
        "yochameleon.eval.toyworld.cli",
        "yochameleon.eval.bench.cli",
    ):
        try:
            mod = import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("yochameleon"):
                continue
            raise
        if hasattr(mod, "register"):
            mod.register(sub)
    if "bench" not in sub.choices:
        # The retrieval benchmark stands alone when the training benchmark module is absent.
        from yochameleon.retrieval.cli import add_bench_retrieval_args

        bench = sub.add_parser("bench", help="performance benchmarks").add_subparsers(
            dest="bench", required=True
        )
        add_bench_retrieval_args(bench.add_parser("retrieval", help="FAISS build/search time and memory"))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger("yochameleon").warning("%s", message)


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one clear line and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
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


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "Path"]
