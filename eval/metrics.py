"""Evaluation metrics: recognition, multiple-choice QA, CLIP-I/T, face similarity, forgetting, CIs.

All functions are model-agnostic: they take predictions, texts or embedding arrays.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

LABELS = ("pos", "neg_hard", "neg_easy")


def parse_yes_no(text: str) -> bool | None:
    """The first "yes"/"no" word of a generated answer (case-insensitive); ``None`` if neither."""
    m = re.search(r"\b(yes|no)\b", text or "", flags=re.IGNORECASE)
    return None if m is None else m.group(1).lower() == "yes"


def yes_no_from_logprobs(logp_yes: float, logp_no: float) -> bool:
    """Likelihood mode: "yes" when it is more probable than "no"."""
    return logp_yes > logp_no


def recognition_scores(preds: Sequence[bool | None], labels: Sequence[str]) -> dict[str, float | int | None]:
    """Positive, hard-negative, easy-negative and weighted recognition accuracy.

    A prediction of ``None`` (the answer parsed as neither Yes nor No) counts as wrong and is
    counted in ``recognition_unparsed``. Weighted accuracy follows the Yo'LLaVA protocol: the mean of
    the positive accuracy and the negative accuracy (hard and easy negatives pooled), so the
    imbalance between positives and negatives does not reward always answering "No".
    """
    if len(preds) != len(labels):
        raise ValueError("preds and labels differ in length")
    bad = set(labels) - set(LABELS)
    if bad:
        raise ValueError(f"unknown labels {sorted(bad)}; use {LABELS}")

    def acc(keep: set[str]) -> float | None:
        rows = [(p, lab) for p, lab in zip(preds, labels, strict=True) if lab in keep]
        if not rows:
            return None
        return sum(1 for p, lab in rows if p is not None and p == (lab == "pos")) / len(rows)

    pos, hard, easy, neg = acc({"pos"}), acc({"neg_hard"}), acc({"neg_easy"}), acc({"neg_hard", "neg_easy"})
    weighted = None if pos is None or neg is None else (pos + neg) / 2
    return {
        "recognition_pos": pos,
        "recognition_neg_hard": hard,
        "recognition_neg_easy": easy,
        "recognition_weighted": weighted,
        "recognition_unparsed": sum(p is None for p in preds),
    }


def shuffle_options(item: dict, seed: int) -> dict:
    """Shuffle a multiple-choice item's options deterministically per (seed, question).

    ``item``: ``question``, ``options`` (list, or dict letter -> text) and ``answer`` (a letter/key or
    the option text). Returns ``{"question", "options": [texts], "correct": text}``. The original
    text-QA file puts the answer at "A" 396 times out of 400, so an unshuffled order rewards a
    position bias.
    """
    options = item["options"]
    texts = list(options.values()) if isinstance(options, dict) else list(options)
    answer = item["answer"]
    correct = options[answer] if isinstance(options, dict) and answer in options else answer
    if correct not in texts:
        raise ValueError(f"answer {answer!r} is not one of the options {texts}")
    rng = random.Random(f"{seed}|{item['question']}")
    shuffled = texts[:]
    rng.shuffle(shuffled)
    return {"question": item["question"], "options": shuffled, "correct": correct}


def mc_prompt(item: dict) -> str:
    """``"{question} {A} or {B}?"`` (two options) / ``"{question} {A}, {B} or {C}?"``."""
    opts = item["options"]
    listed = opts[0] if len(opts) == 1 else ", ".join(opts[:-1]) + f" or {opts[-1]}"
    return f"{item['question']} {listed}?"


def score_choice(generated: str, options: Sequence[str], correct: str) -> bool:
    """Correct when exactly one option's text occurs in the answer (case-insensitive) and it is the right one.

    An answer naming several options, or none, is wrong.
    """
    low = (generated or "").lower()
    hits = [o for o in options if re.search(rf"\b{re.escape(o.lower())}\b", low)]
    return len(hits) == 1 and hits[0] == correct


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def clip_i(gen_emb: np.ndarray, real_emb: np.ndarray) -> float:
    """Mean cosine between each generated image and the mean real-photo embedding."""
    ref = _unit(np.asarray(real_emb, dtype=np.float64).mean(axis=0))
    return float((_unit(gen_emb) @ ref).mean())


def clip_t(gen_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """Mean cosine between each generated image and its prompt's text embedding (row-paired)."""
    return float((_unit(gen_emb) * _unit(text_emb)).sum(axis=1).mean())


def clip_i_with(embedder, generated: list, real: list) -> float:
    """:func:`clip_i` through a retrieval embedder (``embed_images``)."""
    return clip_i(
        embedder.embed_images(generated, progress=False), embedder.embed_images(real, progress=False)
    )


def face_similarity(generated: list, real: list) -> dict | None:
    """ArcFace similarity for person concepts; ``None`` (logged) when insightface is not installed.

    Mean over generated images with a detected face of the mean cosine to the real faces, plus the
    number of generated images without a face.
    """
    try:
        from insightface.app import FaceAnalysis  # type: ignore[import-not-found]
    except ImportError:
        logger.info("face similarity skipped: insightface is not installed (pip install insightface)")
        return None
    app = FaceAnalysis(name="buffalo_l")
    app.prepare(ctx_id=-1)

    def faces(images):
        out = []
        for im in images:
            found = app.get(np.asarray(im.convert("RGB"))[:, :, ::-1])
            out.append(found[0].normed_embedding if found else None)
        return out

    refs = [f for f in faces(real) if f is not None]
    gens = faces(generated)
    if not refs:
        return None
    sims = [float(np.mean([g @ r for r in refs])) for g in gens if g is not None]
    return {"face_sim": float(np.mean(sims)) if sims else 0.0, "no_face_count": sum(g is None for g in gens)}


def logits_identical_except(
    base: np.ndarray, new: np.ndarray, excluded_ids: Sequence[int]
) -> tuple[bool, float]:
    """Forgetting check: are all logits outside ``excluded_ids`` bit-identical? Also the max |diff|."""
    base, new = np.asarray(base), np.asarray(new)
    keep = np.ones(base.shape[-1], dtype=bool)
    keep[list(excluded_ids)] = False
    diff = np.abs(base[..., keep].astype(np.float64) - new[..., keep].astype(np.float64))
    return bool(np.array_equal(base[..., keep], new[..., keep])), float(diff.max() if diff.size else 0.0)


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> dict:
    """Mean of ``a - b`` over paired units with a bootstrap CI; ``crosses_zero`` flags an unresolved claim."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = bootstrap_ci(d, n_boot, seed, alpha)
    return {"mean": float(d.mean()), "ci": [lo, hi], "crosses_zero": bool(lo <= 0 <= hi)}
