"""Training records for one concept: recognition, text QA, real and soft-positive generation.

Record text uses the placeholders ``<sks>`` (the concept identifier) and ``<image>`` (where the
record's image goes); the trainer substitutes real tokens. Images are copied (hard-linked when
possible) into ``DATA_DIR/images/`` under content-hash names so a data directory is self-contained.

What is built (defaults follow the spec's per-concept recipe of ~1.5k samples):

* **recognition** — ``n_recognition`` positives cycled over the photos (each pass alternates the
  flip), and as many negatives, split ``hard_fraction`` : rest between hard (retrieved) and easy
  (random) negatives (one kind takes all when the other is missing), each cycled the same way. The
  question and the "Yes, …"/"No, …" answer are drawn independently from the paraphrase lists.
* **text QA** — every question is asked ``min(#photos, text_qa_repeats)`` times (the original asked
  each question about each of 5 photos); the answers of a question are cycled, so a file with one
  answer per question repeats it and a file with one answer per photo keeps them all.
* **relation** — facts naming another concept (see :mod:`yochameleon.relations`): each question
  about the relation is asked as often as a text-QA question; ``mentions`` names the other concept.
* **generation_real** — the photos, cycled to the size of the largest soft-positive bin (at least
  one per photo and ``n_real_min``), with all ``n_g`` g-tokens.
* **generation_soft** — one record per soft positive, with the number of g-tokens of its bin.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yochameleon.data.config import DataConfig
from yochameleon.data.photos import file_sha256
from yochameleon.errors import DataError
from yochameleon.prompts import (
    GENERATION_REQUEST,
    IMAGE,
    NEGATIVE_ANSWERS,
    POSITIVE_ANSWERS,
    RECOGNITION_QUESTIONS,
    SKS,
    SOFT_PROMPT_FORMS,
    with_image,
)

if TYPE_CHECKING:
    from yochameleon.relations import RelationQA

logger = logging.getLogger(__name__)

IMAGES_DIR = "images"
TASK_OF_KIND = {
    "recognition": "understanding",
    "text_qa": "understanding",
    "relation": "understanding",
    "generation_real": "generation",
    "generation_soft": "generation",
}
KINDS = tuple(TASK_OF_KIND)
LABELS = ("pos", "neg_hard", "neg_easy")


@dataclass
class Record:
    """One training sample (one manifest line). See ``data.manifest`` for the schema.

    Raises:
        DataError: (from ``__post_init__``) inconsistent fields, e.g. a generation record with an
            answer, a recognition record without a label, or an absolute image path.
    """

    id: str
    concept: str
    task: str
    kind: str
    question: str
    answer: str | None = None
    image: str | None = None
    flip: bool = False
    label: str | None = None
    n_g: int | None = None
    prompt_form: str | None = None
    score: float | None = None
    mentions: list[str] | None = None
    fact: str | None = None

    def __post_init__(self) -> None:
        where = f"record {self.id!r}"
        if not isinstance(self.id, str) or not self.id:
            raise DataError("a record needs a non-empty string id")
        if self.kind not in TASK_OF_KIND:
            raise DataError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.task != TASK_OF_KIND[self.kind]:
            raise DataError(
                f"{where}: kind {self.kind} belongs to task {TASK_OF_KIND[self.kind]}, not {self.task!r}"
            )
        if not isinstance(self.question, str) or not self.question:
            raise DataError(f"{where}: question must be a non-empty string")
        if not isinstance(self.flip, bool):
            raise DataError(f"{where}: flip must be true or false")
        if self.image is not None:
            if not isinstance(self.image, str) or not self.image or Path(self.image).is_absolute():
                raise DataError(
                    f"{where}: image must be a path relative to the data directory, got {self.image!r}"
                )
        generation = self.task == "generation"
        if generation:
            if self.answer is not None:
                raise DataError(f"{where}: generation records have no answer (the image is the target)")
            if self.image is None:
                raise DataError(f"{where}: generation records need an image")
            if isinstance(self.n_g, bool) or not isinstance(self.n_g, int) or self.n_g < 1:
                raise DataError(f"{where}: n_g must be a positive integer for generation, got {self.n_g!r}")
        else:
            if not isinstance(self.answer, str) or not self.answer:
                raise DataError(f"{where}: understanding records need a non-empty answer")
            if self.n_g is not None:
                raise DataError(f"{where}: n_g is only for generation records")
        if self.kind == "recognition":
            if self.label not in LABELS:
                raise DataError(f"{where}: recognition label must be one of {LABELS}, got {self.label!r}")
            if self.image is None or IMAGE not in self.question:
                raise DataError(f"{where}: recognition records need an image and {IMAGE} in the question")
            if not self.answer.startswith("Yes," if self.label == "pos" else "No,"):
                raise DataError(
                    f"{where}: a {self.label} answer must start with "
                    f"{'Yes,' if self.label == 'pos' else 'No,'}"
                )
        elif self.label is not None:
            raise DataError(f"{where}: label is only for recognition records")
        if self.kind == "generation_soft":
            if self.prompt_form not in SOFT_PROMPT_FORMS:
                raise DataError(
                    f"{where}: prompt_form must be one of {SOFT_PROMPT_FORMS}, got {self.prompt_form!r}"
                )
            if not isinstance(self.score, (int, float)) or isinstance(self.score, bool):
                raise DataError(f"{where}: soft positives need a numeric score")
            self.score = float(self.score)
        elif self.prompt_form is not None or self.score is not None:
            raise DataError(f"{where}: prompt_form and score are only for soft positives")
        if self.kind == "relation":
            self._check_relation(where)
        elif self.mentions is not None or self.fact is not None:
            raise DataError(f"{where}: mentions and fact are only for relation records")

    def _check_relation(self, where: str) -> None:
        from yochameleon.relations import mentioned_names

        if (
            not isinstance(self.mentions, list)
            or not self.mentions
            or not all(isinstance(m, str) and m for m in self.mentions)
        ):
            raise DataError(f"{where}: a relation record needs mentions, the other concepts it names")
        if not isinstance(self.fact, str) or not self.fact:
            raise DataError(f"{where}: a relation record needs the fact it comes from")
        text = f"{self.question} {self.answer}"
        if SKS not in text:
            raise DataError(f"{where}: a relation record must name its own concept as {SKS}")
        named = mentioned_names(text)
        if sorted(named) != sorted(self.mentions):
            raise DataError(
                f"{where}: mentions {self.mentions} do not match the concepts the text names {named}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-serialisable dict (every field present)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """Build and validate a record from a dict.

        Raises:
            DataError: missing or unknown fields, or inconsistent values.
        """
        if not isinstance(data, dict):
            raise DataError(f"a record must be an object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise DataError(f"record {data.get('id')!r}: unknown fields {sorted(unknown)}")
        missing = {"id", "concept", "task", "kind", "question"} - set(data)
        if missing:
            raise DataError(f"record {data.get('id')!r}: missing fields {sorted(missing)}")
        return cls(**data)


@dataclass(frozen=True)
class SoftPositive:
    """A retrieved image described by the first ``n_tokens`` g-tokens; ``score`` is its similarity."""

    path: Path
    score: float
    n_tokens: int


def as_soft_positive(item: Any) -> SoftPositive:
    """Accept ``(path, score, n_tokens)`` tuples or any object with those attributes."""
    if isinstance(item, SoftPositive):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 3:
        path, score, n_tokens = item
    elif all(hasattr(item, a) for a in ("path", "score", "n_tokens")):
        path, score, n_tokens = item.path, item.score, item.n_tokens
    else:
        raise DataError(f"a soft positive must be (path, score, n_tokens), got {item!r}")
    return SoftPositive(Path(path), float(score), int(n_tokens))


class ImageStager:
    """Copies images into ``DATA_DIR/images/<sha256[:32]><suffix>`` once per distinct content."""

    def __init__(self, data_dir: str | Path, link: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.link = link
        self._done: dict[Path, tuple[str, str]] = {}
        self._hashes: dict[Path, str] = {}

    def sha256(self, path: str | Path) -> str:
        """File hash of ``path`` (memoised: pools are hashed once per build)."""
        src = Path(path)
        if src not in self._hashes:
            if not src.is_file() or src.stat().st_size == 0:
                raise DataError(f"image {src} is missing or empty")
            self._hashes[src] = file_sha256(src)
        return self._hashes[src]

    def stage(self, path: str | Path) -> tuple[str, str]:
        """``(relative path, file sha256)`` of ``path`` inside the data directory.

        Raises:
            DataError: the file is missing or empty.
        """
        src = Path(path)
        if src in self._done:
            return self._done[src]
        digest = self.sha256(src)
        rel = Path(IMAGES_DIR) / f"{digest[:32]}{src.suffix.lower() or '.img'}"
        dest = self.data_dir / rel
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            try:
                if self.link:
                    try:
                        os.link(src.resolve(), tmp)
                    except OSError:  # another file system, or links not allowed
                        shutil.copyfile(src, tmp)
                else:
                    shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        self._done[src] = (rel.as_posix(), digest)
        return self._done[src]


def _drop_concept_photos(
    paths: list[Path], photo_hashes: set[str], stager: ImageStager, what: str
) -> list[Path]:
    """Leave out pool images that are the concept's own photos (a pool may contain them)."""
    kept = [p for p in paths if stager.sha256(p) not in photo_hashes]
    if len(kept) < len(paths):
        logger.warning(
            "dropped %d %s that are copies of the concept's own photos", len(paths) - len(kept), what
        )
    return kept


