"""``yochameleon toyworld encoder``: a concept encoder trained on the toy world's pretraining identities.

The benchmark's encoder methods (``yochameleon_zeroshot``, ``yochameleon_warmstart``) need an encoder
trained on the toy base. This trains one the way ``yochameleon encoder train`` does
(:func:`~yochameleon.train.encoder.train_encoder`), on identities of the **pretraining split only**:

1. ``n_identities`` pretraining identities, the first of a seeded permutation of
   ``ToyWorld.splits["pretrain"]`` (:func:`encoder_identities`; development and held-out identities are
   never drawn, and the list is checked against both);
2. a concept folder for each (4 photos, ``concept.yaml``, ``qa.jsonl``), written as the benchmark writes
   its concepts' folders;
3. the benchmark's retrieval pool and index (the same :func:`~.bench.prepare_pool`, reused from the work
   folder or copied from a benchmark's with ``pool_from``), **less the pool photos of the training
   identities themselves** (the pool is drawn from pretraining identities, about 4 photos each; left in,
   an identity's own photos would be its nearest "hard negatives"): the kept photos are linked into
   ``encoder_pool/`` and indexed into ``encoder_index/`` from the copied embedding store, so nothing is
   embedded again;
4. the recipe (``recipes/toyworld-encoder.yaml``, the benchmark recipe's data section and token layout)
   with the identities, the index, the base and ``optim.max_steps`` filled in, written to
   ``OUT/encoder-recipe.yaml``;
5. :func:`~yochameleon.train.encoder.train_encoder`; afterwards the sidecar's ``training_identities`` are
   checked to be pretraining identities.

The encoder is ``OUT/run/encoder.safetensors`` (+ ``.json``).

Example:
    >>> config = ToyEncoderConfig(out="outputs/toy-encoder", n_identities=128, steps=220)
    >>> result = train_toy_encoder(config)  # doctest: +SKIP
    >>> result.encoder_file  # doctest: +SKIP
    PosixPath('outputs/toy-encoder/run/encoder.safetensors')
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from yochameleon.config import recipe_path

from .bench import BenchError, check_artifacts, prepare_pool
from .build import default_out_dir, recorded_path
from .pretrain import EMBEDDER_NAME
from .world import Identity, ToyWorld

__all__ = [
    "ENCODER_RECIPE",
    "ToyEncoderConfig",
    "copy_pool",
    "encoder_identities",
    "encoder_pool",
    "encoder_train_config",
    "train_toy_encoder",
]

ENCODER_RECIPE = recipe_path("toyworld-encoder")  # shipped as package data
_POOL_FILES = ("pool", "index", "pool.json")


@dataclass(frozen=True)
class ToyEncoderConfig:
    """One toy-world encoder run.

    Attributes:
        out: the work folder: ``concepts/``, ``data/``, the pool and indexes, ``run/`` (the encoder).
        artifacts: the toy-world artifacts (the base model and the embedder).
        n_identities: pretraining identities to train on.
        identity_seed: chooses them (a larger ``n_identities`` extends the same list).
        steps: ``optim.max_steps`` (``None``: the recipe's epochs).
        n_photos: photos per identity (the benchmark's concepts have 4).
        world_seed: the world (0 for the committed base).
        pool_size, pool_seed: the retrieval pool (the benchmark's defaults).
        pool_from: a benchmark work folder whose ``pool/``, ``index/`` and ``pool.json`` are copied into
            ``out`` when ``out`` has none (the source is only read).
        recipe: the encoder recipe.
        overrides: ``key=value`` overrides of the recipe.
        threads: torch CPU threads.
    """

    out: str
    artifacts: str = str(default_out_dir())
    n_identities: int = 128
    identity_seed: int = 0
    steps: int | None = None
    n_photos: int = 4
    world_seed: int = 0
    pool_size: int = 10000
    pool_seed: int = 1
    pool_from: str | None = None
    recipe: str = str(ENCODER_RECIPE)
    overrides: tuple[str, ...] = field(default_factory=tuple)
    threads: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(self.overrides))
        for name in ("artifacts", "recipe"):
            object.__setattr__(self, name, recorded_path(getattr(self, name)))
        for name in ("n_identities", "n_photos", "threads", "pool_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise BenchError(f"{name} must be an integer >= 1, got {value!r}")
        if self.steps is not None and self.steps < 1:
            raise BenchError(f"steps must be >= 1, got {self.steps}")
        if not Path(self.recipe).is_file():
            raise BenchError(f"encoder recipe {self.recipe} does not exist")


def encoder_identities(n: int, seed: int = 0, world: ToyWorld | None = None) -> list[Identity]:
    """The ``n`` pretraining identities a toy-world encoder trains on: the first ``n`` of a seeded
    permutation of ``world.splits["pretrain"]``.

    Raises:
        BenchError: more identities than the split holds, or (never by construction) a chosen identity
            that is also a development or held-out one.
    """
    world = world or ToyWorld(0)
    pretrain = world.splits["pretrain"]
    if not 1 <= n <= len(pretrain):
        raise BenchError(
            f"cannot draw {n} encoder identities from the {len(pretrain)} pretraining identities"
        )
    rng = np.random.default_rng([world.world_seed, int(seed), 0xE4C0])
    chosen = [pretrain[int(i)] for i in rng.permutation(len(pretrain))[:n]]
    tested = {i.key for split in ("dev", "heldout") for i in world.splits[split]}
    leaked = [i.name for i in chosen if i.key in tested]
    if leaked:
        raise BenchError(f"encoder identities {leaked} are development or held-out identities")
    return chosen


def copy_pool(source: str | Path, work: Path) -> bool:
    """Copy a benchmark work folder's ``pool/``, ``index/`` and ``pool.json`` into ``work`` unless it has a
    ``pool.json`` already; the copied index is pointed at the copied pool. ``source`` is only read.

    Returns:
        Whether anything was copied.

    Raises:
        BenchError: ``source`` lacks one of the three.
    """
    src = Path(source)
    if (work / "pool.json").is_file():
        return False
    missing = [name for name in _POOL_FILES if not (src / name).exists()]
    if missing:
        raise BenchError(f"{src} is not a benchmark work folder with a pool: {', '.join(missing)} missing")
    work.mkdir(parents=True, exist_ok=True)
    for name in ("pool", "index"):
        shutil.rmtree(work / name, ignore_errors=True)
        shutil.copytree(src / name, work / name)
    meta_path = work / "index" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["pool_root"] = str((work / "pool").resolve())  # the copy's own pool, not the source's
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.copy2(src / "pool.json", work / "pool.json")  # last: it marks a finished copy
    return True


def encoder_pool(
    world: ToyWorld, identities: Sequence[Identity], work: Path, size: int, seed: int, embedder: Any
) -> tuple[Path, int]:
    """Index the benchmark pool in ``work/pool`` less the photos of ``identities`` (see the module docstring).

    The pool is redrawn (``world.pool_images(size, seed)``) only to learn which photo shows which identity;
    every dropped photo is checked pixel for pixel against the file, so a pool of another seed or world
    is refused. Reused while the pool marker and the identities are unchanged.

    Returns:
        ``(index_dir, photos dropped)``.

    Raises:
        BenchError: the pool's files do not match the drawn pool.
    """
    from PIL import Image

    from yochameleon.retrieval import build_index

    pool_dir, index_dir = work / "encoder_pool", work / "encoder_index"
    marker = work / "encoder_pool.json"
    wanted = {
        "pool": json.loads((work / "pool.json").read_text()),
        "identities": sorted(i.key for i in identities),
    }
    if marker.is_file() and json.loads(marker.read_text()) == wanted and (index_dir / "meta.json").is_file():
        return index_dir, int(json.loads((index_dir / "dropped.json").read_text())["count"])
    keys = {i.key for i in identities}
    dropped = []
    for i, item in enumerate(world.pool_images(size, seed=seed)):
        if item.identity is not None and item.identity.key in keys:
            name = f"{i:03d}.png"  # the names bench.prepare_pool saves the pool under
            if not np.array_equal(
                np.asarray(Image.open(work / "pool" / name).convert("RGB")), np.asarray(item.image)
            ):
                raise BenchError(
                    f"{work / 'pool' / name} is not photo {i} of pool seed {seed}; rebuild the pool"
                )
            dropped.append(name)
    shutil.rmtree(pool_dir, ignore_errors=True)
    shutil.rmtree(index_dir, ignore_errors=True)
    marker.unlink(missing_ok=True)
    pool_dir.mkdir(parents=True)
    skip = set(dropped)
    for path in sorted((work / "pool").glob("*.png")):
        if path.name not in skip:
            try:
                os.link(path, pool_dir / path.name)
            except OSError:
                shutil.copy2(path, pool_dir / path.name)
    # The embedding store is keyed by file name and content: seeded with the full pool's, nothing is embedded.
    shutil.copytree(work / "index" / "vectors", index_dir / "vectors")
    build_index(pool_dir, index_dir, embedder, progress=False)
    (index_dir / "dropped.json").write_text(json.dumps({"count": len(dropped), "photos": dropped}) + "\n")
    marker.write_text(json.dumps(wanted) + "\n")
    return index_dir, len(dropped)


def encoder_train_config(
    config: ToyEncoderConfig, folders: dict[str, Path], index_dir: Path | None, base: str | Path
):
    """The :class:`~yochameleon.train.encoder.EncoderTrainConfig` of a toy-world run: the recipe with its
    overrides, the run folder ``OUT/run``, the base, the index, ``optim.max_steps`` and one identity per
    folder (data in ``OUT/data/NAME``).

    Raises:
        ConfigError: the recipe or an override is invalid.
    """
    from yochameleon.config import from_dict, load_config, to_dict
    from yochameleon.train.encoder import EncoderTrainConfig

    out = Path(config.out)
    fixed = [f"output_dir={out / 'run'}", f"model.name_or_path={base}", "identities_file=null"]
    fixed.append(f"data.index_dir={index_dir}" if index_dir is not None else "data.index_dir=null")
    if config.steps is not None:
        fixed.append(f"optim.max_steps={config.steps}")
    cfg = to_dict(load_config(EncoderTrainConfig, config.recipe, [*config.overrides, *fixed]))
    cfg["identities"] = [
        {"name": name, "concept_dir": str(folder), "data_dir": str(out / "data" / name)}
        for name, folder in folders.items()
    ]
    return from_dict(EncoderTrainConfig, cfg)


def train_toy_encoder(
    config: ToyEncoderConfig,
    backend=None,
    resume: bool = False,
    progress: bool = True,
    use_pool: bool = True,
    log: Callable[[str], None] | None = None,
):
    """Train a toy-world concept encoder on pretraining identities (see the module docstring).

    Args:
        config: the run.
        backend: an already-loaded base (tests pass the tiny model); default the artifacts' base.
        resume: continue the run in ``OUT/run``.
        progress: progress bars.
        use_pool: retrieve hard negatives and soft positives from the pool (``False``: the identities'
            own photos and text QA only; for tests).
        log: where progress lines go (default: stderr).

    Returns:
        The :class:`~yochameleon.train.encoder.EncoderTrainResult`.

    Raises:
        BenchError: missing artifacts, a bad setting, or a sidecar naming an identity outside the
            pretraining split.
    """
    import torch
    import yaml

    from yochameleon.config import to_dict
    from yochameleon.encoder import read_encoder_file
    from yochameleon.train.encoder import train_encoder

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(config.out)
    art = check_artifacts(config.artifacts) if backend is None or use_pool else Path(config.artifacts)
    world = ToyWorld(config.world_seed)
    identities = encoder_identities(config.n_identities, config.identity_seed, world)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        index_dir = None
        if use_pool:
            from yochameleon.retrieval import OpenClipEmbedder

            if config.pool_from and copy_pool(config.pool_from, out):
                log(f"[pool] copied from {config.pool_from}")
            weights = art / "embedder" / f"{EMBEDDER_NAME}.safetensors"
            embedder = OpenClipEmbedder(
                model_config=art / "embedder" / f"{EMBEDDER_NAME}.json", weights=weights
            )
            _, reused = prepare_pool(
                world, embedder, weights, out, config.pool_size, config.pool_seed, progress
            )
            index_dir, dropped = encoder_pool(
                world, identities, out, config.pool_size, config.pool_seed, embedder
            )
            log(
                f"[pool] {'reused' if reused else 'built'} {config.pool_size} photos; {dropped} photos of the "
                f"{len(identities)} training identities left out of {index_dir}"
            )
        folders = {}
        for identity in identities:
            folder = out / "concepts" / identity.name
            if not (folder / "toyworld_identity.json").is_file():
                world.write_concept_folder(identity, folder, n_photos=config.n_photos, seed=0)
            folders[identity.name] = folder
        (out / "identities.json").write_text(
            json.dumps({"split": "pretrain", "identities": [i.to_dict() for i in identities]}, indent=1)
            + "\n"
        )
        base = Path(backend.name_or_path) if backend is not None else art / "base"
        if not progress:
            config = replace(config, overrides=(*config.overrides, "logging.progress=false"))
        train_cfg = encoder_train_config(config, folders, index_dir, base)
        (out / "encoder-recipe.yaml").write_text(yaml.safe_dump(to_dict(train_cfg), sort_keys=False))
        log(f"[encoder] {len(identities)} pretraining identities; recipe {out / 'encoder-recipe.yaml'}")
        result = train_encoder(train_cfg, backend=backend, resume=resume)
    finally:
        torch.set_num_threads(previous_threads)
    meta, _ = read_encoder_file(result.encoder_file)
    pretrain = {i.name for i in world.splits["pretrain"]}
    outside = [i["name"] for i in meta.training_identities if i["name"] not in pretrain]
    if outside:
        raise BenchError(f"the encoder's sidecar lists identities outside the pretraining split: {outside}")
    (out / "toy_encoder.json").write_text(
        json.dumps({"config": asdict(config), "steps": result.steps}, indent=1) + "\n"
    )
    return result
