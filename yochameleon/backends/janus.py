"""Janus backend (``JanusForConditionalGeneration``): two image paths behind one id space.

Janus reads an image it is *shown* through a SigLIP vision encoder and an aligner (no VQ ids), and
*draws* an image through separate generation embeddings, a generation aligner and a generation head
over its VQ codebook. The rest of yochameleon only sees token ids, so this backend exposes one
combined id space:

* ids ``[0, V)`` are the language model's text vocabulary (embedding + ``lm_head``); concept
  tokens live here, on embedding rows the tokenizer leaves unnamed (named at load, never resized);
* ids ``[V, V + K)`` stand for the ``K`` VQ codes (``image_token_ids``). ``encode_images`` returns
  them and ``decode_images`` inverts them with upstream's VQ model.

An image span is ``<begin_of_image>`` + the image's code ids + ``<end_of_image>`` in both roles; the
backend tells the roles apart by turn, which is what the roles mean: a span in a *user* turn (an even
number of end-of-turn ids before it) is read through the vision encoder, a span in an *assistant*
turn, or any code id fed while continuing a KV cache, is embedded through the generation embeddings
and aligner. The vision encoder needs pixels, not codes: ``encode_images`` remembers each image's
preprocessed pixels under its codes (a content key), and :meth:`Backend.image_side_data` /
:meth:`Backend.restore_image_side_data` let a token cache store and restore them.

:meth:`JanusBackend.logits` returns, over the combined space, the log-probabilities of an equal
mixture of the text head and the generation head: ``log_softmax(lm_head(h)) - log 2`` on text ids
and ``log_softmax(generation_head(h)) - log 2`` on code ids. Cross-entropy against a code id is
therefore upstream's generation-head cross-entropy plus the constant ``log 2`` (same gradient), a
text target gets upstream's text cross-entropy plus ``log 2``, and any constraint that allows one
modality only (text, or image cells) sees exactly upstream's distribution.
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from yochameleon.backends.base import Backend, LoadOptions, SpecialIds, load_hf
from yochameleon.errors import BackendError

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

FREE_ROW_TOKEN = "<|yoc_row_{}|>"
_FREE_ROW = re.compile(r"^<\|yoc_row_\d+\|>$")
_LOG2 = math.log(2.0)


class JanusBackend(Backend):
    """Janus / Janus-Pro models and the tiny Janus."""

    family = "janus"

    def __init__(self, name_or_path: str, model, processor) -> None:
        tok = processor.tokenizer
        text_rows = int(model.get_input_embeddings().weight.shape[0])
        n_codes = int(model.config.vq_config.num_embeddings)
        _name_unused_rows(tok, text_rows, name_or_path)
        self.text_vocab_size = text_rows
        self.n_codes = n_codes
        grid = int(model.model.vqmodel.quantize.quant_state_dims[0])
        vision = model.config.vision_config
        n_patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        if n_patches != grid * grid:
            raise BackendError(
                f"{name_or_path}: the vision encoder reads {n_patches} patches but the VQ model writes "
                f"{grid * grid} codes; one image span cannot serve both roles"
            )
        eos = int(tok.eos_token_id)
        special = SpecialIds(
            bos=int(tok.bos_token_id),
            eos=eos,
            pad=int(tok.pad_token_id if tok.pad_token_id is not None else eos),
            # Janus's tokenizer has no separator: a turn ends with its end-of-sentence token.
            eot=eos,
            boi=_required_id(tok, tok.boi_token, name_or_path),
            eoi=_required_id(tok, tok.eoi_token, name_or_path),
            image_token_ids=tuple(range(text_rows, text_rows + n_codes)),
            image_placeholder=_required_id(tok, tok.image_token, name_or_path),
        )
        super().__init__(name_or_path, model, tok, special, grid * grid, int(vision.image_size))
        self.processor = processor
        self._pixels: dict[bytes, torch.Tensor] = {}

    @classmethod
    def load(cls, name_or_path: str, options: LoadOptions | None = None) -> JanusBackend:
        """Load a Janus checkpoint from a Hugging Face id or a local directory.

        Raises:
            BackendError: the checkpoint cannot be loaded as a Janus model.
        """
        from transformers import JanusForConditionalGeneration, JanusProcessor

        model, processor = load_hf(
            JanusForConditionalGeneration,
            JanusProcessor,
            name_or_path,
            options,
            "a Janus model",
            ["lm_head", "vqmodel", "vision_model", "aligner", "generation_", "embed_tokens"],
        )
        return cls(name_or_path, model, processor)

    # ----- the combined id space ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Text rows plus VQ codes: the width of :meth:`logits`."""
        return self.text_vocab_size + self.n_codes

    def free_token_ids(self) -> list[int]:
        """Text-embedding rows no tokenizer entry used (named ``<|yoc_row_N|>`` at load)."""
        protected = set(self.tokenizer.all_special_ids) - {
            i for n, i in self.tokenizer.get_vocab().items() if _FREE_ROW.match(n)
        }
        return sorted(
            i
            for n, i in self.tokenizer.get_vocab().items()
            if _FREE_ROW.match(n) and i < self.text_vocab_size and i not in protected
        )

    def decode_text(self, ids: list[int], skip_special: bool = True) -> str:
        # Code ids have no text; they are dropped even when special ids are kept.
        return super().decode_text([i for i in ids if i < self.text_vocab_size], skip_special)

    # ----- images -------------------------------------------------------------------------------
    @property
    def preprocess_id(self) -> str:
        ip = self.processor.image_processor
        return (
            f"janus-{ip.size}-{ip.rescale_factor}-{list(ip.image_mean)}-{list(ip.image_std)}"
            f"-{getattr(ip, 'background_color', None)}"
        )

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """Processor pixels ``[B, 3, S, S]`` (resized, padded to a square, normalized), float32 on CPU."""
        rgb = [im.convert("RGB") for im in images]
        return self.processor.image_processor(rgb, return_tensors="pt")["pixel_values"].float().cpu()

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """VQ-encode images to code ids ``[B, image_seq_len]`` (``V + code``) and remember their pixels.

        The pixels are what the vision encoder reads when the image is shown to the model; they are
        kept under the codes (see :meth:`image_side_data`).
        """
        if not images:
            return torch.empty(0, self.image_seq_len, dtype=torch.long)
        pv = self.pixel_values(images)
        vq = self.model.model.vqmodel
        codes = vq.encode(pv.to(self.device, vq.dtype), return_dict=True).image_tokens
        codes = codes.reshape(len(images), self.image_seq_len).long().cpu()
        for row, pixels in zip(codes, pv, strict=True):
            self._remember(row, pixels)
        return codes + self.text_vocab_size

    @torch.no_grad()
    def decode_images(self, ids: torch.Tensor) -> list[Image.Image]:
        """Decode code ids ``[B, image_seq_len]`` with upstream's VQ decoder to RGB images."""
        from PIL import Image

        codes = self._codes(torch.as_tensor(ids, dtype=torch.long).cpu())
        vq = self.model.model.vqmodel
        pixels = vq.decode(codes.to(self.device)).float().cpu()
        ip = self.processor.image_processor
        mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        rgb = ((pixels * std + mean) / ip.rescale_factor).clamp(0, 255).round().byte()
        return [Image.fromarray(a) for a in rgb.permute(0, 2, 3, 1).numpy()]

    def image_span(self, image_ids: list[int]) -> list[int]:
        image_ids = [int(i) for i in image_ids]
        if len(image_ids) != self.image_seq_len:
            raise BackendError(f"a Janus image has {self.image_seq_len} codes, got {len(image_ids)}")
        return [self.special.boi, *image_ids, self.special.eoi]

    def image_side_data(self, image_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"pixel_values": [B, 3, S, S]}``: the preprocessed pixels the vision encoder reads.

        Raises:
            BackendError: an image was not encoded by this backend (nor restored from a cache).
        """
        codes = self._codes(torch.as_tensor(image_ids, dtype=torch.long).cpu())
        return {"pixel_values": torch.stack([self._lookup(row) for row in codes])}

    def restore_image_side_data(self, image_ids: torch.Tensor, data: dict[str, torch.Tensor]) -> None:
        """Remember cached pixels for ``image_ids`` so those images can be shown to the model.

        Raises:
            BackendError: ``data`` lacks ``pixel_values`` or its shape does not match ``image_ids``.
        """
        codes = self._codes(torch.as_tensor(image_ids, dtype=torch.long).cpu())
        pixels = data.get("pixel_values")
        expected = (codes.shape[0], 3, self.image_size, self.image_size)
        if pixels is None or tuple(pixels.shape) != expected:
            got = None if pixels is None else tuple(pixels.shape)
            raise BackendError(f"Janus image side data needs pixel_values of shape {expected}, got {got}")
        for row, pv in zip(codes, pixels, strict=True):
            self._remember(row, pv.float().cpu())

    def _codes(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] != self.image_seq_len:
            raise BackendError(
                f"expected image ids of shape [B, {self.image_seq_len}], got {tuple(ids.shape)}"
            )
        codes = ids - self.text_vocab_size
        if ((codes < 0) | (codes >= self.n_codes)).any():
            raise BackendError(
                f"image ids must lie in [{self.text_vocab_size}, {self.vocab_size}) (Janus VQ codes)"
            )
        return codes

    def _remember(self, codes: torch.Tensor, pixels: torch.Tensor) -> None:
        key = codes.numpy().tobytes()
        old = self._pixels.get(key)
        if old is not None and not torch.equal(old, pixels):
            logger.warning(
                "two different images share all %d VQ codes; the later one is shown for both",
                self.image_seq_len,
            )
        self._pixels[key] = pixels

    def _lookup(self, codes: torch.Tensor) -> torch.Tensor:
        pixels = self._pixels.get(codes.numpy().tobytes())
        if pixels is None:
            raise BackendError(
                "this image's pixels are unknown to the Janus backend: images shown to Janus must come from "
                "backend.encode_images in this process or be restored with backend.restore_image_side_data"
            )
        return pixels

    # ----- the transformer ----------------------------------------------------------------------
    def _shown_image_spans(self, ids: torch.Tensor) -> list[tuple[int, int]]:
        """``(row, first code position)`` of every complete image span in a user turn of ``ids``."""
        sp = self.special
        cpu = ids.cpu()
        turn = (cpu == sp.eot).cumsum(dim=1)
        n = self.image_seq_len
        spans = []
        for r, c in (cpu == sp.boi).nonzero().tolist():
            end = c + 1 + n
            if turn[r, c] % 2 or end >= cpu.shape[1] or cpu[r, end] != sp.eoi:
                continue
            inner = cpu[r, c + 1 : end]
            if bool(((inner >= self.text_vocab_size) & (inner < self.vocab_size)).all()):
                spans.append((r, c + 1))
        return spans

    def input_embeds(self, input_ids: torch.Tensor, continuing: bool = False) -> torch.Tensor:
        """Input embeddings of combined ids: text rows (concept-aware), vision features for images
        shown in user turns, generation embeddings for every other code id."""
        v = self.text_vocab_size
        is_code = input_ids >= v
        embeds = self.input_embeddings()(input_ids.masked_fill(is_code, self.special.pad))
        if not bool(is_code.any()):
            return embeds
        shown = torch.zeros_like(is_code)
        spans = [] if continuing else self._shown_image_spans(input_ids)
        if spans:
            n = self.image_seq_len
            pixels = torch.stack([self._lookup(input_ids[r, c : c + n].cpu() - v) for r, c in spans])
            vision = self.model.model.vision_model
            features = self.model.model.get_image_features(
                pixels.to(self.device, vision.dtype), return_dict=True
            ).pooler_output
            rows = torch.tensor([r for r, _ in spans for _ in range(n)], device=input_ids.device)
            cols = torch.tensor([c + k for _, c in spans for k in range(n)], device=input_ids.device)
            shown[rows, cols] = True
            embeds = embeds.index_put((rows, cols), features.reshape(-1, features.shape[-1]).to(embeds.dtype))
        drawn = is_code & ~shown
        if bool(drawn.any()):
            where = drawn.nonzero(as_tuple=True)
            gen = self.model.prepare_embeddings_for_image_generation(input_ids[where] - v)
            embeds = embeds.index_put(where, gen.to(embeds.dtype))
        return embeds

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        continuing = past_key_values is not None and past_key_values.get_seq_length() > 0
        embeds = self.input_embeds(input_ids, continuing)
        out = self.model.model.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[..., V + K]`` of an equal text-head / generation-head mixture (float32)."""
        text = self.output_head()(hidden).float().log_softmax(dim=-1)
        image = self.generation_head()(hidden).float().log_softmax(dim=-1)
        return torch.cat([text, image], dim=-1) - _LOG2

    def generation_head(self) -> nn.Module:
        """Upstream's generation head (hidden -> VQ-code logits)."""
        return self.model.model.generation_head


def _name_unused_rows(tok, text_rows: int, name_or_path: str) -> None:
    """Give the embedding rows past the tokenizer's last entry names, so concept tokens can use them."""
    from tokenizers import AddedToken

    n = len(tok)
    if n > text_rows:
        raise BackendError(
            f"{name_or_path}: the tokenizer has {n} entries but the model only {text_rows} rows"
        )
    if n == text_rows or FREE_ROW_TOKEN.format(n) in tok.get_vocab():
        return
    names = [FREE_ROW_TOKEN.format(i) for i in range(n, text_rows)]
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in names], special_tokens=True)
    got = tok.convert_tokens_to_ids(names)
    if got != list(range(n, text_rows)):
        raise BackendError(f"{name_or_path}: could not name the unused embedding rows {n}..{text_rows - 1}")


def _required_id(tok, token: str | None, name_or_path: str) -> int:
    tid = tok.convert_tokens_to_ids(token) if token else None
    if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id):
        raise BackendError(f"{name_or_path}: the Janus tokenizer lacks the special token {token!r}")
    return int(tid)
