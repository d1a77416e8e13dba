"""The label-only loss keeps its logits small: capped chunks, no float32 copy of bf16 logits, exact results."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from yochameleon.backends import load_backend
from yochameleon.backends.base import Backend, LoadOptions
from yochameleon.concept import ConceptSpec, attach, get_bank
from yochameleon.eval.bench.train_bench import (
    check_batch_indices,
    encode_photos,
    workload_photos,
    workload_records,
)
from yochameleon.train import loss as loss_mod
from yochameleon.train.loss import (
    LENGTH_BUCKET,
    ROW_BUCKET,
    UPCAST_ROWS,
    bucket_length,
    chunk_rows,
    full_logits_loss,
    label_only_loss,
)
from yochameleon.train.sequences import IGNORE, build_sequence, collate


class _VocabTensors(TorchDispatchMode):
    """Records the shape and dtype of every op output whose last dimension is the vocabulary."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new memory
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                self.seen.append((tuple(t.shape), t.dtype))
        return out

    def rows(self, dtype: torch.dtype | None = None) -> int:
        """The most rows any recorded vocabulary-wide tensor (of ``dtype``) had."""
        return max((math.prod(s[:-1]) for s, d in self.seen if dtype in (None, d)), default=0)


@pytest.fixture(scope="module")
def photos():
    return workload_photos()


def _batch(backend, photos):
    recs = workload_records()
    recs = [recs[i] for i in check_batch_indices(recs, 4)]
    tokens = attach(backend, ConceptSpec("mem"))
    cache = encode_photos(backend, photos)
    seqs = [build_sequence(backend, r, tokens, cache[r["image"]] if r["image"] else None) for r in recs]
    return collate(seqs, backend.special.pad)


def test_chunk_rows_are_capped_by_bytes(tiny_dir):
    backend = load_backend(tiny_dir)
    assert chunk_rows(backend, 7) == 7
    assert chunk_rows(backend, 10**6, max_bytes=4 * backend.vocab_size * 3) == 3
    assert chunk_rows(backend, 10**6, max_bytes=1) == 1
    # On a CPU 8 MiB of float32 logits: 113 rows of the anole-tiny vocabulary; on a GPU the cap
    # leaves Anole-7B's 1,024-row chunks alone.
    assert loss_mod.LOGITS_CHUNK_BYTES // (4 * 18432) == 113
    assert loss_mod.LOGITS_CHUNK_BYTES_GPU // (4 * 65536) == 2048


def test_no_logits_chunk_exceeds_its_byte_cap(tiny_dir, photos, monkeypatch):
    backend = load_backend(tiny_dir)
    batch = _batch(backend, photos)
    labelled = int((batch.labels[:, 1:] != IGNORE).sum())
    cap = 2 * ROW_BUCKET  # rows: far fewer than the batch's labelled tokens
    assert labelled > 3 * cap
    monkeypatch.setattr(loss_mod, "LOGITS_CHUNK_BYTES", cap * 4 * backend.vocab_size)
    with _VocabTensors(backend.vocab_size) as seen:
        loss, _ = label_only_loss(backend, batch, chunk=1024)
        loss.backward()
    assert seen.rows() == cap


def test_bf16_loss_never_upcasts_a_whole_chunk_and_matches_the_straightforward_loss(tiny_dir, photos):
    backend = load_backend(tiny_dir, LoadOptions(dtype="bfloat16"))
    batch = _batch(backend, photos)
    chunk = 3 * ROW_BUCKET
    assert int((batch.labels[:, 1:] != IGNORE).sum()) > chunk > UPCAST_ROWS
    with _VocabTensors(backend.vocab_size) as seen:
        loss, _ = label_only_loss(backend, batch, chunk=chunk)
        loss.backward()
    assert seen.rows(torch.bfloat16) == chunk
    # Float32 logits exist only UPCAST_ROWS rows at a time.
    assert 0 < seen.rows(torch.float32) <= UPCAST_ROWS
    params = get_bank(backend).parameters()
    fast = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    plain = full_logits_loss(backend, batch)  # logits upcast to float32 at every position
    plain.backward()
    assert abs(plain.item() - loss.item()) < 1e-4 * max(1.0, abs(plain.item()))
    # bf16 hidden states and their gradients round differently in the two computations' matmuls.
    for got, want in zip(fast, (p.grad for p in params), strict=True):
        assert (got - want).norm() <= 2e-2 * want.norm()


