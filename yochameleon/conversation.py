"""One path from a prompt to ids, and from ids to scores, answers and images.

Inference (:class:`~yochameleon.infer.PersonalizedModel`), the evaluated methods
(:class:`~yochameleon.baselines.Method`), checkpoint selection and the training sequences all lay out
a turn the same way::

    <bos> [preamble ]text <eot> [self-prompt] answer

* Concept token strings and ``<image>`` become ids directly, never through the tokenizer, so the ids
  do not depend on how a tokenizer treats reserved vocabulary entries.
* **The** ``<image>`` **rule**: each ``<image>`` is replaced by the next image's span. A single image
  that the text does not place goes at the start of the text, after the preamble (the personalized
  prompt or a description). Training put it there, so inference and evaluation put it there too.

Scoring lives here as well, so a number means the same wherever it is computed: the Yes/No
log-probabilities of the answer's first word, greedy answers under a constraint, and image
generation whose length comes from the backend's own span layout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from PIL import Image

from yochameleon.backends.base import Backend
from yochameleon.concept import ConceptTokens
from yochameleon.errors import DataError
from yochameleon.generation import Sampling, SpanConstraint, TextConstraint, generate
from yochameleon.prompts import IMAGE

YES, NO = "Yes", "No"


def encode_text(
    backend: Backend,
    text: str,
    concepts: Sequence[ConceptTokens] = (),
    images: Sequence[list[int]] | None = None,
) -> list[int]:
    """Ids of ``text``: concept token strings and ``<image>`` become ids directly, the rest is tokenized.

    Args:
        backend: the base model (tokenizer and image spans).
        text: the text, naming concepts by their token strings (``<reserved…>``, not ``<sks>``).
        concepts: the concepts whose token strings may appear in ``text``.
        images: VQ ids of the images, one per ``<image>``, in order.

    Raises:
        DataError: the number of ``<image>`` placeholders differs from the number of images.
    """
    table = {s: i for c in concepts for s, i in zip(c.strings, c.ids, strict=True)}
    pieces = [re.escape(s) for s in sorted(table, key=len, reverse=True)] + [re.escape(IMAGE)]
    pattern = re.compile("(" + "|".join(pieces) + ")")
    pending = list(images or [])
    ids: list[int] = []
    for part in pattern.split(text):
        if not part:
            continue
        if part == IMAGE:
            if not pending:
                raise DataError(f"text has more {IMAGE} placeholders than images: {text[:80]!r}")
            ids += backend.image_span(pending.pop(0))
        elif part in table:
            ids.append(table[part])
        else:
            ids += backend.tokenize(part)
    if pending:
        raise DataError(f"text has fewer {IMAGE} placeholders than images: {text[:80]!r}")
    return ids


def turn_ids(
    backend: Backend,
    text: str,
    concepts: Sequence[ConceptTokens] = (),
    images: Sequence[list[int]] = (),
    preamble: str = "",
) -> list[int]:
    """The human turn ``<bos> [preamble ]text <eot>`` as ids, images placed by the ``<image>`` rule.

    Args:
        backend: the base model.
        text: the user's text (a question, a request), concepts named by their token strings.
        concepts: the concepts whose token strings may appear in ``preamble`` or ``text``.
        images: VQ ids of the images (see :func:`image_ids`), one per ``<image>``; one image
            without a placeholder goes at the start of ``text``.
        preamble: text before the user's text, e.g. the personalized prompts of the concepts named.

    Raises:
        DataError: placeholders and images do not pair up.
    """
    if images and IMAGE not in text:
        text = IMAGE + text
    body = f"{preamble} {text}" if preamble else text
    sp = backend.special
    return [sp.bos] + encode_text(backend, body, concepts, images) + [sp.eot]


@torch.no_grad()
def image_ids(backend: Backend, image: Image.Image) -> list[int]:
    """VQ ids of one image, as :func:`turn_ids` takes them."""
    return backend.encode_images([image.convert("RGB")])[0].tolist()


@torch.no_grad()
def yes_no_logprobs(backend: Backend, ids: list[int]) -> tuple[float, float]:
    """Log-probabilities that the answer after ``ids`` starts with "Yes" and with "No".

    ``ids`` is the whole context before the answer's first word: the human turn and any
    self-prompt the answer opens with. One forward pass; the log-softmax runs over the full
    vocabulary, so the two numbers are comparable across prompts and methods.
    """
    hidden, _ = backend.hidden_states(torch.tensor([ids], device=backend.device))
    logp = torch.log_softmax(backend.logits(hidden[0, -1]), dim=-1)
    yes, no = backend.tokenize(YES)[0], backend.tokenize(NO)[0]
    return float(logp[yes]), float(logp[no])


def greedy_answer(
    backend: Backend,
    ids: list[int],
    max_new_tokens: int,
    banned: Sequence[int] = (),
    constraint: SpanConstraint | None = None,
) -> list[int]:
    """The greedy answer's ids after ``ids``, up to and including its end-of-turn.

    Args:
        backend: the model, with any attached concepts.
        ids: the context (human turn plus any forced self-prompt).
        max_new_tokens: at most this many new ids.
        banned: ids the answer may not contain (text only is always enforced).
        constraint: a constraint to use instead of text-only-minus-``banned`` (e.g. one that lets
            the model emit its self-prompt first).
    """
    if constraint is None:
        constraint = TextConstraint(backend.special, backend.vocab_size, banned=list(banned))
    return generate(backend, torch.tensor([ids]), constraint, max_new_tokens)[0].tolist()


def image_span_length(backend: Backend) -> int:
    """Ids in one image span (begin/end of image and any layout tokens included), by the backend's layout."""
    filler = backend.special.image_token_ids[0]
    return len(backend.image_span([filler] * backend.image_seq_len))


@torch.no_grad()
def generate_images(
    backend: Backend,
    ids: list[int],
    n: int,
    sampling: Sampling,
    constraint: SpanConstraint | None = None,
    self_prompt_len: int = 0,
    progress: bool = False,
) -> list[Image.Image]:
    """``n`` images generated after ``ids``, decoded.

    Args:
        backend: the model, with any attached concepts.
        ids: the context (human turn plus any forced self-prompt).
        n: images to generate (one batch of ``n`` rows).
        sampling: decoding settings (seeded, so deterministic for a seed).
        constraint: the span constraint; by default the backend's image span.
        self_prompt_len: at most this many ids the constraint lets the model emit before the image
            span (its own self-prompt).
        progress: show a progress bar.
    """
    constraint = constraint or backend.image_span_constraint()
    span = image_span_length(backend)
    out = generate(backend, torch.tensor([ids] * n), constraint, self_prompt_len + span, sampling, progress)
    rows = []
    for row in out.tolist():
        start = row.index(backend.special.boi)
        rows.append(backend.span_to_image_ids(row[start : start + span]))
    return backend.decode_images(torch.tensor(rows))


__all__ = [
    "IMAGE",
    "encode_text",
    "generate_images",
    "greedy_answer",
    "image_ids",
    "image_span_length",
    "turn_ids",
    "yes_no_logprobs",
]
