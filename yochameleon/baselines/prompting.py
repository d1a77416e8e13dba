"""Prompting baselines: no personalization, a text description, reference photos in context."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from yochameleon.baselines.base import ConceptData, Method, Prompted
from yochameleon.conversation import image_span_length
from yochameleon.data.photos import load_rgb
from yochameleon.errors import ConfigError
from yochameleon.prompts import SKS

# With no learned identifier, the concept is called by a plain word, as the paper's prompting rows do.
PLAIN_NAME = "sks"


class NoPersonalization(Method):
    """``none``: the base model, with the identifier as a plain, meaningless word."""

    name = "none"

    def prompt(self, text: str, image: Image.Image | None = None, task: str = "understanding") -> Prompted:
        return Prompted(self._ids(text.replace("<sks>", PLAIN_NAME), image))


def definition(description: str, fallback: str) -> str:
    """The preamble that tells the model who ``sks`` is, from a user's description.

    A description that names ``<sks>`` (``"<sks> is a brown dog."``) is used as written; one that does
    not (``"a brown dog"``, as ``concept.yaml`` usually holds it) becomes ``"sks is a brown dog."``.
    Why: prepended bare, the description never says that it describes ``sks``, and the question
    that follows asks about a name the prompt never defined.
    """
    text = " ".join((description or fallback).split())
    if SKS not in text:
        text = f"{SKS} is {text.rstrip('.')}."
    return text.replace(SKS, PLAIN_NAME)


class TextPrompt(Method):
    """``text_prompt``: the concept's description, as a definition of its name, before every prompt."""

    name = "text_prompt"

    def fit(self, concept: ConceptData, workdir: Path) -> None:
        super().fit(concept, workdir)
        self.description = definition(concept.description, f"a {concept.name}")

    def prompt(self, text: str, image: Image.Image | None = None, task: str = "understanding") -> Prompted:
        return Prompted(self._ids(text.replace("<sks>", PLAIN_NAME), image, preamble=self.description))

    def prompt_tokens(self) -> int:
        return len(self.backend.tokenize(self.description))


class OracleTextPrompt(TextPrompt):
    """``text_prompt_oracle``: the upper-bound text row, a description that names every detail.

    It reads :attr:`ConceptData.oracle_description`, which a benchmark that knows the ground truth
    fills in (the toy world names the marks a user's description leaves out); a concept without one
    is refused rather than silently scored as ``text_prompt``.
    """

    name = "text_prompt_oracle"

    def fit(self, concept: ConceptData, workdir: Path) -> None:
        if not concept.oracle_description:
            raise ConfigError(
                f"text_prompt_oracle needs an oracle description for concept {concept.name!r} "
                "(ConceptData.oracle_description); only benchmarks with ground truth provide one"
            )
        Method.fit(self, concept, workdir)
        self.description = definition(concept.oracle_description, "")


class ImagePrompt(Method):
    """``image_prompt``: ``k`` reference photos in context ("This is sks: <image>…").

    Warns when the prompt no longer fits the model's context length.
    """

    name = "image_prompt"

    def __init__(self, backend, k: int = 1) -> None:
        super().__init__(backend)
        self.k = k

    def fit(self, concept: ConceptData, workdir: Path) -> None:
        super().fit(concept, workdir)
        self.references = [load_rgb(p) for p in concept.photos[: self.k]]
        limit = getattr(self.backend.model.config.get_text_config(), "max_position_embeddings", None)
        if limit and self.prompt_tokens() + 64 > limit:
            warnings.warn(
                f"image_prompt with k={self.k} uses {self.prompt_tokens()} tokens, past the model's context "
                f"length {limit}; answers will be truncated or meaningless",
                stacklevel=2,
            )

    def prompt(self, text: str, image: Image.Image | None = None, task: str = "understanding") -> Prompted:
        prefix = f"This is {PLAIN_NAME}: " + "<image>" * len(self.references) + ". "
        body = prefix + text.replace("<sks>", PLAIN_NAME)
        if image is not None and "<image>" not in text:
            body = prefix + "<image>" + text.replace("<sks>", PLAIN_NAME)
        return Prompted(
            self._ids(body, None, extra_images=self.references + ([image] if image is not None else []))
        )

    def prompt_tokens(self) -> int:
        span = image_span_length(self.backend)
        return self.k * span + len(self.backend.tokenize(f"This is {PLAIN_NAME}: ."))
