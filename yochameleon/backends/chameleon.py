"""Chameleon / Anole backend (``ChameleonForConditionalGeneration``).

Upstream transformers encodes images (VQ codes mapped to BPE ids) but has no VQ decoder, and its
``forward`` overwrites image-token logits with the dtype minimum. We therefore never use its
logits: :meth:`Backend.logits` applies the output head to the final hidden states ourselves, and the
decoder (``chameleon_vq.py``) loads the decoder weights that upstream drops, straight from the
checkpoint's safetensors shards.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from yochameleon.backends.base import Backend, LoadOptions, SpecialIds, load_hf
from yochameleon.errors import BackendError

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

_RESERVED = re.compile(r"^<reserved\d{5}>$")


class ChameleonBackend(Backend):
    """Chameleon-class models: Chameleon, Anole and our tiny models."""

    family = "chameleon"

    def __init__(self, name_or_path: str, model, processor, vq_decoder=None) -> None:
        tok = processor.tokenizer
        vmap = model.model.vocabulary_mapping
        image_ids = tuple(int(i) for i in vmap.image_tokens)
        special = SpecialIds(
            bos=int(tok.bos_token_id),
            eos=int(tok.eos_token_id),
            pad=int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id),
            eot=int(tok.convert_tokens_to_ids(tok.sep_token)),
            boi=int(processor.image_start_token_id),
            eoi=int(processor.image_end_token_id),
            image_token_ids=image_ids,
            image_placeholder=int(processor.image_token_id),
        )
        image_size = int(processor.image_processor.crop_size["height"])
        super().__init__(name_or_path, model, tok, special, int(processor.image_seq_length), image_size)
        self.processor = processor
        self.vq_decoder = vq_decoder
        # bpe id -> VQ code, as a dense lookup table (-1 where the id is not an image token).
        bpe2img = vmap.bpe2img
        self._bpe2code = torch.full((self.vocab_size,), -1, dtype=torch.long)
        for bpe, code in bpe2img.items():
            self._bpe2code[bpe] = code

    @classmethod
    def load(cls, name_or_path: str, options: LoadOptions | None = None) -> ChameleonBackend:
        """Load a Chameleon-class checkpoint from a Hugging Face id or a local directory.

        Args:
            name_or_path: e.g. ``"leloy/Anole-7b-v0.1-hf"`` or a ``make-tiny`` directory.
            options: dtype, bitsandbytes quantization and accelerate device map.

        Raises:
            BackendError: the path does not exist, or the checkpoint is not Chameleon-class.
        """
        from transformers import ChameleonForConditionalGeneration, ChameleonProcessor

        model, processor = load_hf(
            ChameleonForConditionalGeneration,
            ChameleonProcessor,
            name_or_path,
            options,
            "a Chameleon-class model",
            ["lm_head", "vqmodel", "embed_tokens"],
        )
        decoder = _load_decoder(name_or_path, model)
        return cls(name_or_path, model, processor, decoder)

    # ----- concept tokens ---------------------------------------------------------------------
    def free_token_ids(self) -> list[int]:
        protected = {self.special.eot, self.special.boi, self.special.eoi, self.special.pad}
        if self.special.image_placeholder is not None:
            protected.add(self.special.image_placeholder)
        protected.update(self.tokenizer.all_special_ids)
        vocab = self.tokenizer.get_vocab()
        ids = sorted(
            i
            for name, i in vocab.items()
            if _RESERVED.match(name) and i not in protected and i < self.vocab_size
        )
        return ids

    # ----- images -----------------------------------------------------------------------------
    @property
    def preprocess_id(self) -> str:
        ip = self.processor.image_processor
        return f"chameleon-{ip.size}-{ip.crop_size}-{ip.rescale_factor}-{ip.image_mean}-{ip.image_std}"

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """Processor pixels in [-1, 1], ``[B, 3, S, S]``."""
        rgb = [im.convert("RGB") for im in images]
        pv = self.processor.image_processor(rgb, return_tensors="pt")["pixel_values"]
        return pv.to(self.device, self.model.model.vqmodel.encoder.conv_in.weight.dtype)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        if not images:
            return torch.empty(0, self.image_seq_len, dtype=torch.long)
        ids = self.model.model.get_image_tokens(self.pixel_values(images))
        return ids.long().cpu()

    @torch.no_grad()
    def decode_images(self, ids: torch.Tensor) -> list[Image.Image]:
        from PIL import Image

        from yochameleon.backends.chameleon_vq import decode_codes

        if self.vq_decoder is None:
            raise BackendError(
                f"{self.name_or_path} has no VQ decoder weights (model.vqmodel.decoder.*), so generated "
                "images cannot be decoded; use an Anole-format checkpoint"
            )
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1, self.image_seq_len)
        codes = self._bpe2code[ids.cpu()]
        if (codes < 0).any():
            raise BackendError("decode_images got ids that are not image tokens")
        vq = self.model.model.vqmodel
        pixels = decode_codes(vq, self.vq_decoder, codes.to(vq.quantize.embedding.weight.device))
        arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]


def _load_decoder(name_or_path: str, model):
    """Our VQ decoder with weights from the checkpoint's shards, or ``None`` when it has none."""
    from yochameleon.backends.chameleon_vq import attach_vq_decoder

    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as exc:  # offline or private: understanding still works without a decoder
            logger.warning("no VQ decoder for %s (%s); image decoding is unavailable", name_or_path, exc)
            return None
    try:
        return attach_vq_decoder(model.model.vqmodel, path)
    except BackendError as exc:
        logger.warning("%s; image decoding is unavailable", exc)
        return None
