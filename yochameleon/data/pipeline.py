"""Concept folder -> training records (JSONL manifest) -> VQ token cache.

This module is the glue the trainer and the CLI call: photo sanitising, retrieval, record building
and caching each live in their own module; here they run in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yochameleon.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class PrepareOptions:
    """What ``prepare`` builds for one concept (the ``data`` section of a recipe maps onto it)."""

    n_g: int = 16
    n_recognition: int = 200
    n_hard_negatives: int = 100
    n_easy_negatives: int = 100
    n_soft_positives: int = 1000
    soft_prompt_form: str = "paper"
    flip: bool = True
    text_qa_repeats: int = 5
    seed: int = 0
    min_photos: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_train_config(cls, cfg) -> PrepareOptions:
        d, c = cfg.data, cfg.concept
        return cls(
            n_g=c.n_g if not c.shared else c.n_g,
            n_recognition=d.n_recognition,
            n_hard_negatives=d.n_hard_negatives,
            n_easy_negatives=d.n_easy_negatives,
            n_soft_positives=d.n_soft_positives,
            soft_prompt_form=d.soft_prompt_form,
            flip=d.flip,
            text_qa_repeats=d.text_qa_repeats,
            seed=d.seed,
        )


def mine(concept_photos: list[Path], index_dir: str | Path | None, opts: PrepareOptions) -> dict[str, list]:
    """Hard negatives, random negatives and soft positives for a concept from a FAISS index.

    Returns empty lists (with a warning) when there is no index, so a concept still trains on its
    own photos.
    """
    if index_dir is None:
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

    index = ImageIndex.load(index_dir)
    embedder = embedder_from_identity(index.identity)
    query = concept_query(embedder.embed_images([str(p) for p in concept_photos], progress=False))
    exclude = [sha256_file(p) for p in concept_photos]
    soft = soft_positives(index, query, L=opts.n_soft_positives, n_g=opts.n_g, exclude=exclude)
    hard = hard_negatives(index, query, k=opts.n_hard_negatives, exclude=exclude)
    easy = random_negatives(
        index, k=opts.n_easy_negatives, seed=opts.seed, exclude=exclude + [m.sha256 for m in hard]
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
    index_dir: str | Path | None = None,
    opts: PrepareOptions | None = None,
    name: str | None = None,
    answerer=None,
) -> dict:
    """Build the manifest for one concept folder. Returns the header (with counts).

    Text QA comes from ``qa.jsonl``; without one, ``answerer`` (e.g. :func:`base_model_answerer`) is
    asked the attribute questions about each photo and consistent answers are kept. Facts in
    ``concept.yaml`` become QA pairs too.
    """
    from yochameleon.data.concept_folder import ConceptFolder
    from yochameleon.data.manifest import write_manifest
    from yochameleon.data.qa import facts_to_qa, generate_text_qa
    from yochameleon.data.records import RecordOptions, build_records
    from yochameleon.prompts import attribute_questions

    opts = opts or PrepareOptions()
    folder = ConceptFolder.load(concept_dir, min_photos=opts.min_photos)
    logger.info("%s", folder.report.summary())
    photos = folder.photo_paths
    mined = mine(photos, index_dir, opts)
    qa = list(folder.qa)
    if not qa and answerer is not None:
        result = generate_text_qa(photos, attribute_questions(folder.is_person), answerer, progress=False)
        qa = list(result.pairs)
    qa += facts_to_qa(folder.facts)
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    records = build_records(
        concept=name or folder.name,
        photos=photos,
        hard_negatives=mined["hard"],
        easy_negatives=mined["easy"],
        soft_positives=[(Path(s.path), s.score, s.n_tokens) for s in mined["soft"]],
        qa_pairs=qa,
        data_dir=data,
        options=RecordOptions(
            n_g=opts.n_g,
            n_recognition=opts.n_recognition,
            flip=opts.flip,
            seed=opts.seed,
            soft_prompt_form=opts.soft_prompt_form,
            text_qa_photos=opts.text_qa_repeats,
        ),
    )
    return write_manifest(data, name or folder.name, opts.n_g, records)


def load_training_data(backend, entry: dict, data_dir: str | Path, cfg) -> tuple[list[dict], Any]:
    """Records and a token lookup for one concept of a training run, preparing it if needed."""
    from yochameleon.data.manifest import MANIFEST, read_manifest

    data = Path(data_dir)
    if not (data / MANIFEST).is_file():
        if not entry.get("concept_dir"):
            raise DataError(
                f"concept {entry['name']!r} has neither prepared data in {data} nor a concept_dir"
            )
        prepare_concept(
            entry["concept_dir"],
            data,
            cfg.data.index_dir,
            PrepareOptions.from_train_config(cfg),
            name=entry["name"],
            answerer=base_model_answerer(backend),
        )
    manifest = read_manifest(data)
    return manifest.record_dicts(), token_lookup(backend, manifest)


__all__ = [
    "PrepareOptions",
    "prepare_concept",
    "load_training_data",
    "base_model_answerer",
    "token_lookup",
    "mine",
]
