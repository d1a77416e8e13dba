"""Tiny random-init Chameleon-class models with an offline tokenizer and processor.

``make_tiny(out_dir)`` writes a directory that loads through exactly the same code path as a real
checkpoint (``ChameleonBackend.load(out_dir)``): a ``ChameleonForConditionalGeneration`` with a VQ
encoder, our VQ decoder weights, a byte-level BPE tokenizer and a ``ChameleonProcessor``. The
vocabulary follows Anole's layout, scaled down: specials, then one ``IMGIMG…`` entry per VQ code,
begin/end of image, a block of ``<reservedNNNNN>`` entries (the first is the end-of-turn separator,
the second the ``<image>`` placeholder, the rest are free for concept tokens), then text merges.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from yochameleon.errors import ConfigError

# Words the BPE merges are trained on. Byte-level BPE covers any text; this only makes common
# prompt words short, like a real tokenizer would.
_CORPUS = """
a an the is are was be this that these those it its of in on at to for with from by and or not no yes
photo image picture of above below left right next near behind front top bottom inside outside small
medium large big tiny red green blue yellow orange purple pink brown black white gray grey cyan
circle square triangle diamond cross ring star heart striped dotted solid checker plain pattern
colour color shape size mark marks object objects scene background what which who where how many
does do did can could would should will has have had your my our their his her there here
question answer describe caption generate draw show me same different one two three four five
dog cat mug cup toy person man woman child bird car house tree flower table chair book bag magenta
checkered it has a mark and a cyan mark. It is a circle. Is a small red plain square in this photo?
Yes, No, I see. It is. This is not. Is there? Can you see? A photo of. Answer with yes or no.
"""


@dataclass(frozen=True)
class TinySize:
    """Architecture of a tiny model. ``tiny`` builds in seconds; ``small`` is the benchmark size."""

    hidden_size: int = 256
    intermediate_size: int = 768  # a multiple of 64: bitsandbytes CPU kernels need it
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024
    vocab_size: int = 1536
    n_reserved: int = 256
    image_size: int = 64
    vq: dict = field(
        default_factory=lambda: {
            "embed_dim": 16,
            "num_embeddings": 256,
            "latent_channels": 16,
            "base_channels": 32,
            "channel_multiplier": [1, 1, 2, 4],
            "num_res_blocks": 1,
            "resolution": 64,
        }
    )

    @property
    def image_seq_len(self) -> int:
        down = 2 ** (len(self.vq["channel_multiplier"]) - 1)
        return (self.image_size // down) ** 2


SIZES = {
    "tiny": TinySize(),
    # About 100M parameters: Anole's 65,536-entry vocabulary and 1,024 image tokens per image.
    "small": TinySize(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        vocab_size=65536,
        n_reserved=7673,
        image_size=256,
        vq={
            "embed_dim": 32,
            "num_embeddings": 8192,
            "latent_channels": 32,
            "base_channels": 32,
            "channel_multiplier": [1, 1, 2, 4],
            "num_res_blocks": 1,
            "resolution": 256,
        },
    ),
    # 14.4M parameters: the tiny Anole the training-memory targets are set on (issue 27). A quarter
    # of Anole's vocabulary around its full 8,192-code codebook; 128 px images, 256 tokens each.
    "anole-tiny": TinySize(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        vocab_size=18432,
        n_reserved=2048,
        image_size=128,
        vq={
            "embed_dim": 64,
            "num_embeddings": 8192,
            "latent_channels": 64,
            "base_channels": 32,
            "channel_multiplier": [1, 2, 2, 4],
            "num_res_blocks": 1,
            "resolution": 128,
        },
    ),
}


def image_token_name(code: int) -> str:
    """Chameleon's vocabulary name for VQ code ``code``: digits spelled A–J, closed by ``Z``."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


_TEXT_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
_IMAGE_SPECIALS = ("<eoss>", "<racm3:break>")  # end and start of an image span, after the codes
_N_BYTES = 256  # byte-level BPE's base alphabet


def minimum_vocab_size(n_codes: int, n_reserved: int) -> int:
    """The smallest ``vocab_size`` that holds the specials, ``n_codes`` image tokens, ``n_reserved``
    reserved rows and the byte-level text alphabet."""
    return len(_TEXT_SPECIALS) + n_codes + len(_IMAGE_SPECIALS) + n_reserved + _N_BYTES