def test_bf16_step_moves_only_concept_rows(tiny_dir, photos):
    backend = load_backend(tiny_dir, LoadOptions(dtype="bfloat16"))
    before = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
    batch = _batch(backend, photos)
    params = get_bank(backend).parameters()
    rows_before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    loss, _ = label_only_loss(backend, batch, chunk=64)
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(rows_before, params, strict=True))
    for name, p in backend.model.named_parameters():
        if name in before:
            assert torch.equal(p.detach(), before[name]), name


def test_no_grad_loss_equals_the_gradient_path(tiny_dir, photos):
    backend = load_backend(tiny_dir)
    batch = _batch(backend, photos)
    with torch.no_grad():
        evaluated, per_kind_eval = label_only_loss(backend, batch, chunk=50)
    trained, per_kind = label_only_loss(backend, batch, chunk=50)
    assert abs(evaluated.item() - trained.item()) < 1e-6
    assert per_kind_eval.keys() == per_kind.keys()


def test_head_logits_keep_the_head_dtype_and_respect_overridden_logits(tiny_dir):
    backend = load_backend(tiny_dir, LoadOptions(dtype="bfloat16"))
    hidden = torch.randn(3, backend.hidden_size, dtype=torch.bfloat16)
    assert backend.head_logits(hidden).dtype == torch.bfloat16
    assert backend.logits(hidden).dtype == torch.float32
    torch.testing.assert_close(backend.head_logits(hidden).float(), backend.logits(hidden))

    class Mixture(type(backend)):
        def logits(self, hidden):  # e.g. Janus: log-probabilities of two heads
            return F.log_softmax(super().logits(hidden), dim=-1)

    mixed = object.__new__(Mixture)
    mixed.__dict__.update(backend.__dict__)
    torch.testing.assert_close(mixed.head_logits(hidden), mixed.logits(hidden))
    assert Backend.head_logits is type(backend).head_logits


def test_chameleon_loads_with_sdpa_and_it_matches_eager_attention(tiny_dir, photos):
    backend = load_backend(tiny_dir)
    assert backend.model.config._attn_implementation == "sdpa"
    batch = _batch(backend, photos)
    with torch.no_grad():
        sdpa, _ = label_only_loss(backend, batch)
        backend.model.set_attn_implementation("eager")
        assert backend.model.config._attn_implementation == "eager"
        eager, _ = label_only_loss(backend, batch)
    assert abs(sdpa.item() - eager.item()) < 1e-5


def test_shape_buckets_pad_lengths_and_rows_without_changing_the_loss(tiny_dir, photos):
    backend = load_backend(tiny_dir)
    batch = _batch(backend, photos)
    padded = bucket_length(batch)
    width = batch.input_ids.shape[1]
    assert width % LENGTH_BUCKET and padded.input_ids.shape[1] == -(-width // LENGTH_BUCKET) * LENGTH_BUCKET
    assert torch.equal(padded.input_ids[:, :width], batch.input_ids)
    assert not padded.attention_mask[:, width:].any() and (padded.labels[:, width:] == IGNORE).all()
    assert torch.equal(
        padded.position_ids[:, width:],
        batch.position_ids[:, -1:] + torch.arange(1, 1 + padded.input_ids.shape[1] - width),
    )
    widths = []
    forward = backend.hidden_states

    def record(input_ids, **kwargs):
        widths.append(input_ids.shape[1])
        return forward(input_ids, **kwargs)

    backend.hidden_states = record
    with _VocabTensors(backend.vocab_size) as seen:
        bucketed, kinds = label_only_loss(backend, batch, chunk=50)
    assert widths[-1] % LENGTH_BUCKET == 0
    # Every chunk is a multiple of ROW_BUCKET rows (the last one padded with zero-weight rows).
    assert {math.prod(s[:-1]) % ROW_BUCKET for s, _ in seen.seen} == {0}
    exact, exact_kinds = label_only_loss(backend, batch, chunk=50, buckets=False)
    assert widths[-1] == width
    assert abs(bucketed.item() - exact.item()) < 1e-5
    assert kinds.keys() == exact_kinds.keys() and all(abs(kinds[k] - exact_kinds[k]) < 1e-5 for k in kinds)