def _cycle(paths: list[Path], n: int, flips: list[bool]) -> list[tuple[Path, bool]]:
    """``n`` (path, flip) pairs: one pass over ``paths`` per flip state, then around again."""
    return [(paths[i % len(paths)], flips[(i // len(paths)) % len(flips)]) for i in range(n)] if paths else []


def make_records(
    concept: str,
    photos: list[Path],
    hard_negatives: list[Path],
    easy_negatives: list[Path],
    soft_positives: list[Any],
    qa_pairs: list[tuple[str, str]],
    data_dir: str | Path,
    options: DataConfig | None = None,
    n_g: int = 16,
    relations: Sequence[RelationQA] = (),
) -> list[Record]:
    """All training records of one concept (see the module docstring), with images staged.

    Args:
        concept: the concept's name.
        photos: the usable photos (real positives).
        hard_negatives: retrieved images most similar to the concept.
        easy_negatives: random pool images.
        soft_positives: ``(path, score, n_tokens)`` per retrieved soft positive (or objects with
            those attributes), ``1 <= n_tokens < n_g``.
        qa_pairs: ``(question, answer)`` pairs; questions mention ``<sks>``.
        data_dir: the data directory; images are staged into ``data_dir/images``.
        options: sizes and switches (a recipe's ``data`` section).
        n_g: generation tokens of the concept; real photos use all of them.
        relations: QA pairs from facts naming other concepts (:func:`yochameleon.relations.relation_qa`).

    Raises:
        DataError: no photos, a missing image, ``n_g < 1``, a soft positive with an impossible token
            count, or a QA question without ``<sks>``.
    """
    opts = options or DataConfig()
    if n_g < 1:
        raise DataError(f"n_g must be at least 1, got {n_g}")
    if not photos:
        raise DataError(f"concept {concept!r} has no photos to build records from")
    photos = [Path(p) for p in photos]
    soft = [as_soft_positive(s) for s in soft_positives]
    for s in soft:
        if not 1 <= s.n_tokens < n_g:
            raise DataError(
                f"soft positive {s.path} uses {s.n_tokens} g-tokens; it must be 1..{n_g - 1} "
                f"(all {n_g} are reserved for real photos)"
            )
    for q, _ in qa_pairs:
        if SKS not in q:
            raise DataError(f"QA question {q!r} does not mention the concept as {SKS}")
    stager = ImageStager(data_dir, opts.link_images)
    own = {stager.stage(p)[1] for p in photos}
    hard = _drop_concept_photos([Path(p) for p in hard_negatives], own, stager, "hard negatives")
    easy = _drop_concept_photos([Path(p) for p in easy_negatives], own, stager, "easy negatives")
    n_soft = len(soft)
    soft = [s for s in soft if stager.sha256(s.path) not in own]
    if len(soft) < n_soft:
        logger.warning(
            "dropped %d soft positives that are copies of the concept's own photos", n_soft - len(soft)
        )
    rng = random.Random(opts.seed)
    flips = [False, True] if opts.flip else [False]
    records: list[Record] = []

    def add(**fields_: Any) -> None:
        records.append(Record(id=f"{concept}-{len(records):05d}", concept=concept, **fields_))

    # Recognition.
    n = opts.n_recognition
    if hard and easy:
        n_hard = round(n * opts.hard_fraction)
        quotas = {"neg_hard": (hard, n_hard), "neg_easy": (easy, n - n_hard)}
    else:
        quotas = {"neg_hard": (hard, n), "neg_easy": (easy, n)}
    groups = [("pos", photos, n)] + [(label, paths, k) for label, (paths, k) in quotas.items()]
    if n and not hard and not easy:
        logger.warning("concept %s has no negatives: recognition trains on positives only", concept)
    for label, paths, k in groups:
        answers = POSITIVE_ANSWERS if label == "pos" else NEGATIVE_ANSWERS
        for path, flip in _cycle(paths, k, flips):
            add(
                task="understanding",
                kind="recognition",
                question=with_image(rng.choice(RECOGNITION_QUESTIONS)),
                answer=rng.choice(answers),
                image=stager.stage(path)[0],
                flip=flip,
                label=label,
            )

    # Text QA: each question asked once per photo (up to text_qa_repeats); its answers are cycled.
    answers_of: dict[str, list[str]] = defaultdict(list)
    for q, a in qa_pairs:
        if a not in answers_of[q]:
            answers_of[q].append(a)
    repeats = min(len(photos), opts.text_qa_repeats)
    for q, answers in answers_of.items():
        for i in range(max(repeats, len(answers))):
            add(task="understanding", kind="text_qa", question=q, answer=answers[i % len(answers)])
    # Relations: as often as a text-QA question.
    for pair in relations:
        for _ in range(repeats):
            add(
                task="understanding",
                kind="relation",
                question=pair.question,
                answer=pair.answer,
                mentions=list(pair.mentions),
                fact=pair.fact,
            )

    # Generation: real photos replicated to the largest soft-positive bin.
    largest_bin = max(Counter(s.n_tokens for s in soft).values(), default=0)
    n_real = max(largest_bin, len(photos), opts.n_real_min)
    for path, flip in _cycle(photos, n_real, flips):
        add(
            task="generation",
            kind="generation_real",
            question=GENERATION_REQUEST,
            image=stager.stage(path)[0],
            flip=flip,
            n_g=n_g,
        )
    for s in soft:
        add(
            task="generation",
            kind="generation_soft",
            question=GENERATION_REQUEST,
            image=stager.stage(s.path)[0],
            flip=rng.random() < 0.5 if opts.flip else False,
            n_g=s.n_tokens,
            prompt_form=opts.soft_prompt_form,
            score=s.score,
        )
    return records


def build_records(
    concept: str,
    photos: list[Path],
    hard_negatives: list[Path],
    easy_negatives: list[Path],
    soft_positives: list[Any],
    qa_pairs: list[tuple[str, str]],
    data_dir: str | Path,
    options: DataConfig | None = None,
    n_g: int = 16,
    relations: Sequence[RelationQA] = (),
) -> list[dict]:
    """:func:`make_records` as plain dicts (the manifest's line format)."""
    return [
        r.to_dict()
        for r in make_records(
            concept,
            photos,
            hard_negatives,
            easy_negatives,
            soft_positives,
            qa_pairs,
            data_dir,
            options,
            n_g,
            relations,
        )
    ]


def record_key(record: Record | dict) -> str:
    """``kind`` or ``kind/label``: the key records are counted by."""
    d = record.to_dict() if isinstance(record, Record) else record
    return f"{d['kind']}/{d['label']}" if d.get("label") else d["kind"]
