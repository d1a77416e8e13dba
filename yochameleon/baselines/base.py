"""One interface for every personalization method the evaluation harness compares.

A method turns a question (with ``<sks>`` naming the concept, optionally ``<image>``) into the
prompt ids the frozen model sees, and says which ids open the answer (a self-prompt) and which ids
precede a generated image. Scoring is then identical for all methods: Yes-vs-No likelihood for
recognition, greedy answers for multiple choice, image-span generation for drawing.

Method names (exact): ``none``, ``text_prompt``, ``image_prompt``, ``yollava``, ``myvlm``,
``yochameleon``, ``yochameleon_no_soft``, ``yochameleon_shared``, ``yochameleon_no_selfprompt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from yochameleon.backends.base import Backend
from yochameleon.generation import Sampling, TextConstraint, generate
from yochameleon.train.sequences import encode_text


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
    def _ids(self, text: str, image: Image.Image | None, concepts=(), extra_images=()) -> list[int]:
        images = [self.backend.encode_images([im])[0].tolist() for im in extra_images]
        if image is not None:
            if "<image>" not in text:
                text = "<image>" + text
            images.append(self.backend.encode_images([image.convert("RGB")])[0].tolist())
        sp = self.backend.special
        return [sp.bos] + encode_text(self.backend, text, list(concepts), images) + [sp.eot]

    # ----- scoring, identical for every method ------------------------------------------------
    @torch.no_grad()
    def yes_no(self, question: str, image: Image.Image) -> tuple[float, float]:
        """Log-probabilities of "Yes" and "No" as the first answer word."""
        p = self.prompt(question, image)
        ids = torch.tensor([p.ids + p.answer_prefix], device=self.backend.device)
        hidden, _ = self.backend.hidden_states(ids)
        logp = torch.log_softmax(self.backend.logits(hidden[0, -1]), dim=-1)
        yes, no = self.backend.tokenize("Yes")[0], self.backend.tokenize("No")[0]
        return float(logp[yes]), float(logp[no])

    @torch.no_grad()
    def answer(self, question: str, image: Image.Image | None = None, max_new_tokens: int = 16) -> str:
        """A greedy text answer (self-prompt tokens are forced, then stripped)."""
        p = self.prompt(question, image)
        constraint = TextConstraint(self.backend.special, self.backend.vocab_size, banned=self._banned())
        out = generate(self.backend, torch.tensor([p.ids + p.answer_prefix]), constraint, max_new_tokens)[0]
        return self.backend.decode_text([t for t in out.tolist() if t not in self._banned()]).strip()

    @torch.no_grad()
    def generate_images(
        self, request: str, n: int = 1, seed: int = 0, temperature: float = 1.0
    ) -> list[Image.Image]:
        """Images for ``request`` through the family's image-span constraint."""
        p = self.prompt(request, None, task="generation")
        ids = torch.tensor([p.ids + p.answer_prefix] * n)
        span = self.backend.image_span_constraint()
        max_new = self.backend.image_seq_len + 2 + 64 * len(self.backend.special.extra_image_ids)
        out = generate(self.backend, ids, span, max_new, Sampling(temperature=temperature, seed=seed))
        rows = [
            self.backend.span_to_image_ids(
                r[: len(self.backend.image_span([0] * self.backend.image_seq_len))]
            )
            for r in out.tolist()
        ]
        return self.backend.decode_images(torch.tensor(rows))

    def _banned(self) -> list[int]:
        return []
