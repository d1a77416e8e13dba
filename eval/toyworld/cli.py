"""``yochameleon toyworld ...``: commands of the toy world (``build`` its base artifacts, ``bench`` the methods,
``relations`` the measurement of concepts that know each other, ``encoder`` a concept encoder on its
pretraining identities)."""

from __future__ import annotations

import argparse

__all__ = [
    "add_bench_parser",
    "add_encoder_parser",
    "add_relations_parser",
    "register",
    "run_bench_command",
    "run_build",
    "run_encoder",
    "run_relations_command",
]


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``toyworld`` (with its own sub-commands) to the top-level CLI's subparsers.

    Returns:
        The ``toyworld`` parser, so that other modules can add sub-commands to it.
    """
    parser = subparsers.add_parser(
        "toyworld",
        help=(
            "the procedural toy world: build its base artifacts, benchmark the methods, measure relations, "
            "train an encoder"
        ),
    )
    commands = parser.add_subparsers(dest="toyworld_command", metavar="COMMAND")
    commands.required = True
    build = commands.add_parser(
        "build",
        help="train the VQ tokenizer, base model, embedder and scorer; index the pool; check the gates",
        description="Staged, cached and resumable: an interrupted build resumes at its first unfinished stage.",
    )
    build.add_argument("--out", default=None, help="output folder (default: eval/toyworld/artifacts)")
    build.add_argument("--seed", type=int, default=0, help="seeds every training run and photo (default 0)")
    build.add_argument("--reduced", action="store_true", help="fewer steps, same code; gates not enforced")
    build.add_argument(
        "--keep-going",
        action="store_true",
        help="on a missed gate, still run every stage and write the artifacts and report, then fail",
    )
    build.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest on a busy 2-core machine)",
    )
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=run_build)
    add_bench_parser(commands)
    add_encoder_parser(commands)
    add_relations_parser(commands)
    return parser


def _method_list(text: str) -> list[str]:
    # ``--methods none,yochameleon`` and ``--methods none yochameleon`` both work.
    return [name for name in text.split(",") if name]


def add_bench_parser(commands) -> argparse.ArgumentParser:
    """Add ``bench`` to the ``toyworld`` sub-commands and return its parser."""
    from .bench import QUICK_DEFAULTS, bench_methods

    bench = commands.add_parser(
        "bench",
        help="the quality benchmark: every method on held-out concepts, with CIs, table and plots",
        description=(
            "Personalize N concepts drawn from the held-out identities with every method, K seeds each; "
            "write the results-schema summary (paired-bootstrap CIs vs yochameleon), report.md and plots. "
            f"Default methods: {', '.join(bench_methods())}. yochameleon_zeroshot and yochameleon_warmstart "
            "run when named, with --encoder."
        ),
    )
    bench.add_argument("--json", required=True, metavar="OUT.json", help="the summary JSON to write")
    bench.add_argument("--concepts", type=int, default=None, metavar="N", help="concepts (default 8)")
    bench.add_argument(
        "--concept-seed", type=int, default=None, metavar="S", help="chooses the concepts (default 0)"
    )
    bench.add_argument("--seeds", type=int, default=None, metavar="K", help="seeds per concept (default 2)")
    bench.add_argument(
        "--methods",
        nargs="+",
        type=_method_list,
        default=None,
        metavar="METHOD",
        help="methods to run, space- or comma-separated (default: all)",
    )
    bench.add_argument(
        "--split",
        choices=("heldout", "dev"),
        default=None,
        help="identities to draw concepts from: heldout (default, reported numbers) or dev (tuning)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help=(
            f"{QUICK_DEFAULTS['n_concepts']} concepts, {QUICK_DEFAULTS['seeds']} seed, methods "
            f"{' and '.join(QUICK_DEFAULTS['methods'])} (explicit options still win)"
        ),
    )
    bench.add_argument(
        "--artifacts",
        default=None,
        metavar="DIR",
        help="toy-world artifacts (default: eval/toyworld/artifacts)",
    )
    bench.add_argument(
        "--report-dir", default=None, metavar="DIR", help="report.md and plots (default: the JSON's folder)"
    )
    bench.add_argument(
        "--work", default=None, metavar="DIR", help="pool, index, concepts, tests, runs (default: OUT_work/)"
    )
    bench.add_argument(
        "--recipe", default=None, help="training recipe (default: recipes/toyworld-bench.yaml)"
    )
    bench.add_argument(
        "--override",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="recipe override, repeatable (choose hyper-parameters with --split dev only)",
    )
    bench.add_argument(
        "--pool-size", type=int, default=None, help="retrieval pool photos (default 10000; 1000 with --quick)"
    )
    bench.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples per CI (default 2000)")
    bench.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1: best on a busy 2-core machine)",
    )
    bench.add_argument(
        "--diagnose",
        action="store_true",
        help=(
            'per trained method: "yes" rates on training photos, new photos, twins and random scenes, '
            "row drift, open answers and per-task training loss (diagnostics.json beside the report)"
        ),
    )
    bench.add_argument(
        "--encoder",
        default=None,
        metavar="FILE",
        help=(
            "concept-encoder file for yochameleon_zeroshot / yochameleon_warmstart (required with them; "
            "train one with `yochameleon toyworld encoder`)"
        ),
    )
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.set_defaults(func=run_bench_command)
    return bench


def bench_config_from_args(args: argparse.Namespace):
    """The :class:`~.bench.BenchConfig` that ``toyworld bench`` options describe.

    Raises:
        BenchError: a bad option (an unknown method is named, with the valid ones).
    """
    from .bench import BenchConfig

    methods = [m for group in args.methods for m in group] if args.methods else None
    return BenchConfig.create(
        quick=args.quick,
        artifacts=args.artifacts,
        n_concepts=args.concepts,
        concept_seed=args.concept_seed,
        seeds=args.seeds,
        methods=methods,
        split=args.split,
        recipe=args.recipe,
        overrides=args.override,
        pool_size=args.pool_size,
        n_boot=args.n_boot,
        threads=args.threads,
        diagnose=args.diagnose or None,
        encoder=args.encoder,
    )


def run_bench_command(args: argparse.Namespace) -> int:
    """Run ``toyworld bench``; the table goes to stdout, progress and timings to stderr.

    Raises:
        BenchError: a bad option or missing artifacts; the top-level CLI prints it as one ``error:`` line.
    """
    from yochameleon.eval.report import markdown_table

    from .bench import run_bench

    config = bench_config_from_args(args)
    summary = run_bench(
        config, args.json, report_dir=args.report_dir, work_dir=args.work, progress=not args.quiet
    )
    print(markdown_table(summary))
    return 0


def add_relations_parser(commands) -> argparse.ArgumentParser:
    """Add ``relations`` to the ``toyworld`` sub-commands and return its parser."""
    from .relations import QUICK_DEFAULTS

    relations = commands.add_parser(
        "relations",
        help="relations between two concepts: trained together, trained apart then related, text prompt",
        description=(
            "Pairs of identities with a stated relation and facts no photo shows: relation and fact QA, "
            "recognition with both concepts attached against each alone, two-concept generation; per case "
            "(joint, apart, text_prompt) with 95% bootstrap CIs. Writes OUT.json, OUT.md (the table) and "
            "OUT_contact.png (the two-concept images)."
        ),
    )
    relations.add_argument("--json", required=True, metavar="OUT.json", help="the summary JSON to write")
    relations.add_argument(
        "--split",
        choices=("heldout", "dev"),
        default=None,
        help="identities to draw pairs from: heldout (default, reported numbers) or dev (tuning)",
    )
    relations.add_argument("--pairs", type=int, default=None, metavar="N", help="pairs (default 4)")
    relations.add_argument(
        "--pair-seed", type=int, default=None, metavar="S", help="chooses the pairs (default 0)"
    )
    relations.add_argument("--seeds", type=int, default=None, metavar="K", help="seeds per pair (default 2)")
    relations.add_argument(
        "--relate-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the apart case's joint step (default 300)",
    )
    relations.add_argument(
        "--quick",
        action="store_true",
        help=(
            f"{QUICK_DEFAULTS['n_pairs']} pair, {QUICK_DEFAULTS['seeds']} seed, one epoch, "
            f"{QUICK_DEFAULTS['relate_steps']} relate steps, small test sets (explicit options still win)"
        ),
    )
    relations.add_argument(
        "--artifacts",
        default=None,
        metavar="DIR",
        help="toy-world artifacts (default: eval/toyworld/artifacts)",
    )
    relations.add_argument(
        "--work",
        default=None,
        metavar="DIR",
        help="pool, index, concepts, data, runs, images (default: OUT_work/); a matching pool there is reused",
    )
    relations.add_argument(
        "--override",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="training recipe override, repeatable (choose with --split dev only)",
    )
    relations.add_argument(
        "--pool-size", type=int, default=None, help="retrieval pool photos (default 10000; 1000 with --quick)"
    )
    relations.add_argument(
        "--n-boot", type=int, default=None, help="bootstrap resamples per CI (default 2000)"
    )
    relations.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1: best on a busy 2-core machine)",
    )
    relations.add_argument("--quiet", action="store_true", help="no progress bars")
    relations.set_defaults(func=run_relations_command)
    return relations


def relations_config_from_args(args: argparse.Namespace):
    """The :class:`~.relations.RelationsConfig` that ``toyworld relations`` options describe.

    Raises:
        BenchError: a bad option.
    """
    from .relations import QUICK_DEFAULTS, RelationsConfig

    overrides = args.override
    if args.quick and overrides:
        overrides = [*QUICK_DEFAULTS["overrides"], *overrides]  # --quick's one epoch stays unless overridden
    return RelationsConfig.create(
        quick=args.quick,
        artifacts=args.artifacts,
        split=args.split,
        n_pairs=args.pairs,
        pair_seed=args.pair_seed,
        seeds=args.seeds,
        relate_steps=args.relate_steps,
        overrides=overrides,
        pool_size=args.pool_size,
        n_boot=args.n_boot,
        threads=args.threads,
    )


def run_relations_command(args: argparse.Namespace) -> int:
    """Run ``toyworld relations``; the table goes to stdout, progress and timings to stderr.

    Raises:
        BenchError: a bad option or missing artifacts; the top-level CLI prints it as one ``error:`` line.
    """
    from .relations import markdown_relations, run_relations

    summary = run_relations(
        relations_config_from_args(args), args.json, work_dir=args.work, progress=not args.quiet
    )
    print(markdown_relations(summary), end="")
    return 0


def add_encoder_parser(commands) -> argparse.ArgumentParser:
    """Add ``encoder`` to the ``toyworld`` sub-commands and return its parser."""
    encoder = commands.add_parser(
        "encoder",
        help="train a concept encoder on pretraining identities (for yochameleon_zeroshot / _warmstart)",
        description=(
            "Write concept folders for N pretraining identities (never development or held-out ones), prepare "
            "their data with the benchmark's pool less their own photos, write OUT/encoder-recipe.yaml and "
            "train the encoder: OUT/run/encoder.safetensors + .json."
        ),
    )
    encoder.add_argument("--out", required=True, metavar="DIR", help="work folder; the encoder is DIR/run/")
    encoder.add_argument(
        "--identities", type=int, default=128, metavar="N", help="pretraining identities (default 128)"
    )
    encoder.add_argument("--identity-seed", type=int, default=0, metavar="S", help="chooses them (default 0)")
    encoder.add_argument(
        "--steps", type=int, default=None, metavar="S", help="optimizer steps (default: the recipe's epochs)"
    )
    encoder.add_argument(
        "--pool-from",
        default=None,
        metavar="DIR",
        help="a benchmark work folder whose pool/, index/ and pool.json are copied (read only) when DIR has none",
    )
    encoder.add_argument(
        "--artifacts",
        default=None,
        metavar="DIR",
        help="toy-world artifacts (default: eval/toyworld/artifacts)",
    )
    encoder.add_argument(
        "--recipe", default=None, help="encoder recipe (default: recipes/toyworld-encoder.yaml)"
    )
    encoder.add_argument(
        "--override", action="append", default=None, metavar="KEY=VALUE", help="recipe override, repeatable"
    )
    encoder.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    encoder.add_argument("--resume", action="store_true", help="continue the run in DIR/run")
    encoder.add_argument("--quiet", action="store_true", help="no progress bars")
    encoder.set_defaults(func=run_encoder)
    return encoder


def run_encoder(args: argparse.Namespace) -> int:
    """Run ``toyworld encoder`` and print where the encoder is.

    Raises:
        BenchError: a bad option or missing artifacts; the top-level CLI prints it as one ``error:`` line.
    """
    from .encoder import ToyEncoderConfig, train_toy_encoder

    settings = {
        "artifacts": args.artifacts,
        "recipe": args.recipe,
        "overrides": args.override,
        "pool_from": args.pool_from,
    }
    config = ToyEncoderConfig(
        out=args.out,
        n_identities=args.identities,
        identity_seed=args.identity_seed,
        steps=args.steps,
        threads=args.threads,
        **{k: v for k, v in settings.items() if v is not None},
    )
    result = train_toy_encoder(config, resume=args.resume, progress=not args.quiet)
    last = f"; last loss {result.losses[-1]:.4f}" if result.losses else ""
    print(
        f"toyworld encoder: {result.steps} steps on {len(result.identities)} identities{last}; {result.encoder_file}"
    )
    return 0


def run_build(args: argparse.Namespace) -> int:
    """Run ``toyworld build`` and print a summary line.

    Raises:
        BuildError: a bad setting, a failed stage or (full build) a missed gate; the top-level CLI prints
            it as one ``error:`` line and exits with status 2.
    """
    from .build import BuildConfig, build

    config = BuildConfig.create(
        out=args.out, seed=args.seed, reduced=args.reduced, threads=args.threads, keep_going=args.keep_going
    )
    report = build(config, progress=not args.quiet)
    passed = all(g["passed"] for g in report["gates"].values())
    print(
        f"toyworld build: {'all gates passed' if passed else 'gates missed (reduced build)'}; "
        f"{report['total_seconds']:.0f}s; artifacts in {config.out}"
    )
    return 0
