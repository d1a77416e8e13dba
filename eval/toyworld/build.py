"""One seeded, staged, cached and resumable build of the toy world's base artifacts (issue 8, DESIGN §6).

Stages, each cached under ``<out>/.cache/<stage>-<hash of its config and inputs>/`` and written to a
``.partial`` folder that is renamed only when the stage finished, so an interrupted build resumes at the
first unfinished stage and a changed setting rebuilds only what depends on it:

1. ``scorer``: the independent attribute/mark scorer (:func:`train_scorer`), and its gates.
2. ``vq``: the VQ tokenizer (``ChameleonVQVAE`` encoder + our decoder); then ``vq_refine``: its
   object-weighted refinement; then ``vq_decoder``: its decoder alone refined on photos and drawings
   (the codes unchanged), and the VQ gates.
3. ``base``: the base model directory (``make_tiny`` layout) pretrained on pretraining identities; then
   its refinement rounds (``base_refine``, ``base_chat``, ``base_draw``, ``base_name``); then ``base_decoder``: the
   last round's model with the refined decoder; then ``base_gates``: its attribute-QA, existence,
   text-to-image and twin-separation gates, cached apart so that a change in how they are measured
   never retrains the base.
4. ``embedder``: the OpenCLIP-architecture ViT (model-config JSON + safetensors weights).
5. ``pool``: >= 10k pool images (pretraining identities and clutter) indexed with FAISS.

The committed artifacts are then copied to ``<out>``: ``base/``, ``embedder/``, ``scorer.{safetensors,json}``,
``build_report.json`` and ``SHA256SUMS``. ``pool/`` and ``index/`` are rebuilt, never committed.

Example:
    >>> report = build(BuildConfig(out="eval/toyworld/artifacts", seed=0))
    >>> report["gates"]["attribute_qa"]["value"]
    0.97
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from yochameleon.errors import YoChameleonError

from .gates import (
    GateResult,
    attribute_qa_accuracy,
    check_gates,
    drawing_retention,
    existence_accuracy,
    format_gates,
    gate_values,
    make_gate,
    text_to_image_accuracy,
    twin_separation_accuracy,
    vq_retention,
)
from .pretrain import (
    EMBEDDER_NAME,
    BaseRefineConfig,
    ChatRefineConfig,
    DrawRefineConfig,
    EmbedderTrainConfig,
    LMTrainConfig,
    NamedDrawConfig,
    VQDecoderConfig,
    VQRefineConfig,
    VQTrainConfig,
    base_spec,
    build_image_bank,
    pretrain_lm,
    refine_vq,
    refine_vq_decoder,
    train_embedder,
    train_vq,
    write_base_dir,
)
from .scorer import Scorer, ScorerConfig, evaluate_scorer, train_scorer
from .world import ToyWorld, WorldConfig

__all__ = [
    "BuildConfig",
    "BuildError",
    "GateSizes",
    "StageCache",
    "build",
    "committed_files",
    "default_out_dir",
    "stage_digest",
    "write_sha256sums",
]

# Bump when a stage's code changes in a way its config does not show, so caches are not reused wrongly.
# 2: coarse patterns, VQ without mid attention and with the attribute reader; 3: bolder patterns;
# 4: toy world v2 (mark-colour twins, marks named in pretraining, simplified factors).
STAGE_VERSION = 4
COMMITTED = ("base", "embedder", "scorer.safetensors", "scorer.json", "build_report.json")


class BuildError(YoChameleonError):
    """The build got a bad setting, a stage failed, or a quality gate was missed."""


def default_out_dir() -> Path:
    """``eval/toyworld/artifacts`` beside this module (where the committed artifacts live)."""
    return Path(__file__).resolve().parent / "artifacts"


def recorded_path(path: str | Path) -> str:
    """``path`` as a summary records it: relative to the working directory when inside it.

    Summaries and reports are committed beside the README; a path that names this machine's
    checkout would be true only here.
    """
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


@dataclass(frozen=True)
class GateSizes:
    """How much each gate measures (held-out identities and photos).

    Over the 32 held-out identities the base model's gates ask 256 attribute questions per factor,
    1,280 existence questions, draw 256 images and ask 2,048 twin-separation questions. Why: at a
    quarter of that (64 questions per factor, 64 images) a gate's standard error was 0.045-0.06, as
    wide as the distance between a base's measured values and the thresholds, so a pass or a miss said
    more about which photos were drawn than about the base.
    """

    identities: int = 32
    vq_photos: int = 8
    qa_photos: int = 8
    existence_photos: int = 20
    t2i_per_identity: int = 8
    twin_photos: int = 32
    scorer_photos: int = 10

    def __post_init__(self) -> None:
        if min(asdict(self).values()) < 1:
            raise BuildError(f"gate sizes must be positive: {self}")


@dataclass(frozen=True)
class BuildConfig:
    """Everything the build does, so that its hash decides what can be reused.

    Attributes:
        out: output folder (committed artifacts plus ``.cache``, ``pool``, ``index``).
        seed: seeds every training run and every photo drawn.
        world_seed: the world's identity splits (0 is the world the benchmark and demo use).
        image_size, mark_grid: the world's resolution (32 px / 4x4; the issue's fallback is 48 / 12).
        reduced: a fast build with the same code and fewer steps; gates are measured but not enforced.
        keep_going: on a missed gate, finish every stage and write the artifacts and the report anyway,
            then fail (so a base that misses its gates can still be inspected and benchmarked, never
            silently accepted). Not part of any stage's cache key.
        threads: torch CPU threads for training.
        checkpoint_every: pretraining steps between in-stage checkpoints of the base stages (a killed
            build continues inside the stage, not from its start). Not part of any stage's cache key.
        scorer_steps, pool_size: scorer training steps and retrieval pool size.
        vq, vq_refine, vq_decoder, lm, base_refine, base_chat, base_draw, base_name, embedder, gates: each
            stage's settings (``base_chat`` is a second refinement round in the framework's
            conversation format, ``base_draw`` a third that teaches drawing, ``base_name`` a fourth,
            off by default, that teaches drawing an object a preamble names).
    """

    out: str = str(default_out_dir())
    seed: int = 0
    world_seed: int = 0
    image_size: int = 32
    mark_grid: int = 4
    reduced: bool = False
    keep_going: bool = False
    threads: int = 1
    checkpoint_every: int = 250
    scorer_steps: int = 800
    pool_size: int = 10_000
    vq: VQTrainConfig = field(default_factory=VQTrainConfig)
    vq_refine: VQRefineConfig = field(default_factory=VQRefineConfig)
    vq_decoder: VQDecoderConfig = field(default_factory=VQDecoderConfig)
    lm: LMTrainConfig = field(default_factory=LMTrainConfig)
    base_refine: BaseRefineConfig = field(default_factory=BaseRefineConfig)
    base_chat: ChatRefineConfig = field(default_factory=ChatRefineConfig)
    base_draw: DrawRefineConfig = field(default_factory=DrawRefineConfig)
    base_name: NamedDrawConfig = field(default_factory=NamedDrawConfig)
    embedder: EmbedderTrainConfig = field(default_factory=EmbedderTrainConfig)
    gates: GateSizes = field(default_factory=GateSizes)

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise BuildError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.threads < 1 or self.scorer_steps < 1:
            raise BuildError(
                f"threads and scorer_steps must be positive: {self.threads}, {self.scorer_steps}"
            )
        if self.checkpoint_every < 1:
            raise BuildError(f"checkpoint_every must be positive, got {self.checkpoint_every}")
        if self.pool_size < 1:
            raise BuildError(f"pool_size must be positive, got {self.pool_size}")
        from yochameleon.backends.tiny import minimum_vocab_size

        needed = minimum_vocab_size(self.vq.num_embeddings, self.lm.n_reserved)
        if self.lm.vocab_size < needed:
            raise BuildError(
                f"lm.vocab_size {self.lm.vocab_size} cannot hold {self.vq.num_embeddings} image codes, "
                f"{self.lm.n_reserved} reserved rows and the text tokens: use at least {needed}"
            )
        if self.pool_size < 10_000 and not self.reduced:
            raise BuildError(f"the full build needs a pool of at least 10,000 images, got {self.pool_size}")

    @classmethod
    def create(cls, out: str | Path | None = None, seed: int = 0, reduced: bool = False, **overrides):
        """The full build, or with ``reduced`` the fast one (fewer steps and photos, same code)."""
        seeded = {
            "vq": VQTrainConfig(seed=seed),
            "vq_refine": VQRefineConfig(seed=seed),
            "vq_decoder": VQDecoderConfig(seed=seed),
            "lm": LMTrainConfig(seed=seed, compile=True),
            "embedder": EmbedderTrainConfig(seed=seed),
        }
        if reduced:
            seeded = {
                "vq": replace(seeded["vq"], steps=120, batch_size=32),
                "vq_refine": replace(seeded["vq_refine"], steps=30),
                "vq_decoder": replace(seeded["vq_decoder"], steps=10, batch_size=8),
                "base_refine": BaseRefineConfig(steps=20),
                "base_chat": ChatRefineConfig(steps=10),
                "base_draw": DrawRefineConfig(steps=10),
                "base_name": NamedDrawConfig(steps=10),
                "lm": replace(seeded["lm"], steps=120, batch_size=16, n_identities=256, compile=False),
                "embedder": replace(seeded["embedder"], steps=40, batch_size=32),
                "gates": GateSizes(
                    identities=6,
                    vq_photos=4,
                    qa_photos=1,
                    existence_photos=1,
                    t2i_per_identity=1,
                    twin_photos=2,
                    scorer_photos=4,
                ),
                "scorer_steps": 60,
                "pool_size": 600,
            }
        config = {"out": str(out or default_out_dir()), "seed": seed, "reduced": reduced, **seeded}
        config.update(overrides)
        return cls(**config)

    def world(self) -> ToyWorld:
        return ToyWorld(self.world_seed, WorldConfig(image_size=self.image_size, mark_grid=self.mark_grid))


def stage_digest(name: str, key: dict) -> str:
    """A 16-hex-digit hash of a stage's name, code version and JSON-able config/inputs."""
    blob = json.dumps({"stage": name, "version": STAGE_VERSION, "key": key}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageCache:
    """Runs stages at most once per config: ``<root>/<name>-<digest>/stage.json`` marks a finished stage.

    Args:
        root: the cache folder (created).
        log: where progress lines go.
    """

    MARKER = "stage.json"

    def __init__(self, root: str | Path, log: Callable[[str], None] = print) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = log

    def path(self, name: str, key: dict) -> Path:
        return self.root / f"{name}-{stage_digest(name, key)}"

    def done(self, name: str, key: dict) -> bool:
        return (self.path(name, key) / self.MARKER).is_file()

    def resume_dir(self, name: str, key: dict) -> Path:
        """Where a long stage keeps its in-stage checkpoints; kept across kills, removed once it is done."""
        final = self.path(name, key)
        return final.with_name(final.name + ".resume")

    def run(self, name: str, key: dict, fn: Callable[[Path], dict]) -> tuple[Path, dict]:
        """Return ``(folder, result)`` of the stage, running ``fn(partial_folder) -> result`` if needed.

        Raises:
            BuildError: if ``fn`` returns something that is not a JSON-able dict.
        """
        final = self.path(name, key)
        marker = final / self.MARKER
        if marker.is_file():
            record = json.loads(marker.read_text())
            self.log(f"[{name}] cached ({final.name}, built in {record['seconds']:.0f}s)")
            return final, record["result"]
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        self.log(f"[{name}] building ({final.name})")
        start = time.perf_counter()
        result = fn(partial)
        if not isinstance(result, dict):
            raise BuildError(f"stage {name} returned {type(result).__name__}, expected a dict")
        record = {
            "name": name,
            "key": key,
            "result": result,
            "seconds": round(time.perf_counter() - start, 1),
        }
        try:
            (partial / self.MARKER).write_text(json.dumps(record, indent=2) + "\n")
        except TypeError as err:
            raise BuildError(f"stage {name} returned a result that is not JSON-able: {err}") from err
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        shutil.rmtree(self.resume_dir(name, key), ignore_errors=True)
        self.log(f"[{name}] done in {record['seconds']:.0f}s")
        return final, result


def _gates_from(result: dict) -> list[GateResult]:
    return [make_gate(name, value) for name, value in result.get("gates", {}).items()]


def _enforce(config: BuildConfig, stage: str, result: dict, log: Callable[[str], None]) -> None:
    gates = _gates_from(result)
    if gates:
        log(f"[{stage}] gates:\n" + format_gates(gates))
    if not config.reduced:
        try:
            check_gates(gates)
        except YoChameleonError as err:
            if not config.keep_going:
                raise BuildError(f"stage {stage}: {err}") from err
            log(f"[{stage}] {err} (--keep-going: continuing; the build fails at the end)")


def build(config: BuildConfig, progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) every stage, check the gates, and write the committed artifacts.

    Returns:
        The build report (also written to ``<out>/build_report.json``): gate values, stage results,
        seconds per stage and in total.

    Raises:
        BuildError: a stage failed or (in a full build) a gate was missed; with ``keep_going`` the
            missed gates are reported only after every stage ran and the artifacts were written.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.perf_counter()
    out = Path(config.out)
    cache = StageCache(out / ".cache", log)
    world = config.world()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    heldout = world.splits["heldout"][: config.gates.identities]
    stage_seconds: dict[str, float] = {}
    results: dict[str, dict] = {}
    world_key = {"world_seed": config.world_seed, "image_size": config.image_size, "grid": config.mark_grid}
    try:
        # 1. scorer ---------------------------------------------------------------------------------------
        scorer_key = {
            "world": world_key,
            "seed": config.seed,
            "steps": config.scorer_steps,
            "photos": config.gates.scorer_photos,
        }

        def scorer_stage(folder: Path) -> dict:
            scorer_config = ScorerConfig(
                image_size=config.image_size, mark_grid=config.mark_grid, world_seed=config.world_seed
            )
            scorer = train_scorer(
                config.seed, config.scorer_steps, config=scorer_config, progress=progress, num_threads=1
            )
            scorer.save(folder / "scorer")
            metrics = evaluate_scorer(
                scorer,
                world,
                photos_per_identity=config.gates.scorer_photos,
                random_scenes_per_identity=config.gates.scorer_photos,
                seed=config.seed,
            )
            return {
                "metrics": metrics,
                "gates": {
                    "scorer_identity": metrics["identity_acc"],
                    "scorer_random": metrics["random_scene_rate"],
                },
            }

        t0 = time.perf_counter()
        scorer_dir, results["scorer"] = cache.run("scorer", scorer_key, scorer_stage)
        stage_seconds["scorer"] = time.perf_counter() - t0
        _enforce(config, "scorer", results["scorer"], log)
        scorer = Scorer.load(scorer_dir / "scorer")

        # 2. VQ tokenizer -----------------------------------------------------------------------------------
        vq_key = {
            "world": world_key,
            "vq": asdict(config.vq),
            "scorer": scorer_dir.name,
            "gate": [config.gates.identities, config.gates.vq_photos],
        }

        def vq_stage(folder: Path) -> dict:
            from safetensors.torch import save_file

            from yochameleon.backends.chameleon_vq import save_vq_decoder_state

            vqmodel, decoder, stats = train_vq(world, config.vq, progress)
            save_file(
                {k: v.contiguous() for k, v in vqmodel.state_dict().items()}, str(folder / "vq.safetensors")
            )
            save_vq_decoder_state(decoder, folder / "vq_decoder.safetensors")
            marks = vq_retention(
                vqmodel, decoder, scorer, world, heldout, config.gates.vq_photos, config.seed
            )
            # Informational: the gate is measured after the refinement below.
            return {"stats": stats, "marks": marks}

        t0 = time.perf_counter()
        vq_dir, results["vq"] = cache.run("vq", vq_key, vq_stage)
        stage_seconds["vq"] = time.perf_counter() - t0
        log(f"[vq] marks retained before refinement: {results['vq']['marks']['retained']:.3f}")

        # 2b. object-weighted refinement of the VQ ------------------------------------------------------------
        refine_key = {"vq": vq_dir.name, "refine": asdict(config.vq_refine)}

        def refine_stage(folder: Path) -> dict:
            from safetensors.torch import save_file

            from yochameleon.backends.chameleon_vq import save_vq_decoder_state

            vqmodel, decoder = _load_vq(config, vq_dir)
            stats = refine_vq(vqmodel, decoder, world, config.vq_refine, progress)
            save_file(
                {k: v.contiguous() for k, v in vqmodel.state_dict().items()}, str(folder / "vq.safetensors")
            )
            save_vq_decoder_state(decoder, folder / "vq_decoder.safetensors")
            marks = vq_retention(
                vqmodel, decoder, scorer, world, heldout, config.gates.vq_photos, config.seed
            )
            gates = {"vq_marks": marks["kept"], "vq_factors": min(marks["factors"].values())}
            return {"stats": stats, "marks": marks, "gates": gates}

        t0 = time.perf_counter()
        vq_dir, results["vq_refine"] = cache.run("vq_refine", refine_key, refine_stage)
        stage_seconds["vq_refine"] = time.perf_counter() - t0
        _enforce(config, "vq_refine", results["vq_refine"], log)

        # 2c. the decoder alone, refined on photos and drawings (every code unchanged) ----------------------
        decoder_key = {
            "vq": vq_dir.name,
            "decoder": asdict(config.vq_decoder),
            "scorer": scorer_dir.name,
            "gate": [config.gates.identities, config.gates.vq_photos],
        }

        def decoder_stage(folder: Path) -> dict:
            from yochameleon.backends.chameleon_vq import save_vq_decoder_state

            vqmodel, decoder = _load_vq(config, vq_dir)
            stats = refine_vq_decoder(vqmodel, decoder, world, config.vq_decoder, progress)
            save_vq_decoder_state(decoder, folder / "vq_decoder.safetensors")
            marks = vq_retention(
                vqmodel, decoder, scorer, world, heldout, config.gates.vq_photos, config.seed
            )
            drawings = drawing_retention(vqmodel, decoder, scorer, world, heldout)
            gates = {"vq_marks": marks["kept"], "vq_factors": min(marks["factors"].values())}
            return {"stats": stats, "marks": marks, "drawings": drawings, "gates": gates}

        t0 = time.perf_counter()
        decoder_dir, results["vq_decoder"] = cache.run("vq_decoder", decoder_key, decoder_stage)
        stage_seconds["vq_decoder"] = time.perf_counter() - t0
        _enforce(config, "vq_decoder", results["vq_decoder"], log)

        # 3. base model -------------------------------------------------------------------------------------
        base_key = {"world": world_key, "lm": asdict(config.lm), "vq": vq_dir.name}

        def base_stage(folder: Path) -> dict:
            resume = cache.resume_dir("base", base_key)
            return _base_stage(config, world, vq_dir, folder / "base", progress, resume)

        t0 = time.perf_counter()
        base_dir, results["base"] = cache.run("base", base_key, base_stage)
        stage_seconds["base"] = time.perf_counter() - t0

        # 3a. refinement rounds, each a stage of its own (cached apart) continuing the last base:
        #   base_refine: grounded yes/no weighted up, every question an independent turn;
        #   base_chat: the framework's own conversation format, names defined in a preamble;
        #   base_draw: text-to-image asks for the identity's drawing;
        #   base_name: the drawing of an object a preamble names, in the framework's format.
        # Each key names the settings of every row the round trains on.
        refine, chat, draw = asdict(config.base_refine), asdict(config.base_chat), asdict(config.base_draw)
        rounds = (
            ("base_refine", config.base_refine.steps, {"refine": refine}, {}),
            (
                "base_chat",
                config.base_chat.steps,
                {"chat": chat, "refine": refine},
                {"chat": config.base_chat},
            ),
            (
                "base_draw",
                config.base_draw.steps,
                {"draw": draw, "refine": refine, "chat": chat},
                {"draw": config.base_draw},
            ),
            (
                "base_name",
                config.base_name.steps,
                {"name": asdict(config.base_name), "draw": draw, "refine": refine, "chat": chat},
                {
                    "draw": config.base_name.draw_round(config.base_draw),
                    "named_drawing_share": config.base_name.named_share,
                },
            ),
        )
        for name, steps, settings, round_kwargs in rounds:
            if steps:
                key = {"base": base_dir.name, **settings}
                base_dir = _run_refinement(
                    cache, name, key, config, world, vq_dir, base_dir / "base", progress, round_kwargs,
                    results, stage_seconds,
                )  # fmt: skip

        # 3b. the last round's model with the refined decoder: what users load -----------------------------
        final_key = {"base": base_dir.name, "decoder": decoder_dir.name}

        def final_stage(folder: Path) -> dict:
            from yochameleon.backends import load_backend

            model = load_backend(base_dir / "base").model
            _write_base(config, vq_dir, decoder_dir / "vq_decoder.safetensors", model, folder / "base")
            return {"base": base_dir.name, "decoder": decoder_dir.name}

        t0 = time.perf_counter()
        base_dir, results["base_decoder"] = cache.run("base_decoder", final_key, final_stage)
        stage_seconds["base_decoder"] = time.perf_counter() - t0

        # 3c. the base model's gates: a stage of their own, so measuring differently never retrains it ----
        # "t2i": the text-to-image gate counts images with every factor right (older stages: the mean).
        base_gates_key = {
            "base": base_dir.name,
            "scorer": scorer_dir.name,
            "gates": asdict(config.gates),
            "t2i": "every",
        }

        def base_gates_stage(folder: Path) -> dict:
            return _base_gates_stage(config, world, scorer, base_dir / "base", folder, heldout)

        t0 = time.perf_counter()
        _, results["base_gates"] = cache.run("base_gates", base_gates_key, base_gates_stage)
        stage_seconds["base_gates"] = time.perf_counter() - t0
        _enforce(config, "base_gates", results["base_gates"], log)

        # 4. embedder ---------------------------------------------------------------------------------------
        embedder_key = {"world": world_key, "embedder": asdict(config.embedder)}

        def embedder_stage(folder: Path) -> dict:
            _, _, stats = train_embedder(world, config.embedder, folder / "embedder", progress)
            return {"stats": stats}

        t0 = time.perf_counter()
        embedder_dir, results["embedder"] = cache.run("embedder", embedder_key, embedder_stage)
        stage_seconds["embedder"] = time.perf_counter() - t0

        # 5. pool + index (outside the cache: big, rebuilt from the seed, never committed) ------------------
        t0 = time.perf_counter()
        results["pool"] = _pool_stage(config, world, embedder_dir / "embedder", out, log, progress)
        stage_seconds["pool"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous_threads)

    # Committed artifacts ------------------------------------------------------------------------------------
    _replace_tree(base_dir / "base", out / "base")
    _replace_tree(embedder_dir / "embedder", out / "embedder")
    for suffix in (".safetensors", ".json"):
        shutil.copy2(scorer_dir / f"scorer{suffix}", out / f"scorer{suffix}")
    # The VQ gates of the tokenizer the base ships with: the refined decoder's.
    gates = [g for stage in ("scorer", "vq_decoder", "base_gates") for g in _gates_from(results[stage])]
    report = {
        "seed": config.seed,
        "world_seed": config.world_seed,
        "reduced": config.reduced,
        "gates": {
            g.name: {"value": round(g.value, 4), "threshold": g.threshold, "passed": g.passed} for g in gates
        },
        "stages": results,
        "stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
        "rebuild_command": _rebuild_command(config),
    }
    (out / "build_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / ".gitignore").write_text(".cache/\npool/\nindex/\n")
    write_sha256sums(out)
    log("gates:\n" + format_gates(gates))
    log(f"build finished in {report['total_seconds']:.0f}s -> {out}")
    _fail_on_missed_gates(config, gates)
    return report


def _fail_on_missed_gates(config: BuildConfig, gates: list[GateResult]) -> None:
    """After a ``keep_going`` full build wrote everything: raise if any gate was missed."""
    missed = [g.name for g in gates if not g.passed]
    if missed and config.keep_going and not config.reduced:
        raise BuildError(
            f"gates missed: {', '.join(missed)}; the artifacts and build_report.json in {config.out} are "
            "kept for inspection (--keep-going)"
        )


def _rebuild_command(config: BuildConfig) -> str:
    command = f"yochameleon toyworld build --seed {config.seed}"
    return command + (" --reduced" if config.reduced else "") + (" --keep-going" if config.keep_going else "")


def _replace_tree(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


def _load_vq(config: BuildConfig, vq_dir: Path):
    """The ``(ChameleonVQVAE, ChameleonVQDecoder)`` pair a VQ stage wrote, in fp32."""
    from safetensors.torch import load_file
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    from yochameleon.backends.chameleon_vq import attach_vq_decoder

    from .pretrain import vq_config

    vqmodel = ChameleonVQVAE(ChameleonVQVAEConfig(**vq_config(config.vq, config.image_size))).float()
    vqmodel.load_state_dict(load_file(str(vq_dir / "vq.safetensors")))
    decoder = attach_vq_decoder(vqmodel, vq_dir / "vq_decoder.safetensors", dtype=torch.float32)
    return vqmodel.eval(), decoder.eval()


def _base_stage(
    config: BuildConfig,
    world: ToyWorld,
    vq_dir: Path,
    base_dir: Path,
    progress: bool,
    resume: Path | None = None,
) -> dict:
    from yochameleon.backends import load_backend

    # The decoder travels through the same writer and reader as a real checkpoint's.
    _write_base(config, vq_dir, vq_dir / "vq_decoder.safetensors", None, base_dir)
    backend = load_backend(base_dir)
    bank = build_image_bank(backend, world, config.lm, progress)
    stats = pretrain_lm(
        backend, bank, config.lm, progress, resume_dir=resume, checkpoint_every=config.checkpoint_every
    )
    _write_base(config, vq_dir, vq_dir / "vq_decoder.safetensors", backend.model, base_dir)
    return {"stats": stats}


def _run_refinement(
    cache: StageCache, name, key, config, world, vq_dir, source, progress, round_kwargs, results, seconds
) -> Path:
    """Run (or reuse) one refinement round from the base in ``source``; returns its stage folder."""

    def stage(folder: Path) -> dict:
        resume = cache.resume_dir(name, key)
        return _base_refine_stage(
            config, world, vq_dir, source, folder / "base", progress, resume=resume, **round_kwargs
        )

    t0 = time.perf_counter()
    folder, results[name] = cache.run(name, key, stage)
    seconds[name] = time.perf_counter() - t0
    return folder


def _base_refine_stage(
    config: BuildConfig,
    world: ToyWorld,
    vq_dir: Path,
    source: Path,
    base_dir: Path,
    progress: bool,
    chat: ChatRefineConfig | None = None,
    resume: Path | None = None,
    draw: DrawRefineConfig | None = None,
    named_drawing_share: float = 0.0,
) -> dict:
    """Continue pretraining the base in ``source`` with :class:`BaseRefineConfig` into ``base_dir``.

    With ``chat`` it is the chat round instead: its steps and rate, and its share of rows in the
    framework's conversation format (:class:`ChatRefineConfig`). With ``draw`` it is the drawing round
    (:class:`DrawRefineConfig`): text-to-image targets are drawings, and ``chat`` rows keep their share.
    ``resume`` holds in-stage checkpoints.
    """
    from yochameleon.backends import load_backend

    refine = config.base_refine
    backend = load_backend(source)
    # The photos the base was trained on (and, for the drawing round, each identity's drawing).
    bank = build_image_bank(backend, world, config.lm, progress, drawings=draw is not None)
    steps, lr, mix = refine.steps, refine.lr, refine.mix
    if draw is not None:
        steps, lr, mix = draw.steps, draw.lr, draw.mix(refine.mix)
        chat = replace(chat or config.base_chat, chat_share=draw.chat_share)
    elif chat is not None:
        steps, lr = chat.steps, chat.lr
    lm = replace(config.lm, steps=steps, lr=lr, mix=mix, codebook_init=False)
    stats = pretrain_lm(
        backend,
        bank,
        lm,
        progress,
        marks_share=refine.marks_share,
        independent_turns=refine.independent_turns,
        chat=chat,
        resume_dir=resume,
        checkpoint_every=config.checkpoint_every,
        named_drawing_share=named_drawing_share,
    )
    _write_base(config, vq_dir, vq_dir / "vq_decoder.safetensors", backend.model, base_dir)
    return {"stats": stats}


def _write_base(config: BuildConfig, vq_dir: Path, decoder_file: Path, model, base_dir: Path) -> None:
    """Write ``model`` as a base directory with the VQ in ``vq_dir`` and the decoder in ``decoder_file``."""
    from safetensors.torch import load_file
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    from yochameleon.backends.chameleon_vq import attach_vq_decoder

    from .pretrain import vq_config

    vq_state = load_file(str(vq_dir / "vq.safetensors"))
    vqmodel = ChameleonVQVAE(ChameleonVQVAEConfig(**vq_config(config.vq, config.image_size)))
    vqmodel.load_state_dict(vq_state)
    decoder = attach_vq_decoder(vqmodel, decoder_file, dtype=torch.float32)
    spec = base_spec(config.lm, config.vq, config.image_size)
    write_base_dir(base_dir, spec, vq_state, decoder, seed=config.seed, model=model)


def _base_gates_stage(
    config: BuildConfig, world: ToyWorld, scorer: Scorer, base_dir: Path, folder: Path, heldout
) -> dict:
    """Attribute QA, existence, text-to-image and twin separation, on the base read back from disk."""
    from yochameleon.backends import load_backend

    backend = load_backend(base_dir)  # exactly as users get it
    g = config.gates
    qa = attribute_qa_accuracy(backend, world, heldout, g.qa_photos, config.seed)
    existence = existence_accuracy(backend, world, heldout, g.existence_photos, config.seed)
    t2i, images = text_to_image_accuracy(backend, scorer, heldout, g.t2i_per_identity, config.seed)
    samples = folder / "t2i_samples"
    samples.mkdir(exist_ok=True)
    for i, image in enumerate(images[:16]):
        image.save(samples / f"{i:02d}.png")
    twins = twin_separation_accuracy(backend, world, heldout, g.twin_photos, config.seed)
    return {
        "attribute_qa": qa,
        "existence": existence,
        "text_to_image": t2i,
        "text_to_image_factors": t2i["all"],
        "gates": gate_values(qa, existence, t2i, twins),
    }


def _pool_stage(
    config: BuildConfig, world: ToyWorld, embedder_dir: Path, out: Path, log, progress: bool
) -> dict:
    """Write the pool images (+ ``pool_identities.jsonl``) and a FAISS index over them; resumable."""
    from tqdm.auto import tqdm

    from yochameleon.retrieval import OpenClipEmbedder, build_index

    start = time.perf_counter()
    pool_dir, index_dir = out / "pool", out / "index"
    images_dir = pool_dir / "images"
    manifest = pool_dir / "pool.json"
    wanted = {
        "n": config.pool_size,
        "seed": config.seed,
        "world_seed": config.world_seed,
        "image_size": config.image_size,
    }
    reused = manifest.is_file() and json.loads(manifest.read_text()) == wanted
    if not reused:
        shutil.rmtree(pool_dir, ignore_errors=True)
        shutil.rmtree(index_dir, ignore_errors=True)
        images_dir.mkdir(parents=True)
        items = world.pool_images(config.pool_size, seed=config.seed)
        with (pool_dir / "pool_identities.jsonl").open("w") as fh:
            for i, item in enumerate(tqdm(items, desc="write pool", disable=not progress)):
                item.image.save(images_dir / f"{i:05d}.png")
                fh.write(
                    json.dumps(
                        {
                            "file": f"images/{i:05d}.png",
                            "identity": item.identity.to_dict() if item.identity else None,
                        }
                    )
                    + "\n"
                )
        manifest.write_text(json.dumps(wanted) + "\n")
    log(
        f"[pool] {'cached: ' if reused else ''}{config.pool_size} images in "
        f"{time.perf_counter() - start:.0f}s; indexing"
    )
    # An index made with another embedder cannot be extended: start it again.
    index_marker = pool_dir / "index_embedder.txt"
    if not index_marker.is_file() or index_marker.read_text() != embedder_dir.parent.name:
        shutil.rmtree(index_dir, ignore_errors=True)
        index_marker.write_text(embedder_dir.parent.name)
    embedder = OpenClipEmbedder(
        model_config=embedder_dir / f"{EMBEDDER_NAME}.json",
        weights=embedder_dir / f"{EMBEDDER_NAME}.safetensors",
        batch_size=256,
    )
    index = build_index(pool_dir, index_dir, embedder, progress=progress)
    return {
        "images": config.pool_size,
        "indexed": len(index),
        "seconds": round(time.perf_counter() - start, 1),
    }


def committed_files(out: str | Path) -> list[Path]:
    """The committed artifact files under ``out``, sorted (what ``SHA256SUMS`` lists)."""
    root = Path(out)
    files: list[Path] = []
    for name in COMMITTED:
        path = root / name
        if path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file()]
        elif path.is_file():
            files.append(path)
    return sorted(files)


def write_sha256sums(out: str | Path) -> Path:
    """Write ``<out>/SHA256SUMS`` (``sha256sum -c`` format) over :func:`committed_files`."""
    root = Path(out)
    lines = []
    for path in committed_files(root):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{digest}  {path.relative_to(root).as_posix()}")
    target = root / "SHA256SUMS"
    target.write_text("\n".join(lines) + "\n")
    return target
