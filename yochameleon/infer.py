"""Inference with one or more attached concepts: recognize, ask, caption, generate images.

Prompts name concepts as ``<NAME>`` (``"Is <bo> next to <mắm>?"``, matched in NFC form, so a
decomposed spelling finds the concept too); with a single concept attached, ``<sks>`` also refers to
it. Each named concept's personalized prompt is prepended, in order of appearance; a question also
carries the prompts of attached concepts related to those it names (the ``relations`` of their
concept files, see :mod:`yochameleon.relations`), so "Who is <mắm>'s brother?" can be answered
"<bo> …". The ids of attached concepts that a prompt neither names nor relates are masked out of the
logits, so a prompt without any concept behaves exactly like the base model. A ``<NAME>`` that is not attached is read as plain text with a warning, or refused
with ``strict=True``.

Self-prompted token sets are either forced (appended to the prompt) or emitted by the model, which
is then restricted to the concept's token set for at most that many steps. A prompt naming several
concepts opens its answer with each named concept's u-tokens in turn, and its image with each one's
g-tokens in turn (order of appearance). Concepts trained without self-prompting
(``self_prompting=False``) get no token set before the answer or the image.

Prompts become ids, and ids become scores, answers and images, through
:mod:`yochameleon.conversation`: the code training, checkpoint selection and evaluation use too.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from yochameleon.backends import LoadOptions, load_backend
from yochameleon.backends.base import Backend
from yochameleon.concept import ConceptTokens, get_bank, load_concept, normalize_name, related_concepts
from yochameleon.conversation import (
    IMAGE,
    generate_images,
    greedy_answer,
    image_ids,
    turn_ids,
    yes_no_logprobs,
)
from yochameleon.data.photos import load_image_file
from yochameleon.errors import ConceptError
from yochameleon.generation import ImageSpanConstraint, Sampling, SpanConstraint, TextConstraint
from yochameleon.prompts import recognition_question

logger = logging.getLogger(__name__)

_NAME = re.compile(r"<([^<>\s/\\]+)>")


@dataclass
class Answer:
    """A generated answer and how its self-prompt was produced."""

    text: str
    self_prompt: list[int]
    forced: bool


class SelfPromptThenImage(SpanConstraint):
    """The model may emit up to ``len(g_ids)`` of its g-tokens, then must produce the image span.

    Stateless (derived from the generated ids), so one instance serves every row of a batch.
    """

    def __init__(self, g_ids: list[int], span: ImageSpanConstraint) -> None:
        self.prefix = torch.tensor(g_ids + [span.special.boi])
        self.n = len(g_ids)
        self.span = span

    def _split(self, generated: list[int]) -> int | None:
        boi = self.span.special.boi
        return generated.index(boi) if boi in generated else None

    def allowed(self, generated):
        k = self._split(generated)
        if k is None:
            return self.prefix if len(generated) < self.n else self.span.allowed([])
        return self.span.allowed(generated[k:])

    def done(self, generated):
        k = self._split(generated)
        return k is not None and self.span.done(generated[k:])


class PersonalizedModel:
    """A frozen backend with concepts attached, ready for inference.

    Args:
        backend: the model; concepts are attached to it (see :func:`yochameleon.concept.load_concept`).
        strict: a prompt naming a concept that is not attached is an error instead of a warning.
        self_prompting: answers open with the concept's u-tokens and images with its g-tokens, as
            in training with self-prompting (the default). ``False`` for concepts trained without it
            (the ``yochameleon_no_selfprompt`` ablation, the Yo'LLaVA-style baseline).
    """

    def __init__(self, backend: Backend, strict: bool = False, self_prompting: bool = True) -> None:
        self.backend = backend
        self.strict = strict
        self.self_prompting = self_prompting

    @classmethod
    def load(
        cls,
        model: str,
        concept_files: list[str | Path],
        device: str = "auto",
        options: LoadOptions | None = None,
        strict: bool = False,
        self_prompting: bool = True,
    ) -> PersonalizedModel:
        """Load a base model and attach concept files.

        Concepts trained in separate runs attach together: each keeps its file's ids when they are
        free and otherwise moves to free reserved ids (:func:`yochameleon.concept.attach`).
        """
        if options is None:
            dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
            options = LoadOptions(device=dev)
        backend = load_backend(model, options)
        for f in concept_files:
            load_concept(backend, f)
        return cls(backend, strict=strict, self_prompting=self_prompting)

    @property
    def concepts(self) -> dict[str, ConceptTokens]:
        bank = get_bank(self.backend)
        return dict(bank.concepts) if bank else {}

    # ----- prompt assembly --------------------------------------------------------------------
    def _resolve(self, text: str) -> tuple[str, list[ConceptTokens]]:
        concepts = self.concepts
        plain = {IMAGE} | {s for c in concepts.values() for s in c.strings}
        used: list[ConceptTokens] = []
        unknown: list[str] = []

        def sub(m: re.Match) -> str:
            name = normalize_name(m.group(1))
            if name in concepts:
                c = concepts[name]
            elif name == "sks" and len(concepts) == 1:
                c = next(iter(concepts.values()))
            else:
                if m.group(0) not in plain and f"<{name}>" not in unknown:
                    unknown.append(f"<{name}>")
                return m.group(0)
            if c not in used:
                used.append(c)
            return c.sks

        resolved = _NAME.sub(sub, text)
        if unknown:
            self._unknown_names(unknown)
        return resolved, used

    def _unknown_names(self, unknown: list[str]) -> None:
        """Warn (or, when strict, refuse) about ``<NAME>``s in a prompt that no attached concept has."""
        names = ", ".join(unknown)
        attached = ", ".join(f"<{n}>" for n in self.concepts) or "none"
        what = "is not an attached concept" if len(unknown) == 1 else "are not attached concepts"
        message = f"the prompt names {names}, which {what} (attached: {attached})"
        if "<sks>" in unknown and len(self.concepts) > 1:
            message += "; with several concepts attached, name each one instead of <sks>"
        if self.strict:
            raise ConceptError(message)
        logger.warning("%s; it is read as plain text", message)

    def _prompt_ids(
        self, text: str, image: Image.Image | str | Path | None, related: bool = False
    ) -> tuple[list[int], list[ConceptTokens]]:
        """The human turn's ids and the concepts ``text`` names, in order of appearance.

        With ``related``, the preamble also carries the personalized prompts of the attached
        concepts related to those named (:meth:`cast`), as relation records are trained.
        """
        resolved, used = self._resolve(text)
        images = []
        if image is not None:
            # Paths go through the same checks as concept photos (pixel limit, unreadable files).
            img = load_image_file(image) if isinstance(image, (str, Path)) else image
            images = [image_ids(self.backend, img)]
        cast = self.cast(used) if related else used
        preamble = " ".join(c.personalized_prompt() for c in cast)
        return turn_ids(self.backend, resolved, cast, images, preamble=preamble), used

    def cast(self, used: list[ConceptTokens]) -> list[ConceptTokens]:
        """``used`` followed by the attached concepts related to them (in the order they were attached).

        Relations come from the concept files (``relations``, written by a run that trained the
        concepts together or by ``yochameleon relate``).
        """
        concepts = self.concepts
        return used + [concepts[n] for n in related_concepts(self.backend, [c.spec.name for c in used])]

    def _banned(self, used: list[ConceptTokens]) -> list[int]:
        keep = {i for c in used for i in c.ids}
        return [i for c in self.concepts.values() for i in c.ids if i not in keep]

    # ----- understanding ----------------------------------------------------------------------
    def ask_detailed(
        self,
        question: str,
        image: Image.Image | str | None = None,
        force_tokens: bool = False,
        max_new_tokens: int = 48,
        related: bool = True,
    ) -> Answer:
        """Answer ``question`` (optionally about ``image``), reporting the self-prompt.

        See :meth:`ask` for the arguments.
        """
        ids, used = self._prompt_ids(question, image, related=related)
        sp = self.backend.special
        cast = self.cast(used) if related else used
        text_c = TextConstraint(sp, self.backend.vocab_size, banned=self._banned(cast))
        u_ids = [i for c in used for i in c.u_ids] if self.self_prompting else []
        if force_tokens and u_ids:
            ids = ids + u_ids
            constraint: SpanConstraint = text_c
        elif u_ids:
            constraint = _SelfPromptText(u_ids, text_c)
        else:
            constraint = text_c
        out = greedy_answer(self.backend, ids, max_new_tokens, constraint=constraint)
        concept_ids = {i for c in self.concepts.values() for i in c.ids}
        prompt_part = u_ids if force_tokens else [t for t in out if t in concept_ids]
        return Answer(self._render_answer(out), prompt_part, force_tokens)

    def _render_answer(self, ids: list[int]) -> str:
        """Text of generated ids: a concept's identifier reads as ``<name>``, its other tokens vanish."""
        names = {c.sks_id: f"<{name}>" for name, c in self.concepts.items()}
        latent = {i for c in self.concepts.values() for i in c.ids} - set(names)
        parts, run = [], []
        for t in ids:
            if t == self.backend.special.pad or t in latent:
                continue
            if t in names:
                parts += [self.backend.decode_text(run), names[t]]
                run = []
            else:
                run.append(t)
        parts.append(self.backend.decode_text(run))
        return "".join(parts).strip()

    def ask(
        self,
        question: str,
        image: Image.Image | str | None = None,
        force_tokens: bool = False,
        max_new_tokens: int = 48,
        related: bool = True,
    ) -> str:
        """Answer a question; ``<NAME>`` (or ``<sks>``) in the text refers to an attached concept.

        The preamble holds the personalized prompt of every concept the question names, in order of
        appearance, then (``related=True``) of every attached concept related to them, so "Who is
        <mắm>'s brother?" can be answered "<bo> …". The answer opens with the u-tokens of the concepts
        the question names, in turn (forced with ``force_tokens``, else emitted by the model).

        Args:
            question: the question, naming concepts as ``<NAME>``.
            image: an optional photo (placed by the ``<image>`` rule).
            force_tokens: force the u-tokens instead of letting the model emit them.
            max_new_tokens: at most this many new ids.
            related: add the attached concepts related to those named (relations of their files).
        """
        return self.ask_detailed(question, image, force_tokens, max_new_tokens, related).text

    def caption(self, image: Image.Image | str, concept: str | None = None) -> str:
        """Describe ``image``, naming the concept when it is there."""
        name = concept or self._single()
        return self.ask(f"<{name}> Describe this photo.<image>", image=image)

    def recognize(
        self, image: Image.Image | str, concept: str | None = None, mode: str = "likelihood"
    ) -> bool:
        """Is the concept in ``image``? ``mode`` is ``likelihood`` (Yes vs No) or ``generate``."""
        name = concept or self._single()
        question = recognition_question(0).replace("<sks>", f"<{name}>")
        if mode == "generate":
            # As recognition trains: the concept's own prompt only.
            answer = self.ask(question, image=image, force_tokens=True, related=False).lower()
            return answer.startswith("yes")
        yes, no = self.yes_no_logprobs(question, image)
        return yes > no

    def yes_no_logprobs(self, question: str, image: Image.Image | str | None) -> tuple[float, float]:
        """Log-probabilities of answering "Yes" and "No" after the forced u-tokens.

        The evaluation harness scores trained concepts with exactly these numbers.
        """
        ids, used = self._prompt_ids(question, image)
        if self.self_prompting:
            ids = ids + [i for c in used for i in c.u_ids]
        return yes_no_logprobs(self.backend, ids)

    # ----- generation -------------------------------------------------------------------------
    def generate_image(
        self,
        prompt: str,
        n: int = 1,
        seed: int | None = 0,
        force_tokens: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        progress: bool = False,
    ) -> list[Image.Image]:
        """Generate ``n`` images for ``prompt`` (e.g. ``"A photo of <sks>."``).

        A prompt naming several concepts (``"A photo of <bo> next to <mắm>."``) carries each one's
        personalized prompt, and the image opens with each one's g-tokens in turn, in order of
        appearance (forced; with ``force_tokens=False`` the model may emit up to that many of them).
        Sampling is seeded (deterministic for a seed); ``temperature=0`` is greedy.
        """
        ids, used = self._prompt_ids(prompt, None)
        g_ids = [i for c in used for i in c.g_ids] if self.self_prompting else []
        span = self.backend.image_span_constraint()
        if force_tokens or not g_ids:
            ids = ids + g_ids
            constraint: SpanConstraint = span
            extra = 0
        else:
            constraint = SelfPromptThenImage(g_ids, span)
            extra = len(g_ids)
        sampling = Sampling(temperature=temperature, top_k=top_k, seed=seed)
        return generate_images(self.backend, ids, n, sampling, constraint, extra, progress=progress)

    def generate_to_dir(self, prompt: str, out_dir: str | Path, n: int = 4, seed: int = 0) -> list[Path]:
        """Generate ``n`` images and write them as PNGs to ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, im in enumerate(self.generate_image(prompt, n=n, seed=seed, progress=True)):
            p = out / f"sample_{seed}_{i}.png"
            im.save(p)
            paths.append(p)
        return paths

    def _single(self) -> str:
        if len(self.concepts) != 1:
            raise ConceptError(
                f"name a concept: {len(self.concepts)} are attached ({', '.join(self.concepts)})"
            )
        return next(iter(self.concepts))


class _SelfPromptText(SpanConstraint):
    """The model emits its u-tokens (at most all of them, in any order it likes), then text."""

    def __init__(self, u_ids: list[int], text: TextConstraint) -> None:
        self.u = torch.tensor(u_ids)
        self.u_set = set(u_ids)
        self.text = text
        self.n = len(u_ids)

    def allowed(self, generated):
        k = 0
        while k < len(generated) and generated[k] in self.u_set:
            k += 1
        if k == len(generated) and k < self.n:
            return torch.cat([self.u, self.text.allowed(generated)]).unique()
        return self.text.allowed(generated[k:])

    def done(self, generated):
        return self.text.done(generated)
