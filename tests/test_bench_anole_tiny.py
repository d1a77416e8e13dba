"""The ``anole-tiny`` preset: the issue-27 layout, buildable by ``make-tiny`` and known to the estimator."""

from __future__ import annotations

import torch

from yochameleon.backends.tiny import SIZES, minimum_vocab_size


def test_anole_tiny_preset_has_the_issue_layout():
    s = SIZES["anole-tiny"]
    assert (s.hidden_size, s.num_hidden_layers, s.num_attention_heads, s.intermediate_size) == (
        256,
        4,
        4,
        704,
    )
    assert s.vocab_size == 18432 and s.vq["num_embeddings"] == 8192
    assert (s.image_size, s.image_seq_len) == (128, 256)
    assert minimum_vocab_size(s.vq["num_embeddings"], s.n_reserved) <= s.vocab_size
    # A multiple of 64: bitsandbytes CPU kernels need it.
    assert s.intermediate_size % 64 == 0


def test_anole_tiny_preset_has_14_4m_parameters():
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    s = SIZES["anole-tiny"]
    config = ChameleonConfig(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        max_position_embeddings=s.max_position_embeddings,
        vocabulary_map={"<image>": 8197},
        vq_config=dict(s.vq),
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = ChameleonForConditionalGeneration(config)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 1) == 14.4, n
