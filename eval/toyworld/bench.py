"""``yochameleon toyworld bench``: the toy world's quality benchmark (issue 9, DESIGN §6).

Every personalization method runs on ``N`` concepts that a concept seed draws from the held-out identities
of world 0 (``--split dev`` draws development identities instead, for tuning), with ``K`` seeds each:

1. **Pool and index**, once per run: ``pool_size`` world photos (pretraining identities and clutter only)
   indexed with the toy OpenCLIP embedder (kept in the work folder and reused while nothing changed).
2. **Per concept**, once: its folder of 4 training photos (``concept.yaml``, ``qa.jsonl``).
   **Per concept and seed**: a test directory in the harness layout (positives in new scenes, hard-negative
   twins, easy negatives, visual QA where the concept shares a scene with a twin or another object, text
   QA) and the prepared training data, shared by every method that trains.
3. **Per concept, seed and method**: fit the method on the shared base and score it with
   :func:`yochameleon.eval.harness.evaluate`: recognition (positive / hard / easy / weighted), visual and
   text QA, CLIP-I through the toy embedder, ``gen_fidelity`` (the scorer's identity-correct rate over the
   generated images, mirror accepted: training flips photos) and prompt tokens.
4. :func:`yochameleon.eval.schema.summarize` turns the records into the summary JSON (means, 95% bootstrap
   CIs, paired-bootstrap differences of every method versus ``yochameleon``), and
   :func:`yochameleon.eval.report.write_report` writes the paper-style table and plots beside it.

The encoder methods ``yochameleon_zeroshot`` and ``yochameleon_warmstart``
(:mod:`yochameleon.baselines.encoded`) run only when asked for by name and need a concept encoder trained
on this base (``encoder``, ``--encoder``; e.g. ``yochameleon toyworld encoder``); the run refuses an
encoder whose sidecar lists a drawn concept or one of its photos among its training identities.

A seed sets the training seed (initialisation, data sampling, batch order), the test set, the option
shuffling and the image sampling, so ``(concept, seed)`` pairs are the unit the confidence intervals
resample. Training hyper-parameters live in ``recipes/toyworld-bench.yaml``, chosen on the development
split only.

Example:
    >>> config = BenchConfig.create(quick=True, artifacts="eval/toyworld/artifacts")
    >>> summary = run_bench(config, "outputs/bench/quick.json")
    >>> sorted(summary["methods"]), summary["reference"], summary["config"]["split"]
    (['none', 'yochameleon'], 'yochameleon', 'heldout')
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from yochameleon.config import recipe_path
from yochameleon.errors import ConfigError

from .build import default_out_dir, recorded_path
from .pretrain import EMBEDDER_NAME
from .world import ConceptTestSet, Identity, ToyWorld, WorldConfig, caption, full_caption

__all__ = [
    "BENCH_RECIPE",
    "QUICK_DEFAULTS",
    "QUICK_METHODS",
    "REFERENCE",
    "REQUIRED_ARTIFACTS",
    "SPLITS",
    "BenchConfig",
    "BenchError",
    "bench_methods",
    "bench_summary",
    "check_artifacts",
    "check_methods",
    "draw_concepts",
    "encoder_leaks",
    "missing_artifacts",
    "per_concept_timings",
    "prepare_pool",
    "recipe_config",
    "run_bench",
    "valid_methods",
    "write_contact_sheets",
    "write_test_dir",
]

BENCH_RECIPE = recipe_path("toyworld-bench")  # shipped as package data
QUICK_METHODS: tuple[str, ...] = ("none", "yochameleon")
# What the summary calls the generation-fidelity scorer: identity (four factors + mark colours) read by
# the toy world's own scorer, never by the generating model.
FIDELITY_NAME = "toyworld-scorer:identity"
REFERENCE = "yochameleon"
SPLITS: tuple[str, ...] = ("heldout", "dev")
REQUIRED_ARTIFACTS: tuple[str, ...] = (
    "base/config.json",
    f"embedder/{EMBEDDER_NAME}.json",
    f"embedder/{EMBEDDER_NAME}.safetensors",
    "scorer.safetensors",
    "scorer.json",
)
# Methods that learn from the prepared training data (retrieved negatives, soft positives); the zero-shot
# encoder reads only the photos.
_NEEDS_DATA = ("myvlm", "yollava", "yochameleon")
_NO_DATA = ("yochameleon_zeroshot",)
# --quick: what the issue asks for (2 concepts, 1 seed, none vs yochameleon).
# Its pool is smaller too: indexing 10,000 photos alone takes about a minute of the five.
QUICK_DEFAULTS: dict[str, Any] = {"n_concepts": 2, "seeds": 1, "methods": QUICK_METHODS, "pool_size": 1000}


class BenchError(ConfigError):
    """The benchmark got a bad setting, or its artifacts are missing."""


def valid_methods() -> list[str]:
    """Every method name the benchmark accepts (the harness's names, ablations included)."""
    from yochameleon.baselines import method_names

    return method_names()


def bench_methods() -> tuple[str, ...]:
    """The default rows, in table order: every method of the harness, ``yochameleon`` and its
    ``yochameleon_*`` ablations last (derived, so a method added to the harness is benchmarked too).

    The encoder methods (``yochameleon_zeroshot``, ``yochameleon_warmstart``) are not default rows: they
    need an encoder file, and the default run needs nothing but the toy-world artifacts. Name them in
    ``methods`` with ``encoder`` set.
    """
    from yochameleon.baselines.encoded import ENCODER_METHODS

    names = [name for name in valid_methods() if name not in ENCODER_METHODS]
    ours = [name for name in names if name == REFERENCE or name.startswith(f"{REFERENCE}_")]
    return tuple([name for name in names if name not in ours] + ours)


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise BenchError(f"{name} must be an integer >= {minimum}, got {value!r}")


class RecipeRun:
    """What a toy-world measurement config shares: the quick variant, its seeds, training configs, JSON.

    A frozen dataclass mixes it in and has ``recipe``, ``overrides``, ``artifacts`` and ``seeds``;
    ``QUICK`` holds its ``--quick`` sizes and ``KIND`` names it in messages.
    """

    QUICK: ClassVar[dict[str, Any]] = {}
    KIND: ClassVar[str] = "measurement"

    @classmethod
    def create(cls, quick: bool = False, **settings: Any):
        """The default run, or with ``quick`` its few-minute smoke version; ``None`` settings are skipped.

        Settings given explicitly win over ``quick``'s sizes (``--quick --concepts 3`` draws 3 concepts).

        Raises:
            BenchError: an unknown setting, or one ``__post_init__`` refuses.
        """
        values: dict[str, Any] = dict(cls.QUICK) if quick else {}
        values.update({k: v for k, v in settings.items() if v is not None})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise BenchError(f"unknown {cls.KIND} settings {unknown}")
        return cls(quick=quick, **values)

    @property
    def seed_list(self) -> list[int]:
        """The seeds every unit runs with."""
        return list(range(self.seeds))

    def train_config(self, seed: int, base: str | Path | None = None):
        """The recipe with the overrides, ``seed`` (training and data sampling) and the base model path.

        Raises:
            ConfigError: the recipe or an override is invalid.
        """
        return recipe_config(self.recipe, self.overrides, seed, self.artifacts, base)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class BenchConfig(RecipeRun):
    """Everything one benchmark run does; the summary JSON records it.

    Attributes:
        artifacts: the toy-world artifacts folder (``base/``, ``embedder/``, ``scorer.*``).
        n_concepts: concepts drawn from ``split`` by ``concept_seed``.
        concept_seed: chooses the concepts (a larger ``n_concepts`` extends the same list).
        seeds: seeds ``0 .. seeds-1`` per concept (training, test set, option order, sampling).
        methods: method names (see :func:`valid_methods`), in table order.
        split: ``heldout`` for reported numbers, ``dev`` for tuning.
        world_seed: the world whose identities the base was pretrained around (0 for the committed base).
        n_photos: training photos per concept.
        n_positives, n_hard, n_easy, n_vqa: test items per concept and seed (text QA: one per attribute).
        n_generated: images generated per method, concept and seed (CLIP-I and ``gen_fidelity``).
        pool_size, pool_seed: the retrieval pool of world photos. 10,000, the build's size: from 1,000
            photos a concept's retrieved neighbours were mostly objects of other descriptions and few of
            its twins, so its hard negatives hardly asked for the marks.
        recipe: the training recipe of every trained method (data size, epochs, learning rate).
        overrides: ``key=value`` overrides of the recipe (tune them on ``split="dev"`` only).
        n_boot: bootstrap resamples of every CI.
        threads: torch CPU threads.
        quick: the run was asked for with ``--quick`` (recorded; :meth:`create` applies its sizes).
        diagnose: after scoring each trained method, take the diagnostic looks at its concept
            (:func:`~.diagnose.trained_diagnostics`: "yes" rates on training photos, new photos, twins
            and random scenes; row drift; open answers; per-task training loss) and write them to
            ``diagnostics.json`` beside the report.
        encoder: the concept-encoder file (trained on this base, e.g. by ``yochameleon toyworld encoder``)
            that ``yochameleon_zeroshot`` and ``yochameleon_warmstart`` encode with; required only when
            one of them is among ``methods``. Its token layout must be the recipe's.

    Raises:
        BenchError: (in ``__post_init__``) a non-positive size, an unknown split, more concepts than the
            split holds, an unknown or repeated method (the valid names are listed), no recipe file, an
            encoder method without ``encoder``, or an encoder that is missing or has another token layout.
        ConfigError: the recipe or an override does not make a valid training config.
    """

    artifacts: str = str(default_out_dir())
    n_concepts: int = 8
    concept_seed: int = 0
    seeds: int = 2
    methods: tuple[str, ...] = field(default_factory=bench_methods)
    split: str = "heldout"
    world_seed: int = 0
    n_photos: int = 4
    n_positives: int = 10
    n_hard: int = 10
    n_easy: int = 10
    n_vqa: int = 6
    n_generated: int = 4
    pool_size: int = 10000
    pool_seed: int = 1
    recipe: str = str(BENCH_RECIPE)
    overrides: tuple[str, ...] = field(default_factory=tuple)
    n_boot: int = 2000
    threads: int = 1
    quick: bool = False
    diagnose: bool = False
    encoder: str | None = None

    QUICK: ClassVar[dict[str, Any]] = QUICK_DEFAULTS
    KIND: ClassVar[str] = "benchmark"

    def __post_init__(self) -> None:
        # Lists from JSON or argparse become tuples so the frozen config stays hashable.
        object.__setattr__(self, "artifacts", recorded_path(self.artifacts))
        object.__setattr__(self, "recipe", recorded_path(self.recipe))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        for name in ("n_concepts", "seeds", "n_photos", "n_positives", "n_generated", "n_boot", "threads"):
            _positive_int(name, getattr(self, name))
        for name in ("concept_seed", "world_seed", "n_hard", "n_easy", "n_vqa", "pool_seed"):
            _positive_int(name, getattr(self, name), minimum=0)
        if self.n_photos < 3:
            raise BenchError(f"a concept folder needs at least 3 photos, got n_photos={self.n_photos}")
        if self.n_hard + self.n_easy < 1:
            raise BenchError("recognition needs negatives: n_hard + n_easy must be at least 1")
        _positive_int("pool_size", self.pool_size, minimum=50)
        if self.split not in SPLITS:
            raise BenchError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        available = WorldConfig().n_heldout if self.split == "heldout" else WorldConfig().n_dev
        if self.n_concepts > available:
            raise BenchError(
                f"the {self.split} split has {available} identities; cannot draw {self.n_concepts} concepts"
            )
        check_methods(self.methods)
        if not Path(self.recipe).is_file():
            raise BenchError(f"benchmark recipe {self.recipe} does not exist")
        train = self.train_config(0)  # a bad recipe or override fails now, not after the pool is indexed
        self._check_encoder(train)

    def _check_encoder(self, train) -> None:
        from yochameleon.baselines.encoded import ENCODER_METHODS, check_encoder_layout
        from yochameleon.errors import ConceptError

        if self.encoder is not None:
            object.__setattr__(self, "encoder", str(self.encoder))
        wanting = [m for m in self.methods if m in ENCODER_METHODS]
        if wanting and not self.encoder:
            raise BenchError(
                f"method(s) {', '.join(wanting)} need a concept encoder: give --encoder FILE (train one on "
                "pretraining identities with `yochameleon toyworld encoder`), or leave them out"
            )
        if self.encoder and wanting:
            c = train.concept
            try:
                check_encoder_layout(self.encoder, c.n_g, c.n_u, c.shared)
            except (ConceptError, ConfigError) as exc:
                raise BenchError(str(exc)) from exc


def recipe_config(
    recipe: str | Path,
    overrides: Sequence[str],
    seed: int,
    artifacts: str | Path,
    base: str | Path | None = None,
):
    """``recipe`` with ``overrides``, ``seed`` (training and data sampling) and the base model path
    (default ``artifacts/base``): the training config of every toy-world measurement that trains.

    Raises:
        ConfigError: the recipe or an override is invalid.
    """
    from yochameleon.config import load_config
    from yochameleon.train.config import TrainConfig

    base = Path(base) if base is not None else Path(artifacts) / "base"
    return load_config(
        TrainConfig,
        recipe,
        [*overrides, f"seed={int(seed)}", f"data.seed={int(seed)}", f"model.name_or_path={base}"],
    )


def check_methods(methods: Sequence[str]) -> None:
    """Refuse an empty, repeated or unknown method name, listing the valid ones.

    Raises:
        BenchError: what is wrong, with the valid names.
    """
    valid = valid_methods()
    if not methods:
        raise BenchError(f"no methods selected; choose from {', '.join(valid)}")
    unknown = [m for m in methods if m not in valid]
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    repeated = sorted({m for m in methods if list(methods).count(m) > 1})
    if repeated:
        raise BenchError(f"method(s) listed twice: {', '.join(repeated)}")


# ---- artifacts ---------------------------------------------------------------------------------------
def missing_artifacts(artifacts: str | Path) -> list[str]:
    """The required artifact files (relative paths) that ``artifacts`` lacks."""
    root = Path(artifacts)
    return [name for name in REQUIRED_ARTIFACTS if not (root / name).is_file()]


def check_artifacts(artifacts: str | Path) -> Path:
    """Return the artifacts folder, or say which files are missing and how to build them.

    Raises:
        BenchError: a required file is missing.
    """
    root = Path(artifacts)
    missing = missing_artifacts(root)
    if missing:
        raise BenchError(
            f"toy-world artifacts missing in {root}: {', '.join(missing)}. Build them with "
            f"`yochameleon toyworld build --out {root}` (add --reduced for a fast, weak development base), "
            "or point --artifacts at a finished build"
        )
    return root


# ---- concepts and test sets --------------------------------------------------------------------------
def draw_concepts(
    n: int, concept_seed: int, split: str = "heldout", world: ToyWorld | None = None
) -> list[Identity]:
    """``n`` distinct identities of ``split`` chosen by ``concept_seed``.

    The draw is a seeded permutation of the split, so ``n`` concepts are the first ``n`` of a longer draw
    with the same seed (``--quick``'s two concepts are among the default eight).

    Raises:
        BenchError: an unknown split (pretraining identities are never drawn), or more concepts than it holds.
    """
    if split not in SPLITS:
        raise BenchError(f"concepts come from the {' or '.join(SPLITS)} split, not {split!r}")
    world = world or ToyWorld(0)
    identities = world.splits[split]
    if not 1 <= n <= len(identities):
        raise BenchError(f"cannot draw {n} concepts from the {len(identities)} {split} identities")
    rng = np.random.default_rng([world.world_seed, int(concept_seed), 0xBE2C])
    chosen = [identities[int(i)] for i in rng.permutation(len(identities))[:n]]
    # The splits are disjoint by construction; a concept the base saw in pretraining would void the numbers.
    leaked = set(chosen) & set(world.splits["pretrain"])
    if leaked:
        raise BenchError(f"{len(leaked)} drawn concepts are pretraining identities")
    return chosen


def _save_images(images: Iterable, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:03d}.png")


def write_test_dir(tests: ConceptTestSet, out: str | Path) -> Path:
    """Write a concept's test set in the harness layout (:class:`yochameleon.eval.harness.TestSet`).

    ``positives/``, ``negatives_hard/`` (twins), ``negatives_easy/``, ``vqa/`` with ``vqa.json`` and
    ``text_qa.json``; ``identities.json`` keeps every photo's identity for inspection.

    Returns:
        The folder.
    """
    root = Path(out)
    if root.exists():
        shutil.rmtree(root)
    _save_images(tests.positives, root / "positives")
    _save_images(tests.hard_negatives, root / "negatives_hard")
    _save_images(tests.easy_negatives, root / "negatives_easy")
    vqa = []
    _save_images((item.image for item in tests.vqa), root / "vqa")
    for i, item in enumerate(tests.vqa):
        rel = f"vqa/{i:03d}.png"
        vqa.append(
            {
                "image": rel,
                "question": item.question,
                "options": item.options,
                "answer": item.answer,
                "kind": item.kind,
            }
        )
    text = [
        {"question": t.question, "options": t.options, "answer": t.answer, "factor": t.factor}
        for t in tests.text_qa
    ]
    (root / "vqa.json").write_text(json.dumps(vqa, indent=1) + "\n")
    (root / "text_qa.json").write_text(json.dumps(text, indent=1) + "\n")
    identities = {
        "concept": tests.identity.to_dict(),
        "negatives_hard": [t.to_dict() for t in tests.hard_negative_identities],
        "negatives_easy": [t.to_dict() if t else None for t in tests.easy_negative_identities],
    }
    (root / "identities.json").write_text(json.dumps(identities) + "\n")
    return root


# ---- pool and index ----------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    from yochameleon.retrieval import sha256_file

    return sha256_file(path)[:16]


def prepare_pool(
    world: ToyWorld, embedder: Any, embedder_weights: Path, work: Path, size: int, seed: int, progress: bool
) -> tuple[Path, bool]:
    """Write ``size`` pool photos and index them; reuse both while size, seed and embedder are unchanged.

    Returns:
        ``(index_dir, reused)``.
    """
    from yochameleon.retrieval import build_index

    pool_dir, index_dir = work / "pool", work / "index"
    wanted = {
        "n": size,
        "seed": seed,
        "world_seed": world.world_seed,
        "embedder": _file_digest(embedder_weights),
    }
    marker = work / "pool.json"
    reused = (
        marker.is_file() and json.loads(marker.read_text()) == wanted and (index_dir / "meta.json").exists()
    )
    if not reused:
        shutil.rmtree(pool_dir, ignore_errors=True)
        shutil.rmtree(index_dir, ignore_errors=True)
        marker.unlink(missing_ok=True)
        _save_images((item.image for item in world.pool_images(size, seed=seed)), pool_dir)
        build_index(pool_dir, index_dir, embedder, progress=progress)
        marker.write_text(json.dumps(wanted) + "\n")
    return index_dir, reused


# ---- summary -----------------------------------------------------------------------------------------
def bench_summary(
    records: Sequence[Any], config: Mapping[str, Any] | None = None, n_boot: int = 2000
) -> dict[str, Any]:
    """The results-schema summary of benchmark records: per-method means with 95% bootstrap CIs, and per
    method the paired-bootstrap difference ``yochameleon - method`` over shared ``(concept, seed)`` pairs.

    Raises:
        SchemaError: no records, an invalid record or a repeated ``(method, concept, seed)``.
    """
    from yochameleon.eval.schema import summarize

    return summarize(records, config, reference=REFERENCE, n_boot=n_boot, seed=0)


# ---- the run -----------------------------------------------------------------------------------------
class _Timer:
    """Seconds spent per stage, summed over repeats."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def _build_method(name: str, backend, train: dict, embedder, seed: int, encoder: str | None = None):
    from yochameleon.baselines import build_method
    from yochameleon.baselines.encoded import ENCODER_METHODS

    if name in ENCODER_METHODS:
        return build_method(name, backend, train=train, encoder=encoder)
    if name == "myvlm":
        # The concept head reads the toy embedder's features, as MyVLM's head reads CLIP's.
        return build_method(name, backend, embedder=embedder, seed=seed)
    if name.startswith(("yochameleon", "yollava")):
        return build_method(name, backend, train=train)
    return build_method(name, backend)


def _format_timings(timings: Mapping[str, float], per_method: Mapping[str, Mapping[str, float]]) -> str:
    lines = ["stage timings (s):"]
    lines += [f"  {stage:<22s}{seconds:8.1f}" for stage, seconds in timings.items()]
    if per_method:
        lines.append("  per method (fit / evaluate, summed over concepts and seeds):")
        lines += [
            f"    {m:<26s}{t.get('fit', 0.0):8.1f} /{t.get('evaluate', 0.0):7.1f}"
            for m, t in per_method.items()
        ]
    return "\n".join(lines)


def per_concept_timings(cells: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Wall seconds per ``(concept, seed)`` cell of each method: the mean, min and max of its fit (training,
    or encoding for ``yochameleon_zeroshot``) and the mean of its evaluation.

    Args:
        cells: ``{method: [{"fit": s, "evaluate": s}, ...]}``, one entry per cell.
    """
    out = {}
    for method, rows in cells.items():
        if rows:
            fits = [r["fit"] for r in rows]
            out[method] = {
                "fit_mean": round(float(np.mean(fits)), 2),
                "fit_min": round(min(fits), 2),
                "fit_max": round(max(fits), 2),
                "evaluate_mean": round(float(np.mean([r["evaluate"] for r in rows])), 2),
                "n": len(rows),
            }
    return out


def encoder_leaks(encoder: str | Path, concepts: Sequence[str], photos: Iterable[str | Path]) -> list[str]:
    """What an encoder's sidecar says it was trained on that the benchmark tests: drawn concepts (by
    name) and concept photos (by sha256). Empty when nothing leaked.

    Raises:
        ConceptError: a missing or malformed encoder file.
    """
    from yochameleon.encoder import file_sha256, read_encoder_file

    meta, _ = read_encoder_file(encoder)
    names = {str(i.get("name")) for i in meta.training_identities}
    shas = {sha for i in meta.training_identities for sha in i.get("photo_sha256", [])}
    leaks = [f"concept {name}" for name in concepts if name in names]
    leaks += [f"photo {p}" for p in photos if file_sha256(p) in shas]
    return leaks


def run_bench(
    config: BenchConfig,
    json_out: str | Path,
    report_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and write the summary JSON, ``report.md`` and the plots.

    Args:
        config: the benchmark settings.
        json_out: the summary JSON (results schema, with every CI and the run's config and timings).
        report_dir: where the table and plots go (default: the JSON's folder).
        work_dir: pool, index, concept folders, test sets, training data and runs (default: a folder named
            after the JSON beside it); the pool and index are reused across runs while unchanged.
        progress: tqdm progress bars.
        log: where progress lines and stage timings go (default: stderr).

    Returns:
        The summary (see :mod:`yochameleon.eval.schema`); ``config`` holds the split, the concepts, the
        training settings, samples per concept and stage timings.

    Raises:
        BenchError: missing artifacts (run ``yochameleon toyworld build``) or a bad setting.
    """
    import torch
    from tqdm.auto import tqdm

    from yochameleon.backends import LoadOptions, load_backend
    from yochameleon.baselines import ConceptData
    from yochameleon.baselines.encoded import ENCODER_METHODS
    from yochameleon.config import to_dict
    from yochameleon.data.pipeline import prepare_concept
    from yochameleon.eval.harness import TestSet, evaluate
    from yochameleon.eval.report import write_report
    from yochameleon.eval.schema import write_summary
    from yochameleon.retrieval import OpenClipEmbedder

    from .scorer import Scorer

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.perf_counter()
    art = check_artifacts(config.artifacts)
    json_out = Path(json_out)
    report_dir = Path(report_dir) if report_dir is not None else json_out.parent
    work = Path(work_dir) if work_dir is not None else json_out.with_name(json_out.stem + "_work")
    work.mkdir(parents=True, exist_ok=True)
    if config.split == "heldout" and config.overrides:
        log("note: recipe overrides on the held-out split; choose hyper-parameters with --split dev")
    timer = _Timer()
    per_method: dict[str, dict[str, float]] = {m: {"fit": 0.0, "evaluate": 0.0} for m in config.methods}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        t0 = time.perf_counter()
        world = ToyWorld(config.world_seed)
        concepts = draw_concepts(config.n_concepts, config.concept_seed, config.split, world)
        backend = load_backend(art / "base", LoadOptions(dtype="float32", device="cpu"))
        weights = art / "embedder" / f"{EMBEDDER_NAME}.safetensors"
        embedder = OpenClipEmbedder(model_config=art / "embedder" / f"{EMBEDDER_NAME}.json", weights=weights)
        scorer = Scorer.load(art / "scorer")
        timer.add("load", time.perf_counter() - t0)
        log(
            f"[bench] {len(concepts)} {config.split} concepts (concept seed {config.concept_seed}) x "
            f"{config.seeds} seed(s) x {len(config.methods)} methods; work folder {work}"
        )

        t0 = time.perf_counter()
        index_dir, reused = prepare_pool(
            world, embedder, weights, work, config.pool_size, config.pool_seed, progress
        )
        timer.add("pool_index", time.perf_counter() - t0)
        state = "reused" if reused else "built"
        log(f"[pool] {state}: {config.pool_size} photos indexed ({time.perf_counter() - t0:.0f}s)")

        records = []
        diagnostics: list[dict] = []
        samples: dict[str, dict[str, int]] = {}
        cells: dict[str, list[dict[str, float]]] = {m: [] for m in config.methods}
        warm: dict[str, dict[str, int]] = {}
        needs_data = any(m.startswith(_NEEDS_DATA) and m not in _NO_DATA for m in config.methods)
        uses_encoder = config.encoder is not None and any(m in ENCODER_METHODS for m in config.methods)
        bar = tqdm(
            total=len(concepts) * config.seeds * len(config.methods),
            desc="bench",
            unit="fit",
            disable=not progress,
        )
        for identity in concepts:
            name = identity.name
            t0 = time.perf_counter()
            concept_dir = world.write_concept_folder(
                identity, work / "concepts" / name, n_photos=config.n_photos, seed=0
            )
            photos = sorted((concept_dir / "photos").glob("*.png"))
            timer.add("concepts_and_tests", time.perf_counter() - t0)
            if uses_encoder:
                # The sidecar lists every identity (and photo hash) the encoder was trained on.
                leaks = encoder_leaks(config.encoder, [name], photos)
                if leaks:
                    raise BenchError(
                        f"encoder {config.encoder} was trained on what the benchmark tests: {', '.join(leaks)}"
                    )
            for seed in config.seed_list:
                cell_start = t0 = time.perf_counter()
                tests = world.test_set(
                    identity,
                    seed=seed,
                    n_positives=config.n_positives,
                    n_hard=config.n_hard,
                    n_easy=config.n_easy,
                    n_vqa=config.n_vqa,
                )
                test = TestSet.load(write_test_dir(tests, work / "tests" / name / f"seed{seed}"))
                timer.add("concepts_and_tests", time.perf_counter() - t0)

                train_cfg = config.train_config(seed, art / "base")
                train_cfg.logging.progress = progress  # nine trainings per concept: one bar is enough
                data_dir = work / "data" / name / f"seed{seed}"
                if needs_data:
                    # Prepared once per concept and seed; every trained method (and MyVLM) reads it.
                    t0 = time.perf_counter()
                    shutil.rmtree(data_dir, ignore_errors=True)
                    header = prepare_concept(
                        concept_dir,
                        data_dir,
                        replace(train_cfg.data, index_dir=str(index_dir)),
                        train_cfg.concept.n_g,
                        name=name,
                    )
                    samples[f"{name}/seed{seed}"] = dict(header["counts"])
                    timer.add("prepare_data", time.perf_counter() - t0)
                data = ConceptData(
                    name=name,
                    concept_dir=concept_dir,
                    photos=photos,
                    description=f"<sks> is {caption(identity)}.",
                    oracle_description=f"<sks> is {full_caption(identity)}.",
                    data_dir=data_dir if needs_data else None,
                    index_dir=index_dir,
                )

                def fidelity(images, identity=identity) -> float:
                    return float(np.mean(scorer.identity_correct(images, identity)))

                for method_name in config.methods:
                    bar.set_postfix_str(f"{name} seed {seed} {method_name}")
                    run_dir = work / "runs" / name / f"seed{seed}"
                    shutil.rmtree(run_dir / method_name, ignore_errors=True)  # never resume a stale run
                    torch.manual_seed(seed)
                    method = _build_method(
                        method_name, backend, to_dict(train_cfg), embedder, seed, config.encoder
                    )
                    try:
                        t0 = time.perf_counter()
                        method.fit(data, run_dir)
                        t1 = time.perf_counter()
                        records.append(
                            evaluate(
                                method,
                                test,
                                name,
                                seed=seed,
                                real_photos=photos,
                                embedder=embedder,
                                n_images=config.n_generated,
                                fidelity=fidelity,
                                fidelity_name=FIDELITY_NAME,
                                image_dir=work / "images" / method_name / name / f"seed{seed}",
                            )
                        )
                        t2 = time.perf_counter()
                        if config.diagnose and getattr(method, "concept_file", None) is not None:
                            diagnostics.append(
                                _diagnose(method, photos, tests, run_dir / method_name)
                                | {"method": method_name, "concept": name, "seed": seed}
                            )
                    finally:
                        method.close()
                    per_method[method_name]["fit"] += t1 - t0
                    per_method[method_name]["evaluate"] += t2 - t1
                    cells[method_name].append({"fit": t1 - t0, "evaluate": t2 - t1})
                    if getattr(method, "recipe_steps", 0):
                        warm[f"{name}/seed{seed}"] = {
                            "steps": method.steps,
                            "recipe_steps": method.recipe_steps,
                        }
                    timer.add("fit", t1 - t0)
                    timer.add("evaluate", t2 - t1)
                    bar.update(1)
                log(
                    f"[{name} seed {seed}] {len(config.methods)} methods in {time.perf_counter() - cell_start:.0f}s"
                )
        bar.close()
    finally:
        torch.set_num_threads(previous_threads)

    t0 = time.perf_counter()
    run_config = _run_config(config, concepts, samples, train_cfg)
    timings = {k: round(v, 1) for k, v in timer.seconds.items()}
    run_config["timings"] = {
        "stages": timings,
        "per_method": {m: {k: round(v, 1) for k, v in t.items()} for m, t in per_method.items()},
        # Wall time of one concept and seed beside the quality numbers (report.md's "fit s" column).
        "per_concept": per_concept_timings(cells),
    }
    if uses_encoder:
        run_config["encoder"] = _encoder_record(config.encoder, warm)
    summary = bench_summary(records, run_config, n_boot=config.n_boot)
    write_summary(json_out, summary)
    paths = write_report(summary, report_dir)
    sheets = write_contact_sheets(work, concepts, config.methods, config.seed_list[0], report_dir)
    if diagnostics:
        from .diagnose import format_diagnostics

        (report_dir / "diagnostics.json").write_text(json.dumps(diagnostics, indent=1) + "\n")
        log(format_diagnostics(diagnostics))
    timer.add("summary_report", time.perf_counter() - t0)
    total = time.perf_counter() - started
    timings = {**{k: round(v, 1) for k, v in timer.seconds.items()}, "total": round(total, 1)}
    summary["config"]["timings"]["stages"] = timings
    write_summary(json_out, summary)  # again, with the report's own time and the total
    log(_format_timings(timings, per_method))
    log(
        f"[bench] summary {json_out}; table {paths['md']}"
        + (f"; plots in {report_dir}" if "metrics_png" in paths else "")
        + (f"; {len(sheets)} contact sheets (contact_<method>.png)" if sheets else "")
    )
    return summary


def _encoder_record(encoder: str, warm: Mapping[str, Mapping[str, int]]) -> dict:
    """What the summary records about the encoder: file, hash, steps, training identities, warm-start steps."""
    from yochameleon.encoder import encoder_paths, file_sha256, read_encoder_file

    meta, _ = read_encoder_file(encoder)
    return {
        "path": str(encoder_paths(encoder)[0]),
        "sha256": file_sha256(encoder_paths(encoder)[0]),
        "steps": meta.steps,
        "training_identities": len(meta.training_identities),
        "warmstart_steps": dict(warm),
    }


def _diagnose(method, photos: Sequence[Path], tests, run_dir: Path) -> dict:
    """:func:`~.diagnose.trained_diagnostics` of a fitted trained method, on its own photo groups."""
    from yochameleon.data.photos import load_rgb

    from .diagnose import trained_diagnostics

    groups = {
        "training": [load_rgb(p) for p in photos],
        "new": tests.positives,
        "twins": tests.hard_negatives,
        "random": tests.easy_negatives,
    }
    return trained_diagnostics(method.model, method.concept_file, groups, run_dir / "metrics.jsonl")


def write_contact_sheets(
    work: Path, concepts: Sequence[Identity], methods: Sequence[str], seed: int, out: Path
) -> list[Path]:
    """One PNG per method: a row per concept, its training photos then the images the method generated.

    Reads what :func:`run_bench` saved under ``work`` (``concepts/<name>/photos`` and
    ``images/<method>/<name>/seed<seed>``); a method that generated nothing gets no sheet.

    Returns:
        The sheets written, ``out/contact_<method>.png``.
    """
    from PIL import Image

    from yochameleon.eval.report import contact_sheet

    written = []
    for method in methods:
        rows = []
        for identity in concepts:
            generated = sorted((work / "images" / method / identity.name / f"seed{seed}").glob("*.png"))
            if generated:
                photos = sorted((work / "concepts" / identity.name / "photos").glob("*.png"))
                rows.append([Image.open(p).convert("RGB") for p in [*photos, *generated]])
        if rows:
            path = Path(out) / f"contact_{method}.png"
            contact_sheet(rows).save(path)
            written.append(path)
    return written


def _run_config(config: BenchConfig, concepts: Sequence[Identity], samples: Mapping, train_cfg) -> dict:
    """What the summary's ``config`` records: the split, the concepts, training settings and data sizes."""
    totals = [sum(c.values()) for c in samples.values()]
    return {
        "benchmark": "toyworld",
        "split": config.split,
        "concept_seed": config.concept_seed,
        "seeds": config.seed_list,
        "methods": list(config.methods),
        "quick": config.quick,
        "artifacts": config.artifacts,
        "concepts": [c.name for c in concepts],
        # A mapping, so that report.md's one-line config summary leaves it out.
        "concept_identities": {c.name: {"caption": caption(c), **c.to_dict()} for c in concepts},
        "bench": config.to_dict(),
        "train": {
            "recipe": config.recipe,
            "overrides": list(config.overrides),
            "epochs": train_cfg.optim.epochs,
            "lr": train_cfg.optim.lr,
            "batch_size": train_cfg.optim.batch_size,
            "n_g": train_cfg.concept.n_g,
            "n_u": train_cfg.concept.n_u,
            "n_recognition": train_cfg.data.n_recognition,
            "n_hard_negatives": train_cfg.data.n_hard_negatives,
            "n_easy_negatives": train_cfg.data.n_easy_negatives,
            "n_soft_positives": train_cfg.data.n_soft_positives,
        },
        "samples_per_concept": {
            "mean": float(np.mean(totals)) if totals else None,
            "min": min(totals) if totals else None,
            "max": max(totals) if totals else None,
            "by_kind": samples,
        },
        "ci": {"level": 0.95, "n_boot": config.n_boot, "paired_reference": REFERENCE},
    }
