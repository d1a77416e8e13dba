"""The backend protocol: one small surface that hides a model family from the rest of yochameleon.

The trainer, the concept-token machinery and inference only ever talk to a :class:`Backend`. A
backend owns a frozen Hugging Face model and knows how its family tokenizes images, which ids are
special, which vocabulary entries are free for concept tokens, and how to turn final hidden states
into logits. Nothing outside ``yochameleon/backends`` branches on the model family.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from yochameleon.errors import BackendError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class LoadOptions:
    """How to load a base model.

    Args:
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the frozen weights.
        quantization: ``None``, ``"4bit"`` or ``"8bit"`` (bitsandbytes).
        device_map: passed to ``from_pretrained`` (accelerate), e.g. ``"auto"`` or ``{"": 0}``;
            ``None`` keeps everything on ``device``.
        device: the device when ``device_map`` is ``None``.
    """

    dtype: str = "float32"
    quantization: str | None = None
    device_map: Any = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise BackendError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in (None, "4bit", "8bit"):
            raise BackendError(f"quantization must be None, '4bit' or '8bit', got {self.quantization!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf(
    model_cls,
    processor_cls,
    name_or_path: str,
    options: LoadOptions | None,
    what: str,
    keep_full_precision: list[str],
):
    """Load a frozen Hugging Face model and its processor the way every backend needs it.

    Args:
        model_cls: e.g. ``ChameleonForConditionalGeneration``.
        processor_cls: e.g. ``ChameleonProcessor``.
        name_or_path: Hugging Face id or local directory.
        options: dtype, bitsandbytes quantization and accelerate device map.
        what: the family's name for error messages.
        keep_full_precision: module-name fragments bitsandbytes must not quantize (the embedding and
            head hold concept rows; VQ and vision towers must tokenize exactly).

    Returns:
        ``(model, processor)``; the model is in eval mode with ``requires_grad=False``.

    Raises:
        BackendError: the checkpoint cannot be loaded as ``what``.
    """
    options = options or LoadOptions()
    kwargs: dict[str, Any] = {"dtype": options.torch_dtype}
    if options.quantization is not None:
        from transformers import BitsAndBytesConfig

        if options.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_compute_dtype=options.torch_dtype,
                bnb_4bit_quant_type="nf4",
                llm_int8_skip_modules=keep_full_precision,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_skip_modules=keep_full_precision
            )
    if options.device_map is not None:
        kwargs["device_map"] = options.device_map
    try:
        # transformers prints a table for any key it did not expect; checkpoints that carry the VQ
        # decoder (ours, and Anole's) would print one on every load, so we report what matters ourselves.
        # (A filter, not a raised level: transformers changes what it checks with the logger's level.)
        modeling_logger = logging.getLogger("transformers.modeling_utils")
        modeling_logger.addFilter(_drop_load_report)
        try:
            model, info = model_cls.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
        finally:
            modeling_logger.removeFilter(_drop_load_report)
        processor = processor_cls.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot load {what} from {name_or_path!r}: {exc}") from exc
    _report_loading(name_or_path, info)
    if options.device_map is None and options.quantization is None:
        model.to(options.device)
    model.eval().requires_grad_(False)
    return model, processor


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def _report_loading(name_or_path: str, info: dict) -> None:
    """Warn about missing weights and unexpected ones other than the VQ decoder's (read separately)."""
    missing = list(info.get("missing_keys") or [])
    unexpected = [k for k in info.get("unexpected_keys") or [] if ".vqmodel.decoder." not in f".{k}"]
    for kind, keys in (("missing (randomly initialised)", missing), ("unexpected (ignored)", unexpected)):
        if keys:
            shown = ", ".join(sorted(keys)[:5]) + (" ..." if len(keys) > 5 else "")
            log.warning("%s: %d weights %s: %s", name_or_path, len(keys), kind, shown)


@dataclass(frozen=True)
class SpecialIds:
    """Ids every backend exposes.

    Attributes:
        bos: begin of sequence.
        eos: end of sequence.
        pad: padding id (inputs only; never a label).
        eot: end of turn; closes the human turn and the answer.
        boi: begin of image.
        eoi: end of image.
        image_token_ids: the sorted vocabulary ids that stand for VQ codes.
        image_placeholder: the processor's ``<image>`` placeholder id, if any.
        extra_image_ids: layout tokens that may appear inside an image span (e.g. Emu3's
            end-of-line), empty for Chameleon.
    """

    bos: int
    eos: int
    pad: int
    eot: int
    boi: int
    eoi: int
    image_token_ids: tuple[int, ...]
    image_placeholder: int | None = None
    extra_image_ids: tuple[int, ...] = field(default_factory=tuple)


