"""The Chameleon backend on the tiny model: images, constrained generation, loading errors."""

from __future__ import annotations

import json

import pytest
import torch

from yochameleon.backends import LoadOptions, load_backend
from yochameleon.backends.tiny import SIZES
from yochameleon.errors import BackendError
from yochameleon.generation import Sampling, generate, teacher_forced_argmax


def test_tiny_layout_matches_the_issue(backend):
    spec = SIZES["tiny"]
    assert backend.hidden_size == 256 and backend.model.config.num_hidden_layers == 4
    assert backend.image_seq_len == 64 and backend.vocab_size == spec.vocab_size
    assert len(backend.special.image_token_ids) == spec.vq["num_embeddings"]
    assert backend.id_to_token(backend.special.boi) == "<racm3:break>"
    assert backend.id_to_token(backend.special.eoi) == "<eoss>"


def test_image_round_trip_has_configured_size(backend, photos):
    ids = backend.encode_images(photos[:2])
    assert ids.shape == (2, backend.image_seq_len)
    assert set(ids.flatten().tolist()) <= set(backend.special.image_token_ids)
    images = backend.decode_images(ids)
    assert [im.size for im in images] == [(backend.image_size, backend.image_size)] * 2
    # Encoding is deterministic: the cache relies on it.
    assert torch.equal(ids, backend.encode_images(photos[:2]))


def test_upstream_masks_image_logits_but_ours_does_not(backend):
    ids = torch.tensor([[backend.special.bos, 300, 301, backend.special.boi]])
    upstream = backend.model(input_ids=ids).logits[0, -1]
    image = list(backend.special.image_token_ids)
    assert (upstream[image] == torch.finfo(upstream.dtype).min).all()
    hidden, _ = backend.hidden_states(ids)
    ours = backend.logits(hidden[0, -1])
    assert torch.isfinite(ours[image]).all()
    assert ours[image].std() > 0


def test_greedy_constrained_generation_is_the_teacher_forced_argmax_chain(backend):
    prompt = torch.tensor([[backend.special.bos, 300, 301, 302, backend.special.eot]])
    out = generate(backend, prompt, backend.image_span_constraint(), backend.image_seq_len + 2)
    row = out[0].tolist()
    assert row[0] == backend.special.boi and row[-1] == backend.special.eoi
    assert len(row) == backend.image_seq_len + 2
    image = torch.tensor(backend.special.image_token_ids)
    chain = teacher_forced_argmax(backend, prompt, out[:, :-1], allowed=image)
    assert torch.equal(chain[0, 1:], out[0, 1:-1])
    img = backend.decode_images(out[:, 1:-1])[0]
    assert img.size == (backend.image_size, backend.image_size)


def test_seeded_sampling_is_deterministic(backend):
    prompt = torch.tensor([[backend.special.bos, 300, 301]] * 2)
    c = backend.image_span_constraint()
    a = generate(backend, prompt, c, backend.image_seq_len + 2, Sampling(temperature=1.0, seed=3))
    b = generate(backend, prompt, c, backend.image_seq_len + 2, Sampling(temperature=1.0, seed=3))
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # two samples of one batch differ


def test_text_generation_never_emits_image_tokens(backend):
    from yochameleon.generation import TextConstraint

    prompt = torch.tensor([[backend.special.bos, 300, 301]])
    out = generate(backend, prompt, TextConstraint(backend.special, backend.vocab_size), 20)
    assert not set(out[0].tolist()) & (set(backend.special.image_token_ids) | {backend.special.boi})


def test_missing_path_and_unknown_model_type(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        load_backend(tmp_path / "missing-model")
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(BackendError, match="unknown model type 'gpt2'"):
        load_backend(bogus)


def test_load_options_validate():
    with pytest.raises(BackendError):
        LoadOptions(dtype="float8")
    with pytest.raises(BackendError):
        LoadOptions(quantization="3bit")


def test_checkpoint_without_decoder_still_understands(tiny_dir, tmp_path):
    import shutil

    copy = tmp_path / "nodecoder"
    shutil.copytree(tiny_dir, copy)
    (copy / "vq_decoder.safetensors").unlink()
    b = load_backend(copy)
    assert b.vq_decoder is None
    ids = b.encode_images([__import__("PIL.Image", fromlist=["Image"]).new("RGB", (80, 80), "red")])
    with pytest.raises(BackendError, match="no VQ decoder"):
        b.decode_images(ids)


def test_loading_reports_stray_weights_but_not_the_vq_decoder(tiny_dir, tmp_path, caplog):
    """Decoder weights in the shards are expected (read separately); other stray or missing keys warn."""
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    from yochameleon.backends import load_backend

    copy = tmp_path / "model"
    shutil.copytree(tiny_dir, copy)
    shard = next(copy.glob("*.safetensors"))
    state = load_file(str(shard))
    state["model.vqmodel.decoder.conv_in.weight"] = torch.zeros(2, 2)
    save_file(state, str(shard), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        load_backend(copy)
    ours = [r.getMessage() for r in caplog.records if r.name == "yochameleon.backends.base"]
    assert ours == [] and "LOAD REPORT" not in caplog.text and "not sharded" not in caplog.text

    state["model.stray.weight"] = torch.zeros(2)
    del state["model.norm.weight"]
    save_file(state, str(shard), metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_backend(copy)
    messages = " ".join(r.getMessage() for r in caplog.records if r.name == "yochameleon.backends.base")
    assert "1 weights missing" in messages and "model.norm.weight" in messages
    assert "1 weights unexpected" in messages and "model.stray.weight" in messages
    assert "LOAD REPORT" not in caplog.text
