"""A tiny random-init Janus (``JanusForConditionalGeneration``) with an offline tokenizer and processor.

``make_tiny_janus(out_dir)`` writes a directory that loads through ``load_backend(out_dir)`` exactly
like a real Janus checkpoint: a Llama language model, a SigLIP-style vision encoder with its aligner
(understanding), a VQ model with generation embeddings, aligner and head (generation), a byte-level
BPE tokenizer with DeepSeek/Janus special names and a ``JanusProcessor``. As in the real checkpoints,
the language model has more embedding rows than the tokenizer has tokens; the backend names those
unused rows and places concept tokens there (the matrix is never resized).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from yochameleon.backends.tiny import _CORPUS

SPECIALS = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜▁pad▁｜>",
    "<image_placeholder>",
    "<begin_of_image>",
    "<end_of_image>",
    "<|User|>",
    "<|Assistant|>",
]


@dataclass(frozen=True)
class TinyJanusSize:
    """Architecture of the tiny Janus: 32 px images read as 4 × 4 SigLIP patches and written as
    4 × 4 VQ codes (the two counts must match, as 576 = 576 in Janus-Pro)."""

    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    n_text_tokens: int = 768
    n_unused_rows: int = 96
    image_size: int = 32
    patch_size: int = 8
    vision: dict = field(
        default_factory=lambda: {
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "mlp_ratio": 2.0,
        }
    )
    vq: dict = field(
        default_factory=lambda: {
            "embed_dim": 8,
            "num_embeddings": 256,
            "latent_channels": 32,
            "base_channels": 32,
            "channel_multiplier": [1, 1, 2, 2],
            "num_res_blocks": 1,
            "num_hidden_layers": 2,
        }
    )

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_janus_tokenizer(size: TinyJanusSize):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with Janus's special names at fixed low ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size.n_text_tokens,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 50, trainer=trainer)
    vocab = tok.get_vocab()
    for i, name in enumerate(SPECIALS):
        assert vocab[name] == i, f"special token {name} landed at {vocab[name]}, expected {i}"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[1],
        pad_token=SPECIALS[2],
        extra_special_tokens={
            "image_token": "<image_placeholder>",
            "boi_token": "<begin_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )


def make_tiny_janus(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random-init Janus checkpoint with tokenizer and processor to ``out_dir``.

    Args:
        out_dir: destination directory (created).
        seed: seed of the random initialisation; the same seed writes identical weights.

    Returns:
        The directory, loadable with ``yochameleon.backends.load_backend``.
    """
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor

    spec = TinyJanusSize()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_janus_tokenizer(spec)
    n_tok = len(tokenizer)
    h = spec.hidden_size
    text_config = {
        "model_type": "llama",
        "vocab_size": n_tok + spec.n_unused_rows,
        "hidden_size": h,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "tie_word_embeddings": False,
    }
    vision_config = {
        **spec.vision,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "projection_dim": h,
        "num_image_tokens": spec.image_tokens,
    }
    vq_config = {**spec.vq, "projection_dim": h, "image_token_embed_dim": h}
    config = JanusConfig(
        text_config=text_config,
        vision_config=vision_config,
        vq_config=vq_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    image_processor = JanusImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    JanusProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=spec.image_tokens
    ).save_pretrained(out)
    (out / "yochameleon_tiny.json").write_text(
        json.dumps({"family": "janus", "seed": seed, **asdict(spec)}, indent=2)
    )
    return out
