"""The Janus backend on the tiny Janus: one id space over two image paths, generation, concepts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from yochameleon.backends import load_backend
from yochameleon.backends.janus import JanusBackend
from yochameleon.concept import (
    ConceptSpec,
    attach,
    concept_rows,
    detach,
    get_bank,
    load_concept,
    save_concept,
)
from yochameleon.errors import BackendError
from yochameleon.generation import Sampling, TextConstraint, generate, teacher_forced_argmax
from yochameleon.train.loss import full_logits_loss, label_only_loss
from yochameleon.train.sequences import build_sequence, collate


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    from yochameleon.backends.tiny_janus import make_tiny_janus

    return make_tiny_janus(tmp_path_factory.mktemp("janus") / "model", seed=0)


@pytest.fixture
def janus(janus_dir):
    torch.manual_seed(0)
    return load_backend(janus_dir)


def _records() -> list[dict]:
    return [
        {
            "id": "pos",
            "task": "understanding",
            "kind": "recognition",
            "question": "Is <sks> in this photo?<image>",
            "answer": "Yes, it is <sks>.",
            "image": "img0",
        },
        {
            "id": "neg",
            "task": "understanding",
            "kind": "recognition",
            "question": "Is <sks> in this photo?<image>",
            "answer": "No, it is not.",
            "image": "img1",
        },
        {
            "id": "gen",
            "task": "generation",
            "kind": "generation_real",
            "question": "A photo of <sks>.",
            "answer": None,
            "image": "img0",
            "n_g": 4,
        },
    ]


def _shown(janus, image_ids):
    """A user turn showing one image, with a question."""
    sp = janus.special
    return [sp.bos, *janus.image_span(image_ids), *janus.tokenize("Is this a dog?"), sp.eot]


def test_loads_as_janus_with_a_combined_id_space(janus):
    assert isinstance(janus, JanusBackend) and janus.family == "janus"
    text_rows = janus.model.get_input_embeddings().weight.shape[0]
    sp = janus.special
    assert janus.text_vocab_size == text_rows == janus.model.lm_head.weight.shape[0]
    assert sp.image_token_ids == tuple(range(text_rows, text_rows + janus.n_codes))
    assert janus.vocab_size == text_rows + janus.n_codes
    assert janus.id_to_token(sp.boi) == "<begin_of_image>" and janus.id_to_token(sp.eoi) == "<end_of_image>"
    assert janus.image_seq_len == 16 and janus.image_size == 32


def test_free_ids_are_unnamed_embedding_rows_and_nothing_is_resized(janus):
    free = janus.free_token_ids()
    assert free == list(range(janus.text_vocab_size - 96, janus.text_vocab_size))
    assert all(janus.id_to_token(i) == f"<|yoc_row_{i}|>" for i in free)
    tokens = attach(janus, ConceptSpec("dog", n_g=4, n_u=4))
    assert set(tokens.ids) <= set(free)
    assert janus.model.get_input_embeddings().weight.shape[0] == janus.text_vocab_size
    # Ordinary text never produces the row names.
    assert not set(janus.tokenize("a photo of a dog")) & set(free)


def test_image_round_trip(janus, photos):
    ids = janus.encode_images(photos[:2])
    assert ids.shape == (2, janus.image_seq_len)
    assert set(ids.flatten().tolist()) <= set(janus.special.image_token_ids)
    assert torch.equal(ids, janus.encode_images(photos[:2]))
    assert not torch.equal(ids[0], ids[1])
    images = janus.decode_images(ids)
    assert [im.size for im in images] == [(32, 32)] * 2
    assert janus.span_to_image_ids(janus.image_span(ids[0].tolist())) == ids[0].tolist()


def test_shown_images_go_through_the_vision_encoder_exactly_like_upstream(janus, photos):
    ids = janus.encode_images(photos[:1])
    seq = _shown(janus, ids[0].tolist())
    ours, _ = janus.hidden_states(torch.tensor([seq]))
    # Upstream understanding: <image_placeholder> ids plus pixel_values.
    sp = janus.special
    placeholders = [sp.image_placeholder if i in sp.image_token_ids else i for i in seq]
    pixels = janus.image_side_data(ids)["pixel_values"]
    upstream = janus.model.model(
        input_ids=torch.tensor([placeholders]), pixel_values=pixels
    ).last_hidden_state
    assert torch.allclose(ours, upstream, atol=1e-5)
    # Other pixels under the same codes change the answer: the codes are only a key.
    janus.restore_image_side_data(ids, {"pixel_values": torch.zeros_like(pixels)})
    other, _ = janus.hidden_states(torch.tensor([seq]))
    assert not torch.allclose(ours[0, -1], other[0, -1])


def test_drawn_images_use_the_generation_embeddings_and_head(janus, photos):
    ids = janus.encode_images(photos[:1])[0].tolist()
    sp = janus.special
    seq = [sp.bos, *janus.tokenize("a dog"), sp.eot, *janus.image_span(ids)]
    ours, _ = janus.hidden_states(torch.tensor([seq]))
    text = janus.model.get_input_embeddings()(torch.tensor([seq]).clamp(max=janus.text_vocab_size - 1))
    start = seq.index(sp.boi) + 1
    codes = torch.tensor(ids) - janus.text_vocab_size
    text[0, start : start + len(ids)] = janus.model.prepare_embeddings_for_image_generation(codes)
    upstream = janus.model.model.language_model(inputs_embeds=text).last_hidden_state
    assert torch.allclose(ours, upstream, atol=1e-5)
    # Logits: an equal mixture of the two heads, so CE on a code = upstream's generation CE + log 2.
    h = ours[0, start - 1 : start + len(ids) - 1]
    ce = F.cross_entropy(janus.logits(h), torch.tensor(ids))
    gen_ce = F.cross_entropy(janus.model.model.generation_head(h), codes)
    assert abs(float(ce) - float(gen_ce) - math.log(2)) < 1e-5
    mass = janus.logits(h[:1]).exp()
    assert torch.allclose(mass[0, : janus.text_vocab_size].sum(), torch.tensor(0.5))


def test_greedy_constrained_generation_is_the_teacher_forced_argmax_chain(janus):
    sp = janus.special
    prompt = torch.tensor([[sp.bos, *janus.tokenize("a photo of a dog"), sp.eot]])
    out = generate(janus, prompt, janus.image_span_constraint(), janus.image_seq_len + 2)
    row = out[0].tolist()
    assert row[0] == sp.boi and row[-1] == sp.eoi and len(row) == janus.image_seq_len + 2
    chain = teacher_forced_argmax(janus, prompt, out[:, :-1], allowed=torch.tensor(sp.image_token_ids))
    assert torch.equal(chain[0, 1:], out[0, 1:-1])
    image = janus.decode_images(torch.tensor([janus.span_to_image_ids(row)]))[0]
    assert image.size == (janus.image_size, janus.image_size)


def test_sampling_and_text_generation(janus):
    sp = janus.special
    prompt = torch.tensor([[sp.bos, *janus.tokenize("a cat"), sp.eot]] * 2)
    c = janus.image_span_constraint()
    a = generate(janus, prompt, c, janus.image_seq_len + 2, Sampling(temperature=1.0, seed=3))
    b = generate(janus, prompt, c, janus.image_seq_len + 2, Sampling(temperature=1.0, seed=3))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    text = generate(janus, prompt[:1], TextConstraint(sp, janus.vocab_size), 12)[0].tolist()
    assert all(i < janus.text_vocab_size for i in text)
    # Code ids have no text: decoding drops them, and the text ids round-trip.
    assert janus.decode_text(text + [sp.image_token_ids[0]]) == janus.decode_text(text)
    words = janus.tokenize("A photo of a dog.")
    assert janus.decode_text([*words, sp.image_token_ids[0], sp.image_token_ids[-1]]) == "A photo of a dog."


def test_concept_trains_only_its_rows_and_save_load_reproduces_logits(janus_dir, janus, photos, tmp_path):
    before = {k: v.clone() for k, v in janus.model.state_dict().items()}
    tokens = attach(janus, ConceptSpec("rex", n_g=4, n_u=4))
    ids = janus.encode_images(photos[:2])
    lookup = {"img0": ids[0].tolist(), "img1": ids[1].tolist()}
    seqs = [build_sequence(janus, r, tokens, lookup[r["image"]]) for r in _records()]
    batch = collate(seqs, janus.special.pad)
    rows0 = concept_rows(janus, "rex")
    opt = torch.optim.AdamW(get_bank(janus).parameters("rex"), lr=3e-2)
    losses = []
    for _ in range(6):
        loss, _ = label_only_loss(janus, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses
    with torch.no_grad():
        assert abs(float(label_only_loss(janus, batch)[0]) - float(full_logits_loss(janus, batch))) < 1e-4
    rows1 = concept_rows(janus, "rex")
    assert not torch.equal(rows0["embed"], rows1["embed"]) and not torch.equal(rows0["head"], rows1["head"])
    with torch.no_grad():
        hidden, _ = janus.hidden_states(batch.input_ids, batch.attention_mask, batch.position_ids)
        expected = janus.logits(hidden)
    st, _ = save_concept(janus, "rex", tmp_path / "rex")
    side = janus.image_side_data(ids)  # what a token cache stores next to the ids
    detach(janus, "rex")
    after = janus.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fresh = load_backend(janus_dir)
    load_concept(fresh, st)
    with pytest.raises(BackendError, match="pixels are unknown"):
        fresh.hidden_states(batch.input_ids)
    fresh.restore_image_side_data(ids, side)
    with torch.no_grad():
        hidden, _ = fresh.hidden_states(batch.input_ids, batch.attention_mask, batch.position_ids)
        assert torch.equal(fresh.logits(hidden), expected)


def test_bad_image_input_is_refused(janus, photos):
    ids = janus.encode_images(photos[:1])
    with pytest.raises(BackendError, match="codes"):
        janus.image_span(ids[0, :-1].tolist())
    with pytest.raises(BackendError, match="VQ codes"):
        janus.decode_images(torch.zeros(1, janus.image_seq_len, dtype=torch.long))
    with pytest.raises(BackendError, match="shape"):
        janus.image_side_data(ids[:, :-1])
    with pytest.raises(BackendError, match="pixel_values"):
        janus.restore_image_side_data(ids, {"pixel_values": torch.zeros(1, 3, 8, 8)})
    with pytest.raises(BackendError, match="pixel_values"):
        janus.restore_image_side_data(ids, {})


def test_default_backend_keeps_no_side_data(backend, photos):
    ids = backend.encode_images(photos[:1])
    assert backend.image_side_data(ids) == {}
    backend.restore_image_side_data(ids, {})
    with pytest.raises(BackendError, match="keeps no image side data"):
        backend.restore_image_side_data(ids, {"pixel_values": torch.zeros(1)})
