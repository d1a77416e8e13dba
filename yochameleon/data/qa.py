"""Text-QA pairs about a concept, produced by a pluggable answerer that looks at each photo.

Any object with ``answer(question, image) -> str`` is an :class:`Answerer` (the base model itself,
an external VLM, a person…). :func:`generate_text_qa` asks every question about every photo and keeps
a question only when the photos agree on its answer (normalised majority), so one odd photo cannot
teach the concept a wrong attribute.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image

from yochameleon.data.photos import load_rgb
from yochameleon.errors import DataError
from yochameleon.prompts import (
    DEFAULT_SUBJECT,
    FACT_QUESTIONS,
    FACT_VERB_QUESTIONS,
    IMAGE,
    SKS,
    answerer_prompt,
)

logger = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
# "<sks> is small" and "it is small" answer the same as "small".
_LEAD = re.compile(r"^(sks|it|this|that|they|he|she)\s+(is|are|was|were|looks|seems)\s+")


@runtime_checkable
class Answerer(Protocol):
    """Answers a question, optionally about an image."""

    def answer(self, question: str, image: Image.Image | None) -> str:
        """The answer text."""
        ...


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, articles, a leading "it is" and extra spaces: ``"It is a dog."`` -> ``"dog"``."""
    text = " ".join(text.lower().translate(_PUNCT).split())
    return " ".join(_ARTICLES.sub(" ", _LEAD.sub("", text)).split())


@dataclass
class QAResult:
    """What :func:`generate_text_qa` kept and dropped.

    Attributes:
        pairs: ``(question, answer)`` pairs kept (questions keep ``<sks>``).
        agreement: per kept or dropped question, the share of photos that gave the majority answer.
        dropped: questions whose answers disagreed too much (or were all empty).
    """

    pairs: list[tuple[str, str]] = field(default_factory=list)
    agreement: dict[str, float] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


def generate_text_qa(
    photos: Sequence[str | Path | Image.Image],
    questions: Sequence[str],
    answerer: Answerer,
    min_agreement: float = 0.5,
    subject: str = DEFAULT_SUBJECT,
    progress: bool = True,
) -> QAResult:
    """Ask each question about each photo and keep the answers the photos agree on.

    Args:
        photos: the concept's photos (paths or images).
        questions: questions naming the concept as ``<sks>``.
        answerer: who answers. It receives the question with ``<sks>`` replaced by ``subject``
            (it does not know the concept's identifier) and the photo.
        min_agreement: keep a question when at least this share of photos gave the same
            (normalised) answer; ``0 < min_agreement <= 1``.
        subject: how the answerer is told about the concept.
        progress: show a progress bar.

    Returns:
        The kept pairs (one per question, answered with the first raw answer of the majority; the
        subject phrase in the answer becomes ``<sks>``), plus agreement figures.

    Raises:
        DataError: no photos, no questions, a question without ``<sks>``, or a bad ``min_agreement``.
    """
    from tqdm.auto import tqdm

    if not 0.0 < min_agreement <= 1.0:
        raise DataError(f"min_agreement must be in (0, 1], got {min_agreement}")
    if not photos:
        raise DataError("generate_text_qa needs at least one photo")
    if not questions:
        raise DataError("generate_text_qa needs at least one question")
    for q in questions:
        if SKS not in q:
            raise DataError(f"question {q!r} does not name the concept as {SKS}")
    images = [p if isinstance(p, Image.Image) else load_rgb(p) for p in photos]
    subject_re = re.compile(re.escape(subject), re.IGNORECASE)
    result = QAResult()
    with tqdm(total=len(questions) * len(images), desc="text QA", disable=not progress) as bar:
        for question in questions:
            asked = question.replace(SKS, subject)
            raw = []
            for image in images:
                text = answerer.answer(asked, image)
                if not isinstance(text, str):
                    raise DataError(f"the answerer returned {type(text).__name__}, not text, for {asked!r}")
                raw.append(subject_re.sub(SKS, text.strip()))
                bar.update(1)
            norm = [normalize_answer(a) for a in raw]
            votes = Counter(n for n in norm if n)
            if not votes:
                result.agreement[question] = 0.0
                result.dropped.append(question)
                logger.warning("text QA: no answer to %r; dropped", question)
                continue
            best, n_best = votes.most_common(1)[0]
            share = n_best / len(images)
            result.agreement[question] = share
            if share < min_agreement:
                result.dropped.append(question)
                logger.warning(
                    "text QA: answers to %r disagree (%.0f%% agree); dropped", question, 100 * share
                )
                continue
            result.pairs.append((question, raw[norm.index(best)]))
    return result


def fact_question(fact: str) -> str | None:
    """The question a fact answers by its verb (``"<sks> likes walks"`` → ``"What does <sks> like?"``), or ``None``.

    Only facts that open with ``<sks>`` and a verb of :data:`~yochameleon.prompts.FACT_VERB_QUESTIONS`
    have one.
    """
    words = " ".join(fact.split())
    if not words.startswith(SKS + " "):
        return None
    rest = words[len(SKS) + 1 :].lower()
    for verb, question in FACT_VERB_QUESTIONS:
        if rest.startswith(verb + " "):
            return question
    return None


def facts_to_qa(facts: Sequence[str]) -> list[tuple[str, str]]:
    """QA pairs from ``concept.yaml`` facts, each answered by the fact.

    Every fact gets a paraphrase of "What do you know about <sks>?" (in turn, so with more facts than
    paraphrases a question has several answers), and a fact with a known verb also its own question
    (:func:`fact_question`: "<sks> belongs to the blue team." → "What does <sks> belong to?").
    """
    pairs = []
    for i, fact in enumerate(facts):
        if not isinstance(fact, str) or not fact.strip():
            raise DataError(f"fact {i} must be a non-empty string, got {fact!r}")
        pairs.append((FACT_QUESTIONS[i % len(FACT_QUESTIONS)], fact.strip()))
        own = fact_question(fact)
        if own is not None:
            pairs.append((own, fact.strip()))
    return pairs


class PromptedAnswerer:
    """Wraps a chat function (``ask(text, image) -> str``) as an :class:`Answerer`.

    The question is rendered with :func:`yochameleon.prompts.answerer_prompt` (image first, told to
    answer as if it knew the subject), which is how the base model is asked about its own photos.
    """

    def __init__(self, ask, subject: str = DEFAULT_SUBJECT) -> None:
        self.ask = ask
        self.subject = subject

    def answer(self, question: str, image: Image.Image | None) -> str:
        """The wrapped function's answer to the rendered prompt."""
        text = answerer_prompt(question, self.subject)
        return self.ask(text if image is not None else text.replace(IMAGE, ""), image)
