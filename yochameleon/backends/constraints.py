"""Span constraints: which ids may come next while a backend generates text or an image span.

They describe a family's token layout (begin-of-image, a fixed number of image tokens, end-of-image;
text without image ids), so they sit with the backends; :mod:`yochameleon.generation` runs the
decoding loop that asks them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from yochameleon.backends.base import SpecialIds


class SpanConstraint:
    """Decides, step by step, which ids may come next. ``None`` means unconstrained."""

    def allowed(self, generated: list[int]) -> torch.Tensor | None:
        raise NotImplementedError

    def done(self, generated: list[int]) -> bool:
        raise NotImplementedError


class ImageSpanConstraint(SpanConstraint):
    """Begin-of-image, exactly ``n_tokens`` image tokens, end-of-image; then stop."""

    def __init__(self, special: SpecialIds, n_tokens: int) -> None:
        self.special = special
        self.n_tokens = n_tokens
        self._image = torch.tensor(special.image_token_ids, dtype=torch.long)

    def allowed(self, generated: list[int]) -> torch.Tensor:
        n = len(generated)
        if n == 0:
            return torch.tensor([self.special.boi])
        if n <= self.n_tokens:
            return self._image
        return torch.tensor([self.special.eoi])

    def done(self, generated: list[int]) -> bool:
        return len(generated) >= self.n_tokens + 2


class TextConstraint(SpanConstraint):
    """Text only: no image tokens, no image delimiters and no banned (absent-concept) ids."""

    def __init__(
        self,
        special: SpecialIds,
        vocab_size: int,
        banned: list[int] | None = None,
        stop_ids: tuple[int, ...] | None = None,
    ) -> None:
        mask = torch.ones(vocab_size, dtype=torch.bool)
        mask[list(special.image_token_ids) + list(special.extra_image_ids)] = False
        mask[[special.boi, special.eoi, special.pad, special.bos]] = False
        if banned:
            mask[banned] = False
        self._allowed = mask.nonzero().flatten()
        self.stop_ids = stop_ids or (special.eot, special.eos)

    def allowed(self, generated: list[int]) -> torch.Tensor:
        return self._allowed

    def done(self, generated: list[int]) -> bool:
        return bool(generated) and generated[-1] in self.stop_ids


__all__ = ["ImageSpanConstraint", "SpanConstraint", "TextConstraint"]
