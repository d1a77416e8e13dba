"""Emu3 backend (``Emu3ForConditionalGeneration``).

Emu3 keeps image tokens in its one vocabulary (``<|visual token NNNNNN|>``) and reads and writes them
through the ordinary embedding and LM head, so the base protocol's ``hidden_states`` and ``logits``
apply unchanged. What is Emu3-specific is the image span, which follows upstream's grid layout::

    <|image start|> "H*W" <|image token|>  row_1 <eol> … row_H <eol>  <eof> <|image end|>

where each row holds ``W`` visual tokens, ``<eol>`` is ``<|extra_200|>`` and ``<eof>`` is
``<|extra_201|>``. :class:`Emu3ImageSpanConstraint` forces every layout token and only lets visual
tokens into the grid cells. Images are resized to one fixed square so every span has the same
length. Concept tokens live on ``<|extra_N|>`` entries that neither the layout nor the tokenizer's
specials use; the vocabulary is never resized.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from yochameleon.backends.base import Backend, LoadOptions, SpecialIds, load_hf
from yochameleon.backends.constraints import SpanConstraint
from yochameleon.errors import BackendError

if TYPE_CHECKING:
    from PIL import Image

_EXTRA = re.compile(r"^<\|extra_(\d+)\|>$")
# <|extra_200|> … <|extra_204|> are end-of-line, end-of-frame, (unused), BOS and EOS in Emu3.
_LAYOUT_EXTRAS = frozenset(range(200, 205))
IMAGE_CELL = -1  # marks a grid cell in a layout template


class Emu3ImageSpanConstraint(SpanConstraint):
    """Upstream's grid layout: header, ``H`` rows of ``W`` visual tokens each closed by end-of-line,
    end-of-frame, end-of-image. Layout positions allow exactly one id; grid cells any visual token."""

    def __init__(self, template: list[int], image_token_ids: tuple[int, ...]) -> None:
        self.template = list(template)
        self._image = torch.tensor(image_token_ids, dtype=torch.long)
        self._fixed = [torch.tensor([t]) for t in self.template]

    def allowed(self, generated: list[int]) -> torch.Tensor:
        n = len(generated)
        if n >= len(self.template):
            raise BackendError(f"the image span is complete after {len(self.template)} tokens")
        return self._image if self.template[n] == IMAGE_CELL else self._fixed[n]

    def done(self, generated: list[int]) -> bool:
        return len(generated) >= len(self.template)


class Emu3Backend(Backend):
    """Emu3 models: ``Emu3-Chat-hf`` / ``Emu3-Gen-hf`` class checkpoints and the tiny Emu3."""

    family = "emu3"

    def __init__(self, name_or_path: str, model, processor) -> None:
        tok = processor.tokenizer
        vmap = model.model.vocabulary_mapping
        image_ids = tuple(int(i) for i in vmap.image_tokens)
        self.eol = _required_id(tok, "<|extra_200|>", name_or_path)
        self.eof = _required_id(tok, tok.eof_token, name_or_path)
        self.wrapper = _required_id(tok, tok.image_wrapper_token, name_or_path)
        eos = int(tok.eos_token_id)
        special = SpecialIds(
            bos=int(tok.bos_token_id),
            eos=eos,
            pad=int(tok.pad_token_id if tok.pad_token_id is not None else eos),
            # Emu3's tokenizer has no separator: the end of a turn is its EOS, as in its chat format.
            eot=eos,
            boi=_required_id(tok, tok.boi_token, name_or_path),
            eoi=_required_id(tok, tok.eoi_token, name_or_path),
            image_token_ids=image_ids,
            image_placeholder=int(tok.image_token_id),
            extra_image_ids=(self.wrapper, self.eol, self.eof),
        )
        vq = model.model.vqmodel
        self.spatial_factor = int(vq.vision_spatial_factor)
        ip = processor.image_processor
        side = _square_side(
            ip.min_pixels, ip.max_pixels, int(getattr(processor, "image_area", 518400)), self.spatial_factor
        )
        self.grid = side // self.spatial_factor
        super().__init__(name_or_path, model, tok, special, self.grid * self.grid, side)
        self.processor = processor
        self.header_ids = self.tokenize(f"{self.grid}*{self.grid}")
        img2bpe = vmap.img2bpe
        self._code2bpe = torch.tensor([img2bpe[c] for c in range(len(img2bpe))], dtype=torch.long)
        self._bpe2code = torch.full((self.vocab_size,), -1, dtype=torch.long)
        self._bpe2code[self._code2bpe] = torch.arange(len(img2bpe))

    @classmethod
    def load(cls, name_or_path: str, options: LoadOptions | None = None) -> Emu3Backend:
        """Load an Emu3 checkpoint from a Hugging Face id or a local directory.

        Raises:
            BackendError: the checkpoint cannot be loaded as an Emu3 model.
        """
        from transformers import Emu3ForConditionalGeneration, Emu3Processor

        model, processor = load_hf(
            Emu3ForConditionalGeneration,
            Emu3Processor,
            name_or_path,
            options,
            "an Emu3 model",
            ["lm_head", "vqmodel", "embed_tokens"],
        )
        return cls(name_or_path, model, processor)

    # ----- concept tokens ---------------------------------------------------------------------
    def free_token_ids(self) -> list[int]:
        """``<|extra_N|>`` ids that are neither layout tokens nor tokenizer specials, lowest first."""
        sp = self.special
        protected = {sp.bos, sp.eos, sp.pad, sp.eot, sp.boi, sp.eoi, *sp.extra_image_ids}
        if sp.image_placeholder is not None:
            protected.add(sp.image_placeholder)
        protected.update(self.tokenizer.all_special_ids)
        free = []
        for name, i in self.tokenizer.get_vocab().items():
            m = _EXTRA.match(name)
            if m and int(m.group(1)) not in _LAYOUT_EXTRAS and i not in protected and i < self.vocab_size:
                free.append(i)
        return sorted(free)

    # ----- images -----------------------------------------------------------------------------
    @property
    def preprocess_id(self) -> str:
        ip = self.processor.image_processor
        return f"emu3-{self.image_size}-{ip.rescale_factor}-{list(ip.image_mean)}-{list(ip.image_std)}"

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """Processor pixels ``[B, 3, S, S]`` of images centre-cropped and resized to the fixed square."""
        squares = [_square(im, self.image_size) for im in images]
        pv = self.processor.image_processor(squares, return_tensors="pt")["pixel_values"]
        if tuple(pv.shape[-2:]) != (self.image_size, self.image_size):
            raise BackendError(
                f"the Emu3 processor produced {tuple(pv.shape[-2:])} pixels, expected "
                f"{self.image_size} square; check min_pixels/max_pixels"
            )
        return pv.to(self.device, self.model.model.vqmodel.dtype)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """VQ-encode images to visual-token ids ``[B, grid * grid]`` in row-major order (no layout tokens)."""
        if not images:
            return torch.empty(0, self.image_seq_len, dtype=torch.long)
        pv = self.pixel_values(images)
        sizes = torch.tensor([[self.image_size, self.image_size]] * len(images))
        codes = self.model.model.vqmodel.encode(pv, sizes, return_dict=True).image_tokens
        codes = torch.stack([c.reshape(-1) for c in codes]).long().cpu()
        return self._code2bpe[codes]

    @torch.no_grad()
    def decode_images(self, ids: torch.Tensor) -> list[Image.Image]:
        """Decode visual-token ids ``[B, grid * grid]`` with upstream's VQ decoder to RGB images."""
        from PIL import Image

        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        if ids.ndim != 2 or ids.shape[1] != self.image_seq_len:
            raise BackendError(f"decode_images expects [B, {self.image_seq_len}] ids, got {tuple(ids.shape)}")
        if ((ids < 0) | (ids >= self.vocab_size)).any() or (
            self._bpe2code[ids.clamp(0, self.vocab_size - 1)] < 0
        ).any():
            raise BackendError("decode_images got ids that are not Emu3 visual tokens")
        vq = self.model.model.vqmodel
        codes = self._bpe2code[ids].reshape(-1, self.grid, self.grid).to(vq.quantize.embedding.weight.device)
        pixels = vq.decode(codes).float().cpu()
        ip = self.processor.image_processor
        mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        rgb = ((pixels * std + mean) / ip.rescale_factor).clamp(0, 255).round().byte()
        return [Image.fromarray(a) for a in rgb.permute(0, 2, 3, 1).numpy()]

    def image_span(self, image_ids: list[int]) -> list[int]:
        """Upstream's grid layout around one image's ``grid * grid`` visual-token ids."""
        image_ids = [int(i) for i in image_ids]
        if len(image_ids) != self.image_seq_len:
            raise BackendError(f"an Emu3 image has {self.image_seq_len} visual tokens, got {len(image_ids)}")
        span = [self.special.boi, *self.header_ids, self.wrapper]
        for r in range(self.grid):
            span += image_ids[r * self.grid : (r + 1) * self.grid] + [self.eol]
        return span + [self.eof, self.special.eoi]

    def span_to_image_ids(self, span: list[int]) -> list[int]:
        """The visual tokens of a generated span, row by row.

        Raises:
            BackendError: the span does not hold exactly ``grid * grid`` visual tokens.
        """
        image = set(self.special.image_token_ids)
        ids = [int(i) for i in span if int(i) in image]
        if len(ids) != self.image_seq_len:
            raise BackendError(
                f"an Emu3 image span must hold {self.image_seq_len} visual tokens, found {len(ids)}"
            )
        return ids

    def image_span_constraint(self) -> Emu3ImageSpanConstraint:
        """Greedy/sampled generation of exactly one image in upstream's grid layout."""
        return Emu3ImageSpanConstraint(
            self.image_span([IMAGE_CELL] * self.image_seq_len), self.special.image_token_ids
        )


def _square_side(min_pixels: int, max_pixels: int, image_area: int, factor: int) -> int:
    """The one square side every image is resized to: the processor's generation area (720 px for
    Emu3's 518,400), rounded to the VQ factor and kept inside ``[min_pixels, max_pixels]``."""
    side = round(image_area**0.5 / factor) * factor
    while side * side > max_pixels and side > factor:
        side -= factor
    while side * side < min_pixels:
        side += factor
    if side * side > max_pixels:
        raise BackendError(
            f"no square image side fits the Emu3 processor's pixel range [{min_pixels}, {max_pixels}]"
        )
    return side


def _square(image: Image.Image, side: int) -> Image.Image:
    """Centre-crop to a square and resize to ``side`` (bicubic), so every image has one grid size."""
    from PIL import Image

    rgb = image.convert("RGB")
    w, h = rgb.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return rgb.crop((left, top, left + s, top + s)).resize((side, side), Image.Resampling.BICUBIC)


def _required_id(tok, token: str | None, name_or_path: str) -> int:
    tid = tok.convert_tokens_to_ids(token) if token else None
    if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id):
        raise BackendError(f"{name_or_path}: the Emu3 tokenizer lacks the layout token {token!r}")
    return int(tid)
