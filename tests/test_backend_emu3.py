"""The Emu3 backend on the tiny Emu3: grid layout, images, constrained generation, concepts."""

from __future__ import annotations

import pytest
import torch

from yochameleon.backends import load_backend
from yochameleon.backends.emu3 import IMAGE_CELL, Emu3Backend
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
from yochameleon.generation import Sampling, generate, teacher_forced_argmax
from yochameleon.train.loss import full_logits_loss, label_only_loss
from yochameleon.train.sequences import build_sequence, collate


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory):
    from yochameleon.backends.tiny_emu3 import make_tiny_emu3

    return make_tiny_emu3(tmp_path_factory.mktemp("emu3") / "model", seed=0)


@pytest.fixture
def emu3(emu3_dir):
    torch.manual_seed(0)
    return load_backend(emu3_dir)


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


def test_loads_as_emu3_with_upstream_layout_tokens(emu3):
    assert isinstance(emu3, Emu3Backend) and emu3.family == "emu3"
    sp = emu3.special
    assert emu3.id_to_token(sp.boi) == "<|image start|>" and emu3.id_to_token(sp.eoi) == "<|image end|>"
    assert [emu3.id_to_token(i) for i in sp.extra_image_ids] == [
        "<|image token|>",
        "<|extra_200|>",
        "<|extra_201|>",
    ]
    assert emu3.image_seq_len == emu3.grid**2 == 16 and emu3.image_size == 32
    assert all(emu3.id_to_token(i).startswith("<|visual token") for i in sp.image_token_ids)


def test_free_ids_are_unused_extras_and_vocab_is_not_resized(emu3):
    rows = emu3.vocab_size
    free = emu3.free_token_ids()
    names = [emu3.id_to_token(i) for i in free]
    assert len(free) == 200 and all(n.startswith("<|extra_") for n in names)
    sp = emu3.special
    assert not set(free) & {sp.bos, sp.eos, sp.pad, sp.eot, *sp.extra_image_ids, *sp.image_token_ids}
    attach(emu3, ConceptSpec("dog", n_g=4, n_u=4))
    assert emu3.vocab_size == rows == emu3.model.lm_head.weight.shape[0]


def test_image_round_trip(emu3, photos):
    ids = emu3.encode_images(photos[:2])
    assert ids.shape == (2, emu3.image_seq_len)
    assert set(ids.flatten().tolist()) <= set(emu3.special.image_token_ids)
    assert torch.equal(ids, emu3.encode_images(photos[:2]))  # the token cache relies on this
    images = emu3.decode_images(ids)
    assert [im.size for im in images] == [(32, 32)] * 2
    span = emu3.image_span(ids[0].tolist())
    assert emu3.span_to_image_ids(span) == ids[0].tolist()
    # Different photos give different codes (the random VQ is not degenerate).
    assert not torch.equal(ids[0], ids[1])


def test_span_follows_the_grid_layout(emu3, photos):
    ids = emu3.encode_images(photos[:1])[0].tolist()
    span = emu3.image_span(ids)
    sp, g = emu3.special, emu3.grid
    header = [sp.boi, *emu3.tokenize(f"{g}*{g}"), emu3.wrapper]
    assert span[: len(header)] == header
    body = span[len(header) : -2]
    assert span[-2:] == [emu3.eof, sp.eoi]
    rows = [body[r * (g + 1) : (r + 1) * (g + 1)] for r in range(g)]
    assert all(row[-1] == emu3.eol and row[:-1] == ids[r * g : (r + 1) * g] for r, row in enumerate(rows))
    assert len(span) == len(header) + g * (g + 1) + 2


def test_greedy_constrained_generation_is_the_teacher_forced_argmax_chain(emu3):
    sp = emu3.special
    prompt = torch.tensor([[sp.bos, *emu3.tokenize("a photo of a dog"), sp.eot]])
    constraint = emu3.image_span_constraint()
    out = generate(emu3, prompt, constraint, 1000)
    row = out[0].tolist()
    template = constraint.template
    assert len(row) == len(template)
    assert all(
        t == IMAGE_CELL and r in sp.image_token_ids or t == r for t, r in zip(template, row, strict=True)
    )
    chain = teacher_forced_argmax(emu3, prompt, out, allowed=torch.tensor(sp.image_token_ids))[0]
    cells = torch.tensor([t == IMAGE_CELL for t in template])
    assert torch.equal(chain[cells], out[0][cells])
    image = emu3.decode_images(torch.tensor([emu3.span_to_image_ids(row)]))[0]
    assert image.size == (emu3.image_size, emu3.image_size)