def _vocabulary(size: TinySize) -> tuple[list[str], dict[str, str]]:
    n_codes = size.vq["num_embeddings"]
    image_tokens = [image_token_name(c) for c in range(n_codes)]
    # The reserved block mimics Anole: the first entry is the end-of-turn separator, the second is
    # the processor's <image> placeholder, everything after is free for concept tokens.
    reserved = ["<reserved08706>", "<image>"] + [
        f"<reserved{8708 + i:05d}>" for i in range(size.n_reserved - 2)
    ]
    roles = {
        "pad": "<pad>",
        "bos": "<s>",
        "eos": "</s>",
        "unk": "<unk>",
        "sep": "<reserved08706>",
        "image": "<image>",
        "boi": "<racm3:break>",
        "eoi": "<eoss>",
    }
    ordered = [*_TEXT_SPECIALS, *image_tokens, *_IMAGE_SPECIALS, *reserved]
    if minimum_vocab_size(n_codes, size.n_reserved) > size.vocab_size:
        raise ConfigError(f"vocab_size {size.vocab_size} is too small for {len(ordered)} special entries")
    return ordered, roles


def build_tokenizer(size: TinySize):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the special layout at fixed low ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    ordered, roles = _vocabulary(size)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size.vocab_size,
        special_tokens=ordered,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Every line starts with a space so that its first word is learned in its mid-sentence form too:
    # otherwise " a" stays two tokens (a space, then "a") and a space then predicts whatever most often
    # follows one in training data, e.g. a concept token.
    corpus = [" " + line for line in _CORPUS.splitlines() if line.strip()] * 50
    if size.vocab_size > 4096:
        # A large vocabulary needs more distinct text to fill its merges.
        corpus += [" ".join(f"w{i}x{j}" for j in range(64)) for i in range(2000)]
    tok.train_from_iterator(corpus, trainer=trainer)
    vocab = tok.get_vocab()
    for i, name in enumerate(ordered):
        assert vocab[name] == i, f"special token {name} landed at {vocab[name]}, expected {i}"
    # Pad the vocabulary to exactly vocab_size with extra reserved entries, as real checkpoints have.
    missing = size.vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<extra{i:05d}>" for i in range(missing)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=roles["bos"],
        eos_token=roles["eos"],
        pad_token=roles["pad"],
        unk_token=roles["unk"],
        sep_token=roles["sep"],
        extra_special_tokens={
            "image_token": roles["image"],
            "boi_token": roles["boi"],
            "eoi_token": roles["eoi"],
        },
    )
    fast.add_bos_token = True
    return fast, ordered


def make_tiny(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-init Chameleon-class checkpoint with tokenizer and processor to ``out_dir``.

    Args:
        out_dir: destination directory (created).
        size: ``"tiny"`` (hidden 256, 4 layers, 64 image tokens), ``"small"`` (about 100M
            parameters, 65,536-entry vocabulary, 1,024 image tokens) or ``"anole-tiny"`` (14.4M
            parameters, 18,432-entry vocabulary, 8,192 codes, 256 image tokens).
        seed: seed of the random initialisation; the same seed writes identical weights.

    Returns:
        The directory, loadable with ``ChameleonBackend.load``.
    """
    from transformers import (
        ChameleonConfig,
        ChameleonForConditionalGeneration,
        ChameleonImageProcessor,
        ChameleonProcessor,
    )

    from yochameleon.backends.chameleon_vq import ChameleonVQDecoder, save_vq_decoder_state

    if size not in SIZES:
        raise ConfigError(f"unknown tiny size {size!r}; choose one of {sorted(SIZES)}")
    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, ordered = build_tokenizer(spec)
    vocab_map = {name: i for i, name in enumerate(ordered)}
    vocab_map.update(tokenizer.get_vocab())
    config = ChameleonConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        vocabulary_map=vocab_map,
        vq_config=dict(spec.vq),
        tie_word_embeddings=False,
        bos_token_id=vocab_map["<s>"],
        eos_token_id=vocab_map["</s>"],
        pad_token_id=vocab_map["<pad>"],
    )
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    decoder = ChameleonVQDecoder(model.config.vq_config)
    save_vq_decoder_state(decoder, out / "vq_decoder.safetensors")
    image_processor = ChameleonImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = ChameleonProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=spec.image_seq_len
    )
    processor.save_pretrained(out)
    (out / "yochameleon_tiny.json").write_text(
        json.dumps({"size": size, "seed": seed, **asdict(spec)}, indent=2)
    )
    return out
