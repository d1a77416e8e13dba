"""Distributed batching: every rank gets the same number of equal-sized batches for every data size,
and gradient accumulation weights micro-batches by labelled tokens."""

from __future__ import annotations

import pytest
import torch

from yochameleon.train.sequences import length_grouped_batches
from yochameleon.train.trainer import rank_batches


def test_nine_sequences_batch_four_two_ranks():
    # The case that hung: global batches of 8 and 1; slicing gave rank 1 a single batch.
    batches = length_grouped_batches([10 + i for i in range(9)], 4 * 2, seed=0)
    assert sorted(len(b) for b in batches) == [1, 8]
    shares = [rank_batches(batches, 2, rank) for rank in range(2)]
    assert [len(s) for s in shares] == [2, 2]
    assert [len(b) for b in shares[0]] == [len(b) for b in shares[1]]
    assert sorted(i for s in shares for b in s for i in b) == sorted(
        [*range(9), *next(b for b in batches if len(b) == 1)]
    )


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_rank_gets_the_same_batches_for_every_size(world):
    for n in range(1, 70):
        for batch_size in (1, 2, 3, 4):
            lengths = [(7 * i) % 13 + 5 for i in range(n)]
            batches = length_grouped_batches(lengths, batch_size * world, seed=n, group=2)
            shares = [rank_batches(batches, world, rank) for rank in range(world)]
            counts = {len(s) for s in shares}
            assert counts == {len(batches)}, (n, batch_size, world)
            for step in range(len(batches)):
                sizes = {len(s[step]) for s in shares}
                assert len(sizes) == 1 and min(sizes) >= 1, (n, batch_size, world, step)
            seen = {i for s in shares for b in s for i in b}
            assert seen == set(range(n))  # padding repeats a few samples and drops none


def test_one_process_keeps_its_batches_unchanged():
    batches = length_grouped_batches(list(range(11)), 4, seed=3)
    assert rank_batches(batches, 1, 0) == batches


def test_gradient_accumulation_weights_micro_batches_by_labelled_tokens(
    backend, photos, tmp_path, monkeypatch
):
    from test_train import _config, _records

    from yochameleon.concept import detach
    from yochameleon.train.trainer import Trainer, labelled_weight

    ids = backend.encode_images(photos)
    table = {"img0": ids[0], "img1": ids[1], "neg0": ids[2], "neg1": ids[3]}
    lookup = lambda rec: table[rec["image"]].tolist()  # noqa: E731
    # Two short recognition samples and two long generation samples: length-grouped micro-batches of
    # 2 pair them, so the two micro-batches hold very different numbers of labelled tokens.
    records = [r for r in _records(1) if r["kind"] != "text_qa"]
    grads = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def keep_grads(params, *args, **kwargs):
        grads[run] = torch.cat([p.grad.flatten().clone() for p in params])
        return real_clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", keep_grads)
    for run, (batch_size, accum) in {"one batch": (4, 1), "accumulated": (2, 2)}.items():
        over = {"optim.batch_size": batch_size, "optim.grad_accum": accum, "optim.max_steps": 1}
        trainer = Trainer(_config(tmp_path / run, **over), backend=backend)
        trainer.setup(records={"cat": records}, image_ids=lookup)
        if run == "accumulated":
            batches = length_grouped_batches([len(s) for s in trainer.sequences], 2, 0)
            weights = [sum(labelled_weight(trainer.sequences[i], {}) for i in b) for b in batches]
            assert max(weights) > 3 * min(weights)  # an unweighted mean would count them alike
        trainer.train()
        detach(backend, "cat")
    torch.testing.assert_close(grads["accumulated"], grads["one batch"], rtol=1e-4, atol=1e-7)
