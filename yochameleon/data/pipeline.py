"""Concept folder -> training records (JSONL manifest) -> VQ token cache.

This module is the glue the trainer and the CLI call: photo sanitising, retrieval, record building
and caching each live in their own module; here they run in order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from yochameleon.data.config import DataConfig, prepared_settings, settings_differences
from yochameleon.errors import ConceptError, DataError

logger = logging.getLogger(__name__)


def mine(concept_photos: list[Path], data: DataConfig, n_g: int) -> dict[str, list]:
    """Hard negatives, random negatives and soft positives for a concept from ``data.index_dir``.

    Returns empty lists (with a warning) when there is no index, so a concept still trains on its
    own photos.
    """
    if data.index_dir is None:
        logger.warning("no retrieval index: training without retrieved negatives and soft positives")
        return {"hard": [], "easy": [], "soft": []}
    from yochameleon.retrieval import (
        ImageIndex,
        concept_query,
        embedder_from_identity,
        hard_negatives,
        random_negatives,
        sha256_file,
        soft_positives,
    )

    index = ImageIndex.load(data.index_dir)
    embedder = embedder_from_identity(index.identity)
    query = concept_query(embedder.embed_images([str(p) for p in concept_photos], progress=False))
    exclude = [sha256_file(p) for p in concept_photos]
    soft = soft_positives(index, query, L=data.n_soft_positives, n_g=n_g, exclude=exclude)
    hard = hard_negatives(index, query, k=data.n_hard_negatives, exclude=exclude)
    easy = random_negatives(
        index, k=data.n_easy_negatives, seed=data.seed, exclude=exclude + [m.sha256 for m in hard]
    )
    return {"hard": [Path(m.path) for m in hard], "easy": [Path(m.path) for m in easy], "soft": soft}


def token_lookup(backend, manifest, progress: bool = True, cache_dir: str | Path | None = None):
    """Make sure every record image is in the token cache; return ``record -> VQ ids``.

    The cache is keyed by image content, the backend's fingerprint and its preprocessing, and lives
    in :func:`~yochameleon.data.token_cache.default_cache_dir` (shared across runs and concepts), so a
    second ``prepare`` or ``train`` encodes nothing.
    """
    from yochameleon.data.token_cache import TokenCache, default_cache_dir

    cache = TokenCache(cache_dir or default_cache_dir(), backend.fingerprint(), backend.preprocess_id)
    paths = sorted({manifest.image_path(r) for r in manifest.records if r.image})
    cache.ensure(paths, lambda images: backend.encode_images(images).tolist(), progress=progress)

    def lookup(rec: dict) -> list[int]:
        path = manifest.data_dir / rec["image"]
        ids = cache.get(path, bool(rec.get("flip")))
        if ids is None:
            raise DataError(f"image {rec['image']} is missing from the token cache")
        return [int(i) for i in ids]

    lookup.cache = cache  # exposes hit/miss counts to callers
    return lookup


def base_model_answerer(backend):
    """The default text-QA answerer: the base model itself, asked about each photo."""
    from yochameleon.data.qa import PromptedAnswerer
    from yochameleon.infer import PersonalizedModel

    pm = PersonalizedModel(backend)
    return PromptedAnswerer(lambda text, image: pm.ask(text, image=image, max_new_tokens=24))


def prepare_concept(
    concept_dir: str | Path,
    data_dir: str | Path,
    data: DataConfig | None = None,
    n_g: int = 16,
    name: str | None = None,
    answerer=None,
) -> dict:
    """Build the manifest for one concept folder. Returns the header (with counts and settings).

    Text QA comes from ``qa.jsonl``; without one, ``answerer`` (e.g. :func:`base_model_answerer`) is
    asked the attribute questions about each photo and consistent answers are kept. Facts in
    ``concept.yaml`` become QA pairs too; facts naming other concepts become relation records
    (:mod:`yochameleon.relations`), whose other concepts must be trained in the same run or
    related later (``yochameleon relate``). The settings the records are built with go into the
    manifest header, where training checks them against its recipe.

    Args:
        concept_dir: the user's concept folder.
        data_dir: the data folder to write.
        data: the recipe's ``data`` section (retrieval index, sizes, switches).
        n_g: the concept's generation tokens (``concept.n_g``).
        name: the concept's name (default: the folder's).
        answerer: asked for text QA when the folder has no ``qa.jsonl``.
    """
    from yochameleon.data.concept_folder import ConceptFolder
    from yochameleon.data.manifest import write_manifest
    from yochameleon.data.qa import facts_to_qa, generate_text_qa
    from yochameleon.data.records import build_records
    from yochameleon.prompts import attribute_questions
    from yochameleon.relations import relation_qa, split_facts

    data = data or DataConfig()
    folder = ConceptFolder.load(concept_dir, min_photos=data.min_photos)
    logger.info("%s", folder.report.summary())
    photos = folder.photo_paths
    mined = mine(photos, data, n_g)
    qa = list(folder.qa)
    if not qa and answerer is not None:
        result = generate_text_qa(photos, attribute_questions(folder.is_person), answerer, progress=False)
        qa = list(result.pairs)
    concept = name or folder.name
    try:
        plain, related = split_facts(folder.facts, concept)
    except ConceptError as exc:
        raise DataError(f"{Path(concept_dir) / 'concept.yaml'}: {exc}") from exc
    qa += facts_to_qa(plain)
    relations = [pair for fact in related for pair in relation_qa(fact, concept)]
    out = Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = build_records(
        concept=concept,
        photos=photos,
        hard_negatives=mined["hard"],
        easy_negatives=mined["easy"],
        soft_positives=[(Path(s.path), s.score, s.n_tokens) for s in mined["soft"]],
        qa_pairs=qa,
        data_dir=out,
        options=data,
        n_g=n_g,
        relations=relations,
    )
    settings = prepared_settings(data, n_g, concept_dir)
    return write_manifest(out, concept, n_g, records, settings)


def prepared_differences(data_dir: str | Path, wanted: dict[str, Any]) -> list[str]:
    """How a prepared folder's recorded settings differ from ``wanted`` (one line per key).

    A manifest of another version counts as different: it records no settings to compare.

    Raises:
        DataError: the folder has no manifest, or its header is not a JSON object.
    """
    from yochameleon.data.manifest import MANIFEST_VERSION, read_header

    header = read_header(data_dir)
    version = header.get("manifest_version")
    if version != MANIFEST_VERSION:
        return [
            f"manifest_version: the folder has {version!r}, this version of yochameleon writes {MANIFEST_VERSION}"
        ]
    return settings_differences(header.get("settings") or {}, wanted)


def load_training_data(backend, entry: dict, data_dir: str | Path, cfg) -> tuple[list[dict], Any]:
    """Records and a token lookup for one concept of a training run, preparing it if needed.

    A folder prepared with settings other than the recipe's is refused, listing the keys, unless
    ``data.reprepare`` asks to prepare it again.

    Args:
        backend: the frozen base model (its token cache; it answers text QA when there is no qa.jsonl).
        entry: the concept's ``{name, concept_dir, data_dir}``.
        data_dir: the concept's data folder.
        cfg: the run's :class:`~yochameleon.train.config.TrainConfig`.

    Raises:
        DataError: no data and no concept folder, or a folder prepared with other settings.
    """
    from yochameleon.data.manifest import MANIFEST, read_manifest

    data = Path(data_dir)
    concept_dir = entry.get("concept_dir") or None
    wanted = prepared_settings(cfg.data, cfg.concept.n_g, concept_dir)
    differences = prepared_differences(data, wanted) if (data / MANIFEST).is_file() else []
    if differences and not cfg.data.reprepare:
        raise DataError(
            f"{data} was prepared with other settings than this recipe's:\n  "
            + "\n  ".join(differences)
            + "\nPrepare it again (`yochameleon prepare` with this recipe and these overrides, or "
            "data.reprepare=true), or point concept.data_dir at another folder."
        )
    if differences or not (data / MANIFEST).is_file():
        if not concept_dir:
            raise DataError(
                f"concept {entry['name']!r} has no concept_dir to prepare {data} from"
                + (" again" if differences else "")
            )
        if differences:
            logger.info("preparing %s again (data.reprepare): %s", data, "; ".join(differences))
        prepare_concept(
            concept_dir,
            data,
            cfg.data,
            cfg.concept.n_g,
            name=entry["name"],
            answerer=base_model_answerer(backend),
        )
    manifest = read_manifest(data)
    return manifest.record_dicts(), token_lookup(backend, manifest)


__all__ = [
    "prepare_concept",
    "prepared_differences",
    "load_training_data",
    "base_model_answerer",
    "token_lookup",
    "mine",
]
