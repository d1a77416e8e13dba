"""Evaluation metrics: recognition, multiple-choice QA, CLIP-I/T, face similarity, forgetting, CIs.

Every function here is model-agnostic: it takes predictions, generated texts, images or embedding
arrays that the inference code produced, so each metric can be checked by hand on tiny inputs.

Conventions follow ``reference/yochameleon_spec.md`` §7 (the Yo'LLaVA / Yo'Chameleon protocol);
where this module deliberately differs, the function's docstring says how and why.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from yochameleon.errors import YoChameleonError

logger = logging.getLogger(__name__)

LABELS = ("pos", "neg_hard", "neg_easy")
NEGATIVE_LABELS = ("neg_hard", "neg_easy")
FACE_BACKENDS = ("insightface",)
# A self-prompted answer starts with the concept's token strings, e.g. "<reserved16200><reserved16201>".
_LEADING_MARKUP = re.compile(r"^\s*(?:<[^<>\s]*>\s*)+")
_YES_NO = re.compile(r"\b(yes|no)\b", flags=re.IGNORECASE)


class MetricError(YoChameleonError, ValueError):
    """A metric was given malformed input (wrong shapes, unknown labels, an answer not among the options)."""


# --------------------------------------------------------------------------------------------- recognition


def parse_yes_no(text: str | None, skip_prefix_tokens: Sequence[str] | None = None) -> bool | None:
    """Parse a generated recognition answer.

    The self-prompted tokens the model emits before its answer are removed first, then the first
    whole word "yes" or "no" (case-insensitive) decides. The spec's code checks "yes" before "no"
    anywhere in the answer; taking the first word instead keeps "No, yes is wrong" from reading as Yes.

    Args:
        text: the generated text (``None`` counts as empty).
        skip_prefix_tokens: token strings to strip from the start of ``text`` (in any order, repeated,
            with whitespace between). ``None`` strips any leading run of ``<...>`` markup tokens, which
            is how self-prompted concept tokens decode; pass ``()`` to strip nothing.

    Returns:
        ``True`` for yes, ``False`` for no, ``None`` when the answer contains neither; callers count
        ``None`` as a wrong answer (see :func:`recognition_scores`).
    """
    text = text or ""
    if skip_prefix_tokens is None:
        text = _LEADING_MARKUP.sub("", text, count=1)
    else:
        tokens = sorted((t for t in skip_prefix_tokens if t), key=len, reverse=True)
        stripped = True
        while stripped:
            stripped = False
            text = text.lstrip()
            for token in tokens:
                if text.startswith(token):
                    text = text[len(token) :]
                    stripped = True
                    break
    match = _YES_NO.search(text)
    return None if match is None else match.group(1).lower() == "yes"


def yes_no_from_logprobs(logp_yes: float, logp_no: float) -> bool:
    """Likelihood mode: answer Yes when "Yes" is strictly more probable than "No" as the next token.

    A tie counts as No, so a model that cannot tell the two apart never scores on positives.

    Raises:
        MetricError: a log-probability is NaN.
    """
    logp_yes, logp_no = float(logp_yes), float(logp_no)
    if math.isnan(logp_yes) or math.isnan(logp_no):
        raise MetricError(f"log-probabilities must not be NaN (yes={logp_yes}, no={logp_no})")
    return logp_yes > logp_no


def recognition_scores(preds: Sequence[bool | None], labels: Sequence[str]) -> dict[str, float | int | None]:
    """Positive, hard-negative, easy-negative and weighted recognition accuracy.

    A prediction is ``True`` (Yes), ``False`` (No) or ``None`` (the answer parsed as neither); ``None``
    is always wrong and is also counted in ``recognition_unparsed``.

    Weighting: ``recognition_weighted = 0.5 * pos + 0.5 * mean(negative accuracies present)``. The spec
    (§7.1, the Yo'LLaVA protocol) defines weighted accuracy as ``(pos + neg) / 2`` with one pool of
    negatives (the other concepts' test photos); with a single negative kind our definition is
    exactly that. When both hard and easy negatives are present each kind gets the same weight, so a
    large pool of easy negatives cannot hide failures on look-alikes. Either way a constant answer
    ("always Yes" or "always No") scores 0.5.

    Args:
        preds: one prediction per test image.
        labels: ``"pos"``, ``"neg_hard"`` or ``"neg_easy"`` per test image.

    Returns:
        ``recognition_pos``, ``recognition_neg_hard``, ``recognition_neg_easy`` (``None`` when that
        kind has no images), ``recognition_weighted`` (``None`` without positives or without any
        negatives) and ``recognition_unparsed`` (an int).

    Raises:
        MetricError: lengths differ, no predictions, an unknown label or a prediction that is not
            bool/None.
    """
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise MetricError(f"preds ({len(preds)}) and labels ({len(labels)}) differ in length")
    if not preds:
        raise MetricError("recognition needs at least one prediction")
    bad = sorted({str(lab) for lab in labels} - set(LABELS))
    if bad:
        raise MetricError(f"unknown labels {bad}; use {LABELS}")
    for p in preds:
        if p is not None and not isinstance(p, (bool, np.bool_)):
            raise MetricError(f"a prediction must be True, False or None, got {p!r}")

    def accuracy(label: str) -> float | None:
        rows = [p for p, lab in zip(preds, labels) if lab == label]
        if not rows:
            return None
        want = label == "pos"
        return sum(1 for p in rows if p is not None and bool(p) == want) / len(rows)

    pos = accuracy("pos")
    negatives = {label: accuracy(label) for label in NEGATIVE_LABELS}
    present = [v for v in negatives.values() if v is not None]
    weighted = None if pos is None or not present else 0.5 * pos + 0.5 * (sum(present) / len(present))
    return {
        "recognition_pos": pos,
        "recognition_neg_hard": negatives["neg_hard"],
        "recognition_neg_easy": negatives["neg_easy"],
        "recognition_weighted": weighted,
        "recognition_unparsed": sum(p is None for p in preds),
    }


# ---------------------------------------------------------------------------------------- multiple choice


def _option_texts(options: Any) -> list[str]:
    texts = list(options.values()) if isinstance(options, dict) else list(options)
    if len(texts) < 2:
        raise MetricError(f"a multiple-choice question needs at least two options, got {texts!r}")
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise MetricError(f"every option must be a non-empty string, got {t!r}")
    lowered = [t.strip().lower() for t in texts]
    if len(set(lowered)) != len(lowered):
        # Scoring is by option text, so two options with the same text cannot be told apart.
        raise MetricError(f"options repeat a text (case-insensitive): {texts!r}")
    return texts


def _correct_text(options: Any, texts: list[str], answer: Any) -> str:
    if isinstance(options, dict) and answer in options:
        return options[answer]
    if answer in texts:
        return answer
    if isinstance(options, list) and isinstance(answer, str) and len(answer) == 1 and answer.isalpha():
        index = ord(answer.upper()) - ord("A")  # a letter key for a list of options: "A" is the first
        if 0 <= index < len(texts):
            return texts[index]
    raise MetricError(f"answer {answer!r} is neither an option key nor one of the options {texts}")


def shuffle_options(question: dict, seed: int) -> dict:
    """Shuffle a multiple-choice question's options deterministically per (seed, question).

    The original text-QA file puts the answer at "A" 396 times out of 400, so keeping the file's order
    rewards a model that always picks the first option. The order is drawn from a hash of the seed,
    the question and the *set* of option texts, so it does not depend on where the file put the answer
    and it is the same on every machine and Python run.

    Args:
        question: ``question`` (str), ``options`` (a list of texts, or a dict key -> text such as
            ``{"A": ..., "B": ...}``) and ``answer`` (an option key, the option's text or, for a
            list, a letter "A", "B", ... by position). Other keys (e.g. ``image``) are kept.
        seed: the evaluation seed.

    Returns:
        A copy of ``question`` with ``options`` replaced by the shuffled list of texts, plus
        ``correct`` (the correct option's text) and ``correct_index`` (its position after shuffling).

    Raises:
        MetricError: a missing key, fewer than two options, repeated option texts, or an answer that
            is not among the options.
    """
    missing = [k for k in ("question", "options", "answer") if k not in question]
    if missing:
        raise MetricError(f"multiple-choice question {question!r} lacks {missing}")
    if not isinstance(question["question"], str) or not question["question"].strip():
        raise MetricError(f"the question text must be a non-empty string, got {question['question']!r}")
    options = question["options"]
    if not isinstance(options, (list, tuple, dict)):
        raise MetricError(f"options must be a list or a dict, got {type(options).__name__}")
    options = dict(options) if isinstance(options, dict) else list(options)
    texts = _option_texts(options)
    correct = _correct_text(options, texts, question["answer"])
    key = json.dumps([int(seed), question["question"], sorted(texts)], ensure_ascii=False)
    rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
    shuffled = sorted(texts)
    rng.shuffle(shuffled)
    out = dict(question)
    out.update(options=shuffled, correct=correct, correct_index=shuffled.index(correct))
    return out


def mc_prompt(question: dict) -> str:
    """``"{question} {A} or {B}?"`` (two options) or ``"{question} {A}, {B} or {C}?"`` (the spec's format)."""
    opts = question["options"]
    listed = ", ".join(opts[:-1]) + f" or {opts[-1]}"
    return f"{question['question']} {listed}?"


def choice_matches(generated_text: str | None, options: Sequence[str], whole_words: bool = True) -> list[str]:
    """The options whose text occurs in a generated answer (case-insensitive, whitespace-normalized).

    An occurrence that lies inside an occurrence of a longer option does not count, so for the options
    "dog" and "hot dog" the answer "a hot dog" names only "hot dog".

    Args:
        generated_text: the model's answer.
        options: the option texts.
        whole_words: match only at word boundaries (default), so "no" does not match inside "know"
            and "cat" not inside "category". ``False`` gives the spec's plain substring test.
    """
    answer = " ".join((generated_text or "").lower().split())
    spans: dict[str, list[tuple[int, int]]] = {}
    for option in options:
        needle = re.escape(" ".join(option.lower().split()))
        pattern = rf"(?<!\w){needle}(?!\w)" if whole_words else needle
        spans[option] = [m.span() for m in re.finditer(pattern, answer)]

    def covered(span: tuple[int, int], option: str) -> bool:
        return any(
            len(other) > len(option) and s <= span[0] and span[1] <= e
            for other, other_spans in spans.items()
            if other != option
            for s, e in other_spans
        )

    return [o for o in options if any(not covered(span, o) for span in spans[o])]


def score_choice(
    generated_text: str | None, options: Sequence[str], correct_text: str, whole_words: bool = True
) -> bool:
    """Score a multiple-choice answer by option text, not by letter.

    Correct when exactly one option's text occurs in the answer (see :func:`choice_matches`) and it is
    ``correct_text``. An answer naming several options ("a dog or a cat") is ambiguous and wrong; an
    answer naming none is wrong. The spec scores "the correct option's text is a substring of the
    answer", which rewards echoing every option; requiring exactly one match removes that loophole.

    Raises:
        MetricError: ``correct_text`` is not one of ``options``.
    """
    if correct_text not in options:
        raise MetricError(f"correct answer {correct_text!r} is not one of the options {list(options)}")
    hits = choice_matches(generated_text, options, whole_words)
    return len(hits) == 1 and hits[0] == correct_text


def mcqa_accuracy(
    answers: Sequence[str | None], questions: Sequence[dict], whole_words: bool = True
) -> dict[str, float | int]:
    """Accuracy of generated answers on shuffled multiple-choice questions.

    Args:
        answers: one generated answer per question.
        questions: the questions as returned by :func:`shuffle_options` (``options`` and ``correct``).
        whole_words: see :func:`choice_matches`.

    Returns:
        ``accuracy``, ``n``, ``correct``, ``ambiguous`` (several options named) and ``no_match``
        (no option named); ambiguous and unmatched answers count as wrong.

    Raises:
        MetricError: lengths differ, no questions, or a question was not shuffled.
    """
    if len(answers) != len(questions):
        raise MetricError(f"answers ({len(answers)}) and questions ({len(questions)}) differ in length")
    if not questions:
        raise MetricError("multiple-choice accuracy needs at least one question")
    correct = ambiguous = no_match = 0
    for answer, q in zip(answers, questions):
        if "correct" not in q:
            raise MetricError("pass questions through shuffle_options first (they need 'correct')")
        hits = choice_matches(answer, q["options"], whole_words)
        ambiguous += len(hits) > 1
        no_match += not hits
        correct += score_choice(answer, q["options"], q["correct"], whole_words)
    return {
        "accuracy": correct / len(questions),
        "n": len(questions),
        "correct": correct,
        "ambiguous": ambiguous,
        "no_match": no_match,
    }


# ------------------------------------------------------------------------------------------ CLIP-I / CLIP-T


def _matrix(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MetricError(f"{name} must be a non-empty [N, dim] array, got shape {np.shape(x)}")
    if not np.isfinite(arr).all():
        raise MetricError(f"{name} contains NaN or infinite values")
    return arr


def _unit(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if (norms == 0).any():
        raise MetricError(f"{name} contains a zero vector (cosine is undefined)")
    return x / norms


def clip_i(gen_emb: np.ndarray, real_emb: np.ndarray) -> float:
    """CLIP-I: the mean over generated images of the cosine to the mean real-photo embedding.

    As in the spec (§7.1), the reference is the mean of the real-photo embeddings as given (the original
    code averages unnormalized CLIP features; the retrieval embedders return unit vectors, whose mean
    points in almost the same direction).

    Args:
        gen_emb: ``[N, dim]`` embeddings of the generated images.
        real_emb: ``[M, dim]`` embeddings of the concept's real photos.

    Raises:
        MetricError: empty, non-finite, zero or mismatched embeddings.
    """
    gen, real = _matrix(gen_emb, "gen_emb"), _matrix(real_emb, "real_emb")
    if gen.shape[1] != real.shape[1]:
        raise MetricError(f"embedding sizes differ: generated {gen.shape[1]}, real {real.shape[1]}")
    reference = _unit(real.mean(axis=0), "the mean real embedding")
    return float((_unit(gen, "gen_emb") @ reference).mean())


def clip_t(gen_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """CLIP-T: the mean cosine between each generated image and its prompt's text embedding.

    Rows are paired (image i with prompt i); a single text row is compared with every image (one
    prompt for all samples).

    Raises:
        MetricError: empty, non-finite, zero or mismatched embeddings.
    """
    gen, text = _matrix(gen_emb, "gen_emb"), _matrix(text_emb, "text_emb")
    if gen.shape[1] != text.shape[1]:
        raise MetricError(f"embedding sizes differ: images {gen.shape[1]}, texts {text.shape[1]}")
    if text.shape[0] not in (1, gen.shape[0]):
        raise MetricError(f"{gen.shape[0]} images but {text.shape[0]} texts; give one text or one per image")
    return float((_unit(gen, "gen_emb") * _unit(text, "text_emb")).sum(axis=1).mean())


def _embed(method: Callable, items: Sequence) -> np.ndarray:
    # Duck-typed retrieval Embedder: silence its progress bar when it has one.
    try:
        takes_progress = "progress" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        takes_progress = False
    return np.asarray(method(list(items), progress=False) if takes_progress else method(list(items)))


def clip_i_with(embedder: Any, generated: Sequence, real: Sequence) -> float:
    """:func:`clip_i` through an embedder with ``embed_images(list) -> [N, dim]`` (PIL images or paths)."""
    if not generated or not real:
        raise MetricError("CLIP-I needs at least one generated image and one real photo")
    return clip_i(_embed(embedder.embed_images, generated), _embed(embedder.embed_images, real))


def clip_t_with(embedder: Any, generated: Sequence, prompts: Sequence[str]) -> float:
    """:func:`clip_t` through an embedder with ``embed_images`` and ``embed_texts``.

    Pass prompts as a text encoder should read them: replace the concept placeholder (``<sks>``) with a
    plain noun (e.g. "a dog"), since CLIP has never seen the learned tokens.
    """
    if not generated or not prompts:
        raise MetricError("CLIP-T needs at least one generated image and one prompt")
    return clip_t(_embed(embedder.embed_images, generated), _embed(embedder.embed_texts, prompts))


# ----------------------------------------------------------------------------------------- face similarity


def _insightface_embedder() -> Callable[[Any], np.ndarray | None] | None:
    try:
        from insightface.app import FaceAnalysis  # type: ignore[import-not-found]
    except ImportError:
        logger.warning(
            "face similarity skipped: insightface is not installed (pip install insightface onnxruntime)"
        )
        return None
    try:
        # The spec's setting: the default buffalo_l pack (ArcFace) on CPU.
        app = FaceAnalysis(name="buffalo_l")
        app.prepare(ctx_id=-1)
    except Exception as exc:  # noqa: BLE001 - a missing or broken model pack must not abort an evaluation
        logger.warning(
            "face similarity skipped: the insightface buffalo_l face model is unavailable (%s)", exc
        )
        return None

    def embed(image: Any) -> np.ndarray | None:
        faces = app.get(np.asarray(image.convert("RGB"))[:, :, ::-1])  # insightface expects BGR
        return np.asarray(faces[0].normed_embedding, dtype=np.float64) if faces else None

    return embed


def _as_image(item: Any) -> Any:
    if isinstance(item, (str, Path)):
        # The project's one photo loader: the same pixel limit and messages as every other path.
        from yochameleon.data.photos import load_image_file

        return load_image_file(item)
    return item


def face_similarity(
    gen_images: Sequence,
    real_images: Sequence,
    backend: str | Callable[[Any], np.ndarray | None] = "insightface",
) -> dict[str, float | int | None] | None:
    """Facial similarity for person concepts (spec §7.1); ``None`` when no face model is available.

    Each real photo contributes the embedding of its first detected face. Each generated image with a
    detected face scores its mean cosine to all real-face embeddings.

    Args:
        gen_images: generated images (PIL images or paths).
        real_images: the concept's real photos (PIL images or paths).
        backend: ``"insightface"`` (ArcFace, buffalo_l, CPU) or a callable ``image -> embedding or None``
            (``None`` meaning no face was found), for other face models and for tests.

    Returns:
        ``None`` (with a logged reason) when insightface or its model is not installed or no real photo
        shows a face. Otherwise ``face_sim``: the mean over generated images *with a detected face*
        (the code's definition; ``None`` when no generated image has one), ``face_sim_with_zeros``: the
        mean over all generated images counting a missing face as 0 (what the paper's very low baseline
        values suggest), ``no_face_count`` and ``n_generated``.

    Raises:
        MetricError: an unknown backend name or no generated images.
    """
    if not gen_images:
        raise MetricError("face similarity needs at least one generated image")
    if callable(backend):
        embed = backend
    elif backend in FACE_BACKENDS:
        embed = _insightface_embedder()
        if embed is None:
            return None
    else:
        raise MetricError(f"unknown face backend {backend!r}; use one of {FACE_BACKENDS} or a callable")

    def faces(images: Iterable) -> list[np.ndarray | None]:
        out = []
        for image in images:
            emb = embed(_as_image(image))
            out.append(None if emb is None else _unit(_matrix(emb, "face embedding")[0], "face embedding"))
        return out

    references = [f for f in faces(real_images) if f is not None]
    if not references:
        logger.warning(
            "face similarity skipped: no face was detected in any of the %d real photos", len(real_images)
        )
        return None
    ref = np.stack(references)
    scores = [None if g is None else float((ref @ g).mean()) for g in faces(gen_images)]
    found = [s for s in scores if s is not None]
    return {
        "face_sim": float(np.mean(found)) if found else None,
        "face_sim_with_zeros": float(np.mean([s if s is not None else 0.0 for s in scores])),
        "no_face_count": len(scores) - len(found),
        "n_generated": len(scores),
    }


# ---------------------------------------------------------------------------------------------- forgetting


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; bfloat16 has no numpy dtype, float32 holds it exactly
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def logits_identical_except(
    base_logits: Any, new_logits: Any, excluded_ids: Iterable[int]
) -> tuple[bool, float]:
    """Forgetting check: are the logits of every id outside ``excluded_ids`` bit-identical?

    Personalization only adds concept-token rows, so on a prompt without the concept every other
    logit must be exactly the base model's. The comparison is on bits, so ``-0.0`` vs ``0.0`` differs
    and a NaN equals a NaN with the same bits.

    Args:
        base_logits: ``[..., vocab]`` logits of the base model (numpy array or torch tensor).
        new_logits: the same positions from the personalized model.
        excluded_ids: vocabulary ids allowed to differ (the concept tokens' rows).

    Returns:
        ``(identical, max_abs_diff)`` over the non-excluded ids (``inf`` where one side is NaN).

    Raises:
        MetricError: shapes or dtypes differ, or an excluded id is outside the vocabulary.
    """
    base, new = _to_numpy(base_logits), _to_numpy(new_logits)
    if base.shape != new.shape or base.ndim == 0:
        raise MetricError(f"logit shapes differ or are scalar: {base.shape} vs {new.shape}")
    if base.dtype != new.dtype:
        raise MetricError(f"logit dtypes differ: {base.dtype} vs {new.dtype}; compare like with like")
    vocab = base.shape[-1]
    ids = np.asarray(sorted({int(i) for i in excluded_ids}), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise MetricError(f"excluded ids must lie in [0, {vocab}), got {ids.min()}..{ids.max()}")
    keep = np.ones(vocab, dtype=bool)
    keep[ids] = False
    a, b = base[..., keep], new[..., keep]
    if a.dtype.kind == "f":
        unsigned = np.dtype(f"u{a.dtype.itemsize}")
        differs = a.view(unsigned) != b.view(unsigned)
    else:
        differs = a != b
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    diff = np.where(differs, np.nan_to_num(diff, nan=np.inf), 0.0)
    return (not bool(differs.any())), float(diff.max()) if diff.size else 0.0


# ----------------------------------------------------------------------------------------------- bootstrap


def _finite_values(values: Iterable[float | None], name: str) -> np.ndarray:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        raise MetricError(f"{name} needs at least one value")
    if not np.isfinite(v).all():
        raise MetricError(f"{name} got NaN or infinite values")
    return v


def _check_boot(n_boot: int, alpha: float) -> None:
    if int(n_boot) < 1:
        raise MetricError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise MetricError(f"alpha must lie in (0, 1), got {alpha}")


def bootstrap_ci(
    values: Iterable[float | None], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (``None`` values are skipped).

    Args:
        values: per-concept (or per-seed) values.
        n_boot: bootstrap resamples.
        seed: resampling seed (the same seed gives the same interval).
        alpha: 0.05 gives a 95% interval.

    Raises:
        MetricError: no values, non-finite values, ``n_boot < 1`` or ``alpha`` outside (0, 1).
    """
    _check_boot(n_boot, alpha)
    v = _finite_values(values, "bootstrap_ci")
    rng = np.random.default_rng(seed)
    # Resample in chunks so n_boot x n index arrays stay small for long value lists.
    chunk = max(1, 4_000_000 // v.size)
    means = np.concatenate(
        [
            v[rng.integers(0, v.size, size=(min(chunk, n_boot - i), v.size))].mean(axis=1)
            for i in range(0, n_boot, chunk)
        ]
    )
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> dict[str, Any]:
    """Mean paired difference ``a - b`` with a bootstrap CI over the pairs.

    Args:
        a, b: values paired by position (e.g. the same concept and seed under two methods).

    Returns:
        ``{"mean": d, "ci": [lo, hi], "n": pairs, "crosses_zero": lo <= 0 <= hi}``; ``crosses_zero``
        means the data do not resolve which of the two is better.

    Raises:
        MetricError: lengths differ, no pairs, or a value is missing or non-finite.
    """
    if len(a) != len(b):
        raise MetricError(f"paired values differ in length: {len(a)} vs {len(b)}")
    if any(x is None for x in a) or any(x is None for x in b):
        raise MetricError("paired values must not be None; drop incomplete pairs first")
    d = _finite_values(
        np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), "paired_bootstrap_diff"
    )
    lo, hi = bootstrap_ci(d, n_boot, seed, alpha)
    return {"mean": float(d.mean()), "ci": [lo, hi], "n": int(d.size), "crosses_zero": bool(lo <= 0 <= hi)}


__all__ = [
    "LABELS",
    "MetricError",
    "bootstrap_ci",
    "choice_matches",
    "clip_i",
    "clip_i_with",
    "clip_t",
    "clip_t_with",
    "face_similarity",
    "logits_identical_except",
    "mc_prompt",
    "mcqa_accuracy",
    "paired_bootstrap_diff",
    "parse_yes_no",
    "recognition_scores",
    "shuffle_options",
    "score_choice",
    "yes_no_from_logprobs",
]
