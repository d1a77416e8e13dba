"""One interface for every personalization method the evaluation harness compares.

A method turns a question (with ``<sks>`` naming the concept, optionally ``<image>``) into the
prompt ids the frozen model sees, and says which ids open the answer (a self-prompt) and which ids
precede a generated image. Scoring is then identical for all methods: Yes-vs-No likelihood for
recognition, greedy answers for multiple choice, image-span generation for drawing, all through
:mod:`yochameleon.conversation` (the code inference uses). Trained-token methods go one step further
and score through :class:`~yochameleon.infer.PersonalizedModel` itself (see
:mod:`yochameleon.baselines.trained`).

Method names (exact): ``none``, ``text_prompt``, ``image_prompt``, ``yollava``, ``myvlm``,
``yochameleon``, ``yochameleon_no_soft``, ``yochameleon_shared``, ``yochameleon_no_selfprompt``;
with a concept encoder, ``yochameleon_zeroshot`` and ``yochameleon_warmstart``
(:mod:`yochameleon.baselines.encoded`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from yochameleon.backends.base import Backend
from yochameleon.conversation import generate_images, greedy_answer, image_ids, turn_ids, yes_no_logprobs
from yochameleon.generation import Sampling


@dataclass
class ConceptData:
    """What a method may learn from: the user's concept folder and its prepared training data."""

    name: str
    concept_dir: Path
    photos: list[Path]
    description: str = ""
    oracle_description: str = ""
    data_dir: Path | None = None
    index_dir: Path | None = None


@dataclass
class Prompted:
    """Prompt ids for one query and what follows the end of the human turn."""

    ids: list[int]
    answer_prefix: list[int] = field(default_factory=list)


class Method:
    """Base class: subclasses implement :meth:`fit` and :meth:`prompt`; scoring is shared."""

    name = "base"

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.concept: ConceptData | None = None

    # ----- what subclasses define -------------------------------------------------------------
    def fit(self, concept: ConceptData, workdir: Path) -> None:
        """Learn whatever the method learns about ``concept`` (nothing, for prompting baselines)."""
        self.concept = concept

    def prompt(self, text: str, image: Image.Image | None = None, task: str = "understanding") -> Prompted:
        """Ids for ``text`` (``<sks>`` names the concept) with ``image`` at ``<image>``."""
        raise NotImplementedError

    def prompt_tokens(self) -> int:
        """How many prompt tokens describe the concept (the paper's "Tokens" column)."""
        return 0

    def close(self) -> None:
        """Detach anything the method attached to the shared backend."""

    # ----- shared helpers ---------------------------------------------------------------------
    def _ids(
        self, text: str, image: Image.Image | None, concepts=(), extra_images=(), preamble: str = ""
    ) -> list[int]:
        images = [image_ids(self.backend, im) for im in extra_images]
        if image is not None:
            images.append(image_ids(self.backend, image))
        return turn_ids(self.backend, text, list(concepts), images, preamble=preamble)

    # ----- scoring, identical for every method ------------------------------------------------
    def yes_no(self, question: str, image: Image.Image) -> tuple[float, float]:
        """Log-probabilities of "Yes" and "No" as the first answer word."""
        p = self.prompt(question, image)
        return yes_no_logprobs(self.backend, p.ids + p.answer_prefix)

    def answer(self, question: str, image: Image.Image | None = None, max_new_tokens: int = 16) -> str:
        """A greedy text answer (self-prompt tokens are forced, then stripped)."""
        p = self.prompt(question, image)
        banned = self._banned()
        out = greedy_answer(self.backend, p.ids + p.answer_prefix, max_new_tokens, banned=banned)
        return self.backend.decode_text([t for t in out if t not in banned]).strip()

    def generate_images(
        self, request: str, n: int = 1, seed: int = 0, temperature: float = 1.0
    ) -> list[Image.Image]:
        """Images for ``request`` through the family's image-span constraint."""
        p = self.prompt(request, None, task="generation")
        sampling = Sampling(temperature=temperature, seed=seed)
        return generate_images(self.backend, p.ids + p.answer_prefix, n, sampling)

    def _banned(self) -> list[int]:
        return []
