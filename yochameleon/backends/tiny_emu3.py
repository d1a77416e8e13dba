"""A tiny random-init Emu3 (``Emu3ForConditionalGeneration``) with an offline tokenizer and processor.

``make_tiny_emu3(out_dir)`` writes a directory that loads through ``load_backend(out_dir)`` exactly
like a real Emu3 checkpoint. The vocabulary follows Emu3's layout, scaled down: ``<|endoftext|>``
(padding), a block of ``<|extra_N|>`` entries (``extra_200`` end-of-line, ``extra_201``
end-of-frame, ``extra_203`` BOS, ``extra_204`` EOS; the rest are free for concept tokens), the
image delimiters, one ``<|visual token NNNNNN|>`` per VQ code, then byte-level BPE text merges.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from yochameleon.backends.tiny import _CORPUS

N_EXTRA = 205  # <|extra_0|> … <|extra_204|>, as in Emu3's tokenizer


@dataclass(frozen=True)
class TinyEmu3Size:
    """Architecture of the tiny Emu3: 2 layers, hidden 128, 32 px images of 4 × 4 VQ tokens."""

    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    vocab_size: int = 1024
    image_size: int = 32
    vq: dict = field(
        default_factory=lambda: {
            "codebook_size": 256,
            "embed_dim": 4,
            "latent_channels": 4,
            "base_channels": 32,
            "channel_multiplier": [1, 1, 2, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [3],
            "temporal_downsample_factor": 4,
            "hidden_size": 64,
            "num_attention_heads": 1,
        }
    )

    @property
    def grid(self) -> int:
        """VQ tokens per image side (Emu3's spatial factor is 8 with four channel multipliers)."""
        return self.image_size // 2 ** (len(self.vq["channel_multiplier"]) - 1)


def visual_token_name(code: int) -> str:
    """Emu3's vocabulary name for VQ code ``code``."""
    return f"<|visual token {code:06d}|>"


def _ordered_specials(size: TinyEmu3Size) -> list[str]:
    extras = [f"<|extra_{i}|>" for i in range(N_EXTRA)]
    visual = [visual_token_name(c) for c in range(size.vq["codebook_size"])]
    return [
        "<|endoftext|>",
        *extras,
        "<|image start|>",
        "<|image end|>",
        "<|image token|>",
        "<image>",
        *visual,
    ]


def build_emu3_tokenizer(size: TinyEmu3Size):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with Emu3's special layout at fixed low ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    ordered = _ordered_specials(size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size.vocab_size,
        special_tokens=ordered,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [line for line in _CORPUS.splitlines() if line.strip()] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    vocab = tok.get_vocab()
    for i, name in enumerate(ordered):
        assert vocab[name] == i, f"special token {name} landed at {vocab[name]}, expected {i}"
    missing = size.vocab_size - tok.get_vocab_size()
    if missing > 0:
        # Pad to the configured size with entries no text produces, as real checkpoints have.
        tok.add_special_tokens([f"<|unused_{i}|>" for i in range(missing)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|extra_203|>",
        eos_token="<|extra_204|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<image>",
            "boi_token": "<|image start|>",
            "eoi_token": "<|image end|>",
            "image_wrapper_token": "<|image token|>",
            "eof_token": "<|extra_201|>",
        },
    )
    return fast


def make_tiny_emu3(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random-init Emu3 checkpoint with tokenizer and processor to ``out_dir``.

    Args:
        out_dir: destination directory (created).
        seed: seed of the random initialisation; the same seed writes identical weights.

    Returns:
        The directory, loadable with ``yochameleon.backends.load_backend``.
    """
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor

    spec = TinyEmu3Size()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_emu3_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    text_config = {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "bos_token_id": vocab["<|extra_203|>"],
        "eos_token_id": vocab["<|extra_204|>"],
        "pad_token_id": vocab["<|endoftext|>"],
        "attention_dropout": 0.0,
    }
    config = Emu3Config(
        vq_config=dict(spec.vq), text_config=text_config, vocabulary_map=vocab, tie_word_embeddings=False
    )
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    pixels = spec.image_size * spec.image_size
    image_processor = Emu3ImageProcessor(min_pixels=pixels, max_pixels=pixels, spatial_factor=8)
    Emu3Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    (out / "yochameleon_tiny.json").write_text(
        json.dumps({"family": "emu3", "seed": seed, **asdict(spec)}, indent=2)
    )
    return out