def test_seeded_sampling_is_deterministic(emu3):
    prompt = torch.tensor([[emu3.special.bos, *emu3.tokenize("a cat"), emu3.special.eot]] * 2)
    c = emu3.image_span_constraint()
    a = generate(emu3, prompt, c, 1000, Sampling(temperature=1.0, seed=3))
    b = generate(emu3, prompt, c, 1000, Sampling(temperature=1.0, seed=3))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_concept_trains_only_its_rows_and_save_load_reproduces_logits(emu3_dir, emu3, photos, tmp_path):
    before = {k: v.clone() for k, v in emu3.model.state_dict().items()}
    tokens = attach(emu3, ConceptSpec("rex", n_g=4, n_u=4))
    ids = emu3.encode_images(photos[:2])
    lookup = {"img0": ids[0].tolist(), "img1": ids[1].tolist()}
    seqs = [build_sequence(emu3, r, tokens, lookup[r["image"]]) for r in _records()]
    batch = collate(seqs, emu3.special.pad)
    rows0 = concept_rows(emu3, "rex")
    opt = torch.optim.AdamW(get_bank(emu3).parameters("rex"), lr=3e-2)
    losses = []
    for _ in range(6):
        loss, _ = label_only_loss(emu3, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses
    with torch.no_grad():
        assert abs(float(label_only_loss(emu3, batch)[0]) - float(full_logits_loss(emu3, batch))) < 1e-4
    rows1 = concept_rows(emu3, "rex")
    assert not torch.equal(rows0["embed"], rows1["embed"]) and not torch.equal(rows0["head"], rows1["head"])
    with torch.no_grad():
        hidden, _ = emu3.hidden_states(batch.input_ids, batch.attention_mask, batch.position_ids)
        expected = emu3.logits(hidden)
    st, _ = save_concept(emu3, "rex", tmp_path / "rex")
    detach(emu3, "rex")
    after = emu3.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fresh = load_backend(emu3_dir)
    load_concept(fresh, st)
    with torch.no_grad():
        hidden, _ = fresh.hidden_states(batch.input_ids, batch.attention_mask, batch.position_ids)
        assert torch.equal(fresh.logits(hidden), expected)


def test_bad_image_input_is_refused(emu3, photos):
    ids = emu3.encode_images(photos[:1])
    with pytest.raises(BackendError, match="visual tokens"):
        emu3.image_span(ids[0, :-1].tolist())
    with pytest.raises(BackendError, match="not Emu3 visual tokens"):
        emu3.decode_images(torch.full((1, emu3.image_seq_len), emu3.special.bos))
    with pytest.raises(BackendError, match="expects"):
        emu3.decode_images(ids[:, :-1])
    span = emu3.image_span(ids[0].tolist())
    with pytest.raises(BackendError, match="must hold"):
        emu3.span_to_image_ids(span[:-5])
    c = emu3.image_span_constraint()
    with pytest.raises(BackendError, match="complete"):
        c.allowed([0] * len(c.template))


def test_missing_layout_token_is_refused(emu3_dir, tmp_path):
    import shutil

    from transformers import Emu3Processor

    copy = tmp_path / "broken"
    shutil.copytree(emu3_dir, copy)
    processor = Emu3Processor.from_pretrained(copy)
    processor.tokenizer.eof_token = "<|not a token|>"
    with pytest.raises(BackendError, match="lacks the layout token"):
        Emu3Backend(str(copy), load_backend(copy).model, processor)


def test_square_side_follows_the_processor_range():
    from yochameleon.backends.emu3 import _square_side

    # Emu3's own processor: 518,400 px generation area -> 720 px, a 90 x 90 grid as upstream generates.
    assert _square_side(512 * 512, 1024 * 1024, 518400, 8) == 720
    assert _square_side(32 * 32, 32 * 32, 518400, 8) == 32
    with pytest.raises(BackendError, match="no square image side"):
        _square_side(30 * 30, 30 * 30, 518400, 8)