class Backend:
    """Base class for a model family. Subclasses fill in the family-specific parts.

    Attributes:
        family: short family name (``"chameleon"``, ``"emu3"``, ``"janus"``).
        name_or_path: the id or directory it was loaded from.
        model: the frozen Hugging Face model.
        tokenizer: its tokenizer.
        special: the :class:`SpecialIds`.
        image_seq_len: number of VQ tokens in one image span (without boi/eoi and layout tokens).
        image_size: side length in pixels of a decoded image.
    """

    family: str = "base"

    def __init__(
        self,
        name_or_path: str,
        model: nn.Module,
        tokenizer: Any,
        special: SpecialIds,
        image_seq_len: int,
        image_size: int,
    ) -> None:
        self.name_or_path = name_or_path
        self.model = model
        self.tokenizer = tokenizer
        self.special = special
        self.image_seq_len = image_seq_len
        self.image_size = image_size
        self._fingerprint: str | None = None

    # ----- text -------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS (special tokens in the text are recognised)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode_text(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of ``ids``; image spans and special ids are dropped when ``skip_special``."""
        if skip_special:
            drop = set(self.special.image_token_ids) | {
                self.special.boi,
                self.special.eoi,
                self.special.pad,
                self.special.bos,
                self.special.eos,
                self.special.eot,
            }
            ids = [i for i in ids if i not in drop]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise BackendError(f"token {token!r} is not in the vocabulary of {self.name_or_path}")
        return int(tid)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token_id))

    # ----- concept tokens ---------------------------------------------------------------------
    def free_token_ids(self) -> list[int]:
        """Vocabulary ids that no text or image uses, in allocation order. Never resizes."""
        raise NotImplementedError

    # ----- images -----------------------------------------------------------------------------
    @property
    def preprocess_id(self) -> str:
        """A string identifying image preprocessing, part of the token-cache key."""
        raise NotImplementedError

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """VQ-encode RGB images to vocabulary ids, shape ``[B, image_seq_len]``."""
        raise NotImplementedError

    def decode_images(self, ids: torch.Tensor) -> list[Image.Image]:
        """Decode vocabulary ids ``[B, image_seq_len]`` back to RGB images."""
        raise NotImplementedError

    def image_span(self, image_ids: list[int]) -> list[int]:
        """The full in-sequence span for one image's ids: boi, the ids (plus layout tokens), eoi."""
        return [self.special.boi, *image_ids, self.special.eoi]

    def span_to_image_ids(self, span: list[int]) -> list[int]:
        """Inverse of :meth:`image_span`: the VQ ids inside a generated span."""
        inner = span[1:-1] if span and span[0] == self.special.boi else span
        return [i for i in inner if i not in self.special.extra_image_ids][: self.image_seq_len]

    def image_span_constraint(self):
        """A :class:`~yochameleon.backends.constraints.SpanConstraint` for this family's image layout."""
        from yochameleon.backends.constraints import ImageSpanConstraint

        return ImageSpanConstraint(self.special, self.image_seq_len)

    def image_side_data(self, image_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors besides the ids that this family needs to read these images again later.

        Families that read images as VQ ids need nothing (the default, ``{}``). Janus reads images
        it is shown through a vision encoder, so it returns the preprocessed pixels of images that
        :meth:`encode_images` produced ``image_ids`` ``[B, image_seq_len]`` for. A token cache stores
        these tensors next to the ids and hands them back through :meth:`restore_image_side_data`.
        """
        return {}

    def restore_image_side_data(self, image_ids: torch.Tensor, data: dict[str, torch.Tensor]) -> None:
        """Give back cached :meth:`image_side_data` for ``image_ids`` (e.g. after reading a token cache).

        Raises:
            BackendError: ``data`` is not empty but this family keeps no side data.
        """
        if data:
            raise BackendError(f"the {self.family} backend keeps no image side data, got {sorted(data)}")

    # ----- the transformer --------------------------------------------------------------------
    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.model.set_input_embeddings(module)

    def output_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def set_output_head(self, module: nn.Module) -> None:
        self.model.set_output_embeddings(module)

    def base_weight(self, part: Literal["embed", "head"]) -> torch.Tensor:
        """The base model's own input-embedding or output-head matrix, under any concept wrapper.

        Attached concepts wrap both modules (the wrapper keeps the original as ``base``); this is the
        untouched ``[vocab, hidden]`` weight underneath, in the model's dtype and on its device.

        Args:
            part: ``"embed"`` for the input embedding, ``"head"`` for the output head.
        """
        if part not in ("embed", "head"):
            raise ValueError(f"part must be 'embed' or 'head', got {part!r}")
        module = self.input_embeddings() if part == "embed" else self.output_head()
        while hasattr(module, "base"):
            module = module.base
        return module.weight

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.input_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        return self.input_embeddings().weight.device

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Final (normed) hidden states ``[B, T, H]`` and the KV cache.

        Logits are deliberately not computed here: callers apply :meth:`logits` only where they need
        them (labelled positions in training, the last position in generation).
        """
        out = self.model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Unmasked logits over the whole vocabulary for ``hidden`` ``[..., H]`` (float32)."""
        return self.output_head()(hidden).float()

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` in the head's own dtype: no float32 copy of a bf16/fp16 model's logits.

        The training loss reads these and upcasts a few rows at a time, so a bf16 model never holds a
        float32 ``rows × vocabulary`` copy. A family whose :meth:`logits` is more than the output
        head (Janus mixes two heads' log-probabilities) gets its :meth:`logits` here unchanged.
        """
        if type(self).logits is not Backend.logits:
            return self.logits(hidden)
        return self.output_head()(hidden)

    # ----- identity ---------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short hash of the base embedding and head matrices; concept files record it.

        Hashing a fixed strided subset of rows keeps it fast on 7B models while still telling
        different checkpoints apart.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            for weight in (self.base_weight("embed"), self.base_weight("head")):
                rows = torch.linspace(0, weight.shape[0] - 1, steps=min(257, weight.shape[0])).long()
                sample = weight.detach()[rows.to(weight.device)].float().cpu().contiguous()
                h.update(str(tuple(weight.shape)).encode())
                h.update(sample.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint
