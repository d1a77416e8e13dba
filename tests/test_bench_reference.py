"""The reference trainer: same loss and gradients as the fast path, frozen rows restored, bad input."""

from __future__ import annotations

import pytest
import torch

from yochameleon.backends import load_backend
from yochameleon.concept import ConceptSpec, attach, get_bank
from yochameleon.eval.bench.reference import (
    BenchError,
    FullMatrixConcept,
    ReferenceOptions,
    ReferenceTrainer,
    reencode_sequences,
)
from yochameleon.eval.bench.train_bench import (
    FEATURES,
    Features,
    StepRunner,
    check_batch_indices,
    encode_photos,
    workload_photos,
    workload_records,
)
from yochameleon.train.loss import label_only_loss
from yochameleon.train.sequences import build_sequence, collate


@pytest.fixture(scope="module")
def photos():
    return workload_photos()


@pytest.fixture(scope="module")
def records():
    recs = workload_records()
    return [recs[i] for i in check_batch_indices(recs, 4)]


def _ours(tiny_dir, records, photos):
    """The fast path on a fresh backend: cached ids, rows only, right padding to the batch max."""
    torch.manual_seed(0)
    backend = load_backend(tiny_dir)
    tokens = attach(backend, ConceptSpec("bench"))
    cache = encode_photos(backend, photos)
    seqs = [build_sequence(backend, r, tokens, cache[r["image"]] if r["image"] else None) for r in records]
    return backend, tokens, collate(seqs, backend.special.pad)


def test_reference_loss_and_gradients_equal_the_fast_path(tiny_dir, records, photos):
    assert {r["kind"] for r in records} == {"recognition", "generation_real", "generation_soft", "text_qa"}
    backend, tokens, batch = _ours(tiny_dir, records, photos)
    loss, _ = label_only_loss(backend, batch, chunk=29)
    loss.backward()
    ours_grads = [p.grad.clone() for p in get_bank(backend).parameters()]

    ref_backend = load_backend(tiny_dir)
    ref = ReferenceTrainer(
        ref_backend, ConceptSpec("bench"), ReferenceOptions(pad_to=batch.input_ids.shape[1] + 13)
    )
    assert ref.tokens.ids == tokens.ids
    ref_batch = ref.batch(records, photos)
    assert ref_batch.input_ids.shape[1] == batch.input_ids.shape[1] + 13  # padded to the fixed length
    ref_loss = ref.loss(ref_batch)
    assert abs(ref_loss.item() - loss.item()) < 1e-4
    ref_loss.backward()
    ids = torch.tensor(tokens.ids)
    emb_grad, head_grad = (p.grad for p in ref.matrices.parameters())
    torch.testing.assert_close(emb_grad[ids], ours_grads[0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(head_grad[ids], ours_grads[1], atol=1e-6, rtol=1e-4)
    # The reference really carries gradients for the whole matrices (what makes it expensive).
    assert head_grad.abs().sum(dim=1).gt(0).sum() > len(tokens.ids)


def test_reference_step_restores_every_non_concept_row(tiny_dir, records, photos):
    backend = load_backend(tiny_dir)
    base_emb = backend.input_embeddings().weight.detach().clone()
    base_head = backend.output_head().weight.detach().clone()
    ref = ReferenceTrainer(backend, ConceptSpec("bench"), ReferenceOptions(lr=1e-2, weight_decay=0.1))
    loss, _ = ref.step(records, photos)
    assert loss > 0
    emb, head = (p.detach() for p in ref.matrices.parameters())
    concept = torch.zeros(emb.shape[0], dtype=torch.bool)
    concept[ref.tokens.ids] = True
    assert torch.equal(emb[~concept], base_emb[~concept]) and torch.equal(head[~concept], base_head[~concept])
    assert not torch.equal(head[concept], base_head[concept])
    rows = ref.matrices.concept_rows()
    assert rows["embed"].shape == (len(ref.tokens.ids), backend.hidden_size)
    ref.matrices.remove()
    assert backend.input_embeddings().weight is not emb  # the original modules are back
    assert torch.equal(backend.input_embeddings().weight, base_emb)


def test_every_ablation_configuration_computes_the_same_loss(tiny_dir, photos):
    """Switching a fast-path feature off changes cost, never the objective."""
    records = workload_records()
    losses = {}
    configs = {"ours": Features(), "reference": Features.reference()}
    configs.update({f"no_{f}": Features().without(f) for f in FEATURES})
    for name, features in configs.items():
        torch.manual_seed(0)
        runner = StepRunner(load_backend(tiny_dir), features, records, photos)
        losses[name] = runner.check_loss()
        if name in ("reference", "ours"):
            info = runner.step(runner.epoch_batches(0)[0])
            assert info["labelled_tokens"] <= info["real_tokens"] <= info["padded_tokens"]
            if name == "reference":
                assert info["padded_tokens"] == 4 * max(runner.lengths)
    assert max(losses.values()) - min(losses.values()) < 1e-4, losses


def test_bad_inputs_raise_bench_errors(tiny_dir, records, photos):
    with pytest.raises(BenchError, match="lr"):
        ReferenceOptions(lr=0)
    with pytest.raises(BenchError, match="pad_to"):
        ReferenceOptions(pad_to=1)
    with pytest.raises(BenchError, match="weight_decay"):
        ReferenceOptions(weight_decay=-1)
    backend = load_backend(tiny_dir)
    ref = ReferenceTrainer(backend, ConceptSpec("bench"), ReferenceOptions(pad_to=8))
    with pytest.raises(BenchError, match="more than pad_to"):
        ref.batch(records, photos)
    with pytest.raises(BenchError, match="does not hold"):
        reencode_sequences(backend, records, {}, ref.tokens)
    attached = load_backend(tiny_dir)
    tokens = attach(attached, ConceptSpec("other"))
    with pytest.raises(BenchError, match="without attached concept rows"):
        FullMatrixConcept(attached, tokens)
    with pytest.raises(BenchError, match="unknown fast-path feature"):
        Features().without("magic")


def test_label_only_gradients_match_autograd_with_task_weights(tiny_dir, records, photos):
    """The chunked loss takes its gradients in forward; they must equal plain autograd's."""
    import torch.nn.functional as F

    from yochameleon.train.loss import token_weights
    from yochameleon.train.sequences import IGNORE

    backend, _, batch = _ours(tiny_dir, records, photos)
    weights = {"generation_real": 0.25, "recognition": 2.0}
    loss, per_kind = label_only_loss(backend, batch, weights, chunk=7)
    (2.5 * loss).backward()  # a non-unit upstream gradient must scale every gradient
    params = get_bank(backend).parameters()
    fast = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    hidden, _ = backend.hidden_states(batch.input_ids, batch.attention_mask, batch.position_ids)
    ce = F.cross_entropy(
        backend.logits(hidden[:, :-1]).transpose(1, 2),
        batch.labels[:, 1:],
        ignore_index=IGNORE,
        reduction="none",
    )
    w = token_weights(batch, weights)[:, 1:] * (batch.labels[:, 1:] != IGNORE)
    plain = (ce * w).sum() / w.sum()
    assert abs(plain.item() - loss.item()) < 1e-5
    assert set(per_kind) == set(batch.kinds)
    (2.5 * plain).backward()
    for got, want in zip(fast, (p.grad for p in params)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
