"""Training records for one concept: recognition, text QA, real and soft-positive generation.

Record text uses the placeholders ``<sks>`` (the concept identifier) and ``<image>`` (where the
record's image goes); the trainer substitutes real tokens. Images are copied into
``DATA_DIR/images/`` under content-hash names so a data directory is self-contained.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from yochameleon.prompts import (
    GENERATION_REQUEST,
    IMAGE,
    recognition_answer,
    recognition_question,
)


@dataclass(frozen=True)
class RecordOptions:
    """Sizes and switches of the record builder.

    Args:
        n_g: generation tokens of the concept (real photos use all of them).
        n_recognition: recognition samples per class (positive, negative).
        flip: add horizontally flipped copies (the image is flipped at encode time).
        seed: sampling seed.
        soft_prompt_form: ``paper`` or ``code`` (see ``prompts.soft_positive_prompt``).
    """

    n_g: int = 16
    n_recognition: int = 200
    flip: bool = True
    seed: int = 0
    soft_prompt_form: str = "paper"


def _stage_image(path: Path, data_dir: Path) -> str:
    """Copy ``path`` into ``DATA_DIR/images`` under its content hash; return the relative path."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:24]
    rel = Path("images") / f"{digest}{path.suffix.lower()}"
    dest = data_dir / rel
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(dest)
    return rel.as_posix()


def build_records(concept: str, photos: list[Path], hard_negatives: list[Path], easy_negatives: list[Path],
                  soft_positives: list[tuple[Path, float, int]], qa_pairs: list[tuple[str, str]], data_dir: Path,
                  options: RecordOptions) -> list[dict]:
    """All training records of one concept (see the module docstring).

    Recognition positives and negatives are balanced to ``n_recognition`` each; hard and easy
    negatives contribute equally when both exist. Real photos are replicated to the size of one
    soft-positive bin (the paper's balance), or used once without soft positives.
    """
    rng = random.Random(options.seed)
    rel = {p: _stage_image(Path(p), data_dir) for p in {*photos, *hard_negatives, *easy_negatives,
                                                        *(s[0] for s in soft_positives)}}
    flips = [False, True] if options.flip else [False]
    records: list[dict] = []

    def add(**rec) -> None:
        rec.setdefault("answer", None)
        rec.setdefault("label", None)
        rec.setdefault("n_g", None)
        rec.setdefault("prompt_form", None)
        rec.setdefault("score", None)
        records.append({"id": f"{concept}-{len(records):05d}", "concept": concept, **rec})

    def recognition(paths: list[Path], label: str, n: int) -> None:
        if not paths:
            return
        for i in range(n):
            p = paths[i % len(paths)]
            q = rng.randrange(10_000)
            add(task="understanding", kind="recognition", question=f"{IMAGE}{recognition_question(q)}",
                answer=recognition_answer(rng.randrange(10_000), label == "pos"), image=rel[p],
                flip=flips[(i // len(paths)) % len(flips)], label=label)

    n = options.n_recognition
    recognition(list(photos), "pos", n)
    if hard_negatives and easy_negatives:
        recognition(list(hard_negatives), "neg_hard", n // 2)
        recognition(list(easy_negatives), "neg_easy", n - n // 2)
    else:
        recognition(list(hard_negatives), "neg_hard", n)
        recognition(list(easy_negatives), "neg_easy", n)

    for question, answer in qa_pairs:
        add(task="understanding", kind="text_qa", question=question, answer=answer, image=None, flip=False)

    n_bins = max(1, options.n_g - 1)
    per_bin = max(1, round(len(soft_positives) / n_bins)) if soft_positives else 1
    for i in range(max(per_bin, len(photos))):
        p = photos[i % len(photos)]
        add(task="generation", kind="generation_real", question=GENERATION_REQUEST, image=rel[p],
            flip=flips[(i // len(photos)) % len(flips)], n_g=options.n_g)
    for path, score, n_tokens in soft_positives:
        add(task="generation", kind="generation_soft", question=GENERATION_REQUEST, image=rel[path],
            flip=rng.random() < 0.5 if options.flip else False, n_g=int(n_tokens),
            prompt_form=options.soft_prompt_form, score=float(score))
    return records
