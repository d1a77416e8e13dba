"""Concept tokens: frozen weights, attach/detach, several concepts, concept files and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from yochameleon.backends import load_backend
from yochameleon.concept import (
    ConceptSpec,
    attach,
    concept_file_bytes,
    concept_rows,
    detach,
    get_bank,
    load_concept,
    save_concept,
)
from yochameleon.errors import ConceptError, IncompatibleBaseModelError, TokenBudgetError


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _logits(backend, ids):
    hidden, _ = backend.hidden_states(torch.tensor([ids]))
    return backend.logits(hidden)[0]


def _train_steps(backend, tokens, steps=3):
    params = get_bank(backend).parameters(tokens.spec.name)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.tensor([[1, *tokens.ids[:5], 300, 301, *tokens.ids[5:9]]])
    for _ in range(steps):
        hidden, _ = backend.hidden_states(ids)
        loss = torch.nn.functional.cross_entropy(backend.logits(hidden[0, :-1]), ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_only_concept_rows_change_and_base_is_bit_identical(backend):
    before = _snapshot(backend.model)
    tokens = attach(backend, ConceptSpec("dog"))
    rows0 = concept_rows(backend, "dog")
    trainable = [n for n, p in backend.model.named_parameters() if p.requires_grad]
    assert all(".rows." in n for n in trainable) and len(trainable) == 2
    _train_steps(backend, tokens)
    rows1 = concept_rows(backend, "dog")
    assert not torch.equal(rows0["embed"], rows1["embed"]) and not torch.equal(rows0["head"], rows1["head"])
    detach(backend, "dog")
    after = _snapshot(backend.model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_detach_restores_modules_and_logits(backend):
    emb, head = backend.input_embeddings(), backend.output_head()
    ids = [1, 300, 301, 302]
    base = _logits(backend, ids)
    tokens = attach(backend, ConceptSpec("mug", n_g=4, n_u=4))
    _train_steps(backend, tokens)
    detach(backend, "mug")
    assert backend.input_embeddings() is emb and backend.output_head() is head
    assert torch.equal(base, _logits(backend, ids))


def test_two_concepts_do_not_interfere(backend):
    a = attach(backend, ConceptSpec("a", n_g=4, n_u=4))
    assert a.spec.n_tokens == 9
    ids_a = [1, *a.ids, 300]
    alone = _logits(backend, ids_a)
    b = attach(backend, ConceptSpec("b", n_g=4, n_u=4))
    assert not set(a.ids) & set(b.ids)
    _train_steps(backend, b)
    with_b = _logits(backend, ids_a)
    # Everything but b's own columns is unchanged for a prompt that only uses a.
    keep = torch.ones(backend.vocab_size, dtype=torch.bool)
    keep[b.ids] = False
    assert torch.equal(alone[:, keep], with_b[:, keep])


def test_prompt_without_concepts_matches_base_exactly(backend):
    ids = [1, 300, 301, 302, 303]
    base = _logits(backend, ids)
    tokens = attach(backend, ConceptSpec("c", n_g=2, n_u=2))
    _train_steps(backend, tokens)
    now = _logits(backend, ids)
    keep = torch.ones(backend.vocab_size, dtype=torch.bool)
    keep[tokens.ids] = False
    assert torch.equal(base[:, keep], now[:, keep])


@pytest.mark.parametrize("name", ["", "has space", "<sks>", "a/b", "a\\b", "..", "x" * 65, "tab\tname"])
def test_invalid_names_refused(name):
    with pytest.raises(ConceptError):
        ConceptSpec(name)


@pytest.mark.parametrize("name", ["bo", "Mimi_2", "猫", "café", "ÇaVa-1"])
def test_unicode_names_accepted(name):
    assert ConceptSpec(name).name == name


def test_duplicate_name_and_budget_leave_model_unchanged(backend):
    attach(backend, ConceptSpec("dup", n_g=2, n_u=2))
    state = _snapshot(backend.model)
    with pytest.raises(ConceptError, match="already attached"):
        attach(backend, ConceptSpec("dup", n_g=2, n_u=2))
    free = len(backend.free_token_ids()) - 5
    with pytest.raises(TokenBudgetError, match="free reserved ids"):
        attach(backend, ConceptSpec("huge", n_g=free, n_u=1))
    assert list(get_bank(backend).concepts) == ["dup"]
    after = _snapshot(backend.model)
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_free_ids_exclude_specials(backend):
    free = set(backend.free_token_ids())
    sp = backend.special
    assert not free & {sp.eot, sp.boi, sp.eoi, sp.bos, sp.eos, sp.pad, sp.image_placeholder}
    assert not free & set(sp.image_token_ids)
    assert all(backend.id_to_token(i).startswith("<reserved") for i in free)


def test_concept_file_round_trip_in_fresh_process(backend, tiny_dir, tmp_path):
    tokens = attach(backend, ConceptSpec("rex", n_g=4, n_u=4))
    _train_steps(backend, tokens)
    st, js = save_concept(backend, "rex", tmp_path / "rex", training_config={"lr": 1e-2})
    assert st.stat().st_size < concept_file_bytes(9, backend.hidden_size) + 1024
    meta = json.loads(js.read_text())
    assert meta["token_ids"] == tokens.ids and meta["base_fingerprint"] == backend.fingerprint()
    ids = [1, *tokens.ids, 300, 301]
    expected = _logits(backend, ids)
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import torch
from yochameleon.backends import load_backend
from yochameleon.concept import load_concept
b = load_backend({str(tiny_dir)!r})
load_concept(b, {str(st)!r})
h, _ = b.hidden_states(torch.tensor([{ids}]))
assert torch.equal(b.logits(h)[0], torch.load({str(tmp_path / "expected.pt")!r})), "logits differ"
print("identical")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "identical" in out.stdout


@pytest.fixture
def saved(backend, tmp_path):
    tokens = attach(backend, ConceptSpec("kit", n_g=2, n_u=2))
    _train_steps(backend, tokens, steps=1)
    st, js = save_concept(backend, "kit", tmp_path / "kit")
    detach(backend, "kit")
    return st, js


def _expect_refused(backend, path, exc=ConceptError, match=None):
    state = _snapshot(backend.model)
    with pytest.raises(exc, match=match):
        load_concept(backend, path)
    assert get_bank(backend) is None or "kit" not in get_bank(backend).concepts
    after = _snapshot(backend.model)
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_truncated_file_refused(backend, saved):
    st, _ = saved
    st.write_bytes(st.read_bytes()[:-40])
    _expect_refused(backend, st, match="truncated")


def test_wrong_shape_dtype_extra_and_nan_refused(backend, saved):
    st, _ = saved
    good = load_file(str(st))
    cases = [
        ({"embed": good["embed"][:, :-1].contiguous(), "head": good["head"]}, "shape"),
        ({"embed": good["embed"].half(), "head": good["head"]}, "dtype"),
        ({**good, "extra": torch.zeros(1)}, "exactly the tensors"),
        (
            {
                "embed": good["embed"].clone().index_fill_(0, torch.tensor([1]), float("nan")),
                "head": good["head"],
            },
            "NaN",
        ),
    ]
    for tensors, match in cases:
        save_file(tensors, str(st))
        _expect_refused(backend, st, match=match)


def test_other_base_model_refused(saved, other_tiny_dir):
    st, _ = saved
    other = load_backend(other_tiny_dir)
    _expect_refused(other, st, IncompatibleBaseModelError, match="trained on")


def test_ids_taken_by_an_attached_concept_move_to_free_ids(backend, saved):
    st, js = saved
    first = attach(backend, ConceptSpec("first", n_g=2, n_u=2))  # takes the same lowest free ids
    assert first.ids == json.loads(js.read_text())["token_ids"]
    kit = load_concept(backend, st)
    assert not set(kit.ids) & set(first.ids) and set(kit.ids) <= set(backend.free_token_ids())
    assert kit.strings == [backend.id_to_token(i) for i in kit.ids]
    assert torch.equal(concept_rows(backend, "kit")["embed"], load_file(str(st))["embed"])


def test_missing_path_refused(backend, tmp_path):
    with pytest.raises(ConceptError, match="does not exist"):
        load_concept(backend, tmp_path / "nope.safetensors")


def test_concept_file_size_for_anole_7b():
    # 33 tokens x 4096 hidden x fp32 x (embedding + head) = about 1.08 MB.
    assert concept_file_bytes(33, 4096) == 1_081_344
