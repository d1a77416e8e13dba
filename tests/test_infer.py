"""Inference: forced vs emitted self-prompts, several concepts, masking, image generation."""

from __future__ import annotations

import pytest
import torch

from yochameleon.concept import ConceptSpec, attach, get_bank, save_concept
from yochameleon.errors import ConceptError
from yochameleon.infer import PersonalizedModel, SelfPromptThenImage
from yochameleon.train.loss import label_only_loss
from yochameleon.train.sequences import build_sequence, collate


def _fit(backend, tokens, records, image_ids, steps=40, lr=3e-2):
    seqs = [build_sequence(backend, r, tokens, image_ids) for r in records]
    batch = collate(seqs, backend.special.pad)
    opt = torch.optim.AdamW(get_bank(backend).parameters(tokens.spec.name), lr=lr)
    for _ in range(steps):
        loss, _ = label_only_loss(backend, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss)


def test_forced_and_emitted_self_prompt(backend):
    tokens = attach(backend, ConceptSpec("bo", n_g=4, n_u=4))
    rec = {
        "task": "understanding",
        "kind": "text_qa",
        "question": "What is <sks>?",
        "answer": "a red dog",
        "image": None,
    }
    _fit(backend, tokens, [rec], None, steps=60)
    pm = PersonalizedModel(backend)
    forced = pm.ask_detailed("What is <bo>?", force_tokens=True)
    emitted = pm.ask_detailed("What is <bo>?", force_tokens=False)
    assert forced.forced and forced.self_prompt == tokens.u_ids
    # Trained to emit its u-tokens first, the model does so on its own, then answers the same.
    assert emitted.self_prompt == tokens.u_ids
    assert "red dog" in forced.text and "red dog" in emitted.text


def test_absent_concepts_are_masked_and_plain_prompts_match_base(backend):
    pm = PersonalizedModel(backend)
    base_answer = pm.ask("Describe a circle.", max_new_tokens=12)
    a = attach(backend, ConceptSpec("a", n_g=2, n_u=2))
    b = attach(backend, ConceptSpec("b", n_g=2, n_u=2))
    # Make b's head rows dominate: without masking, every answer would be b's tokens.
    with torch.no_grad():
        get_bank(backend).head.rows["b"].mul_(0).add_(5.0 * backend.output_head().base.weight.abs().max())
    assert pm.ask("Describe a circle.", max_new_tokens=12) == base_answer
    out = pm.ask_detailed("What is <a>?", max_new_tokens=12)
    assert not set(out.self_prompt) & set(b.ids)
    assert a.spec.name in pm.concepts and len(pm.concepts) == 2


def test_two_concepts_in_one_prompt(backend):
    a = attach(backend, ConceptSpec("bo", n_g=2, n_u=2))
    b = attach(backend, ConceptSpec("mam", n_g=2, n_u=2))
    pm = PersonalizedModel(backend)
    ids, used = pm._prompt_ids("Is <bo> next to <mam>?", None)
    assert [c.spec.name for c in used] == ["bo", "mam"]
    assert a.sks_id in ids and b.sks_id in ids
    # Both personalized prompts come first, each with all of its tokens.
    assert set(a.ids) <= set(ids) and set(b.ids) <= set(ids)
    with pytest.raises(ConceptError, match="name a concept"):
        pm.caption(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (64, 64)))


def test_generate_image_forced_and_emitted(backend, photos, tmp_path):
    tokens = attach(backend, ConceptSpec("cat", n_g=4, n_u=4))
    img = backend.encode_images(photos[1:2])[0].tolist()
    rec = {
        "task": "generation",
        "kind": "generation_real",
        "question": "A photo of <sks>.",
        "image": "x",
        "n_g": 4,
    }
    _fit(backend, tokens, [rec], img, steps=60)
    pm = PersonalizedModel(backend)
    forced = pm.generate_image("A photo of <cat>.", n=2, seed=0, temperature=0)
    emitted = pm.generate_image("A photo of <cat>.", n=1, seed=0, temperature=0, force_tokens=False)
    assert len(forced) == 2 and forced[0].size == (backend.image_size, backend.image_size)
    single = pm.generate_image("A photo of <cat>.", n=1, seed=0, temperature=0)
    assert list(single[0].getdata()) == list(emitted[0].getdata())  # it emitted its g-tokens itself
    sampled = pm.generate_image("A photo of <cat>.", n=2, seed=1, temperature=1.0)
    again = pm.generate_image("A photo of <cat>.", n=2, seed=1, temperature=1.0)
    assert [list(i.getdata()) for i in sampled] == [list(i.getdata()) for i in again]
    paths = pm.generate_to_dir("A photo of <cat>.", tmp_path / "gen", n=2, seed=0)
    assert all(p.is_file() for p in paths)


def test_self_prompt_then_image_constraint(backend):
    span = backend.image_span_constraint()
    c = SelfPromptThenImage([900, 901], span)
    assert set(c.allowed([]).tolist()) == {900, 901, backend.special.boi}
    assert c.allowed([900, 901]).tolist() == [backend.special.boi]
    boi = backend.special.boi
    assert set(c.allowed([900, boi]).tolist()) == set(backend.special.image_token_ids)
    assert not c.done([900, boi])


def test_load_from_files(backend, tiny_dir, tmp_path):
    attach(backend, ConceptSpec("rex", n_g=2, n_u=2))
    st, _ = save_concept(backend, "rex", tmp_path / "rex")
    pm = PersonalizedModel.load(str(tiny_dir), [st], device="cpu")
    assert list(pm.concepts) == ["rex"]
    from PIL import Image

    from yochameleon.prompts import recognition_question

    image = Image.new("RGB", (64, 64), (200, 40, 40))
    question = recognition_question(0).replace("<sks>", "<rex>")
    # The concept loaded from its files scores as the one attached in memory on the same base.
    yes, no = pm.yes_no_logprobs(question, image)
    want = PersonalizedModel(backend).yes_no_logprobs(question, image)
    assert (yes, no) == pytest.approx(want, abs=1e-5)
    assert yes < 0 and no < 0 and yes != no
    assert pm.recognize(image) is (yes > no)
