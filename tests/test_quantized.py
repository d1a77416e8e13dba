"""A 4-bit / 8-bit base through bitsandbytes, for training and inference, on the CPU."""

from __future__ import annotations

import pytest
import torch

from yochameleon.backends import LoadOptions, load_backend
from yochameleon.concept import ConceptSpec, attach, detach, get_bank
from yochameleon.infer import PersonalizedModel
from yochameleon.train.loss import label_only_loss
from yochameleon.train.sequences import build_sequence, collate

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_base_trains_concept_rows_only(tiny_dir, photos, quant):
    import bitsandbytes as bnb

    backend = load_backend(tiny_dir, LoadOptions(quantization=quant))
    linear = backend.model.model.layers[0].mlp.gate_proj
    assert isinstance(linear, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    tokens = attach(backend, ConceptSpec("q", n_g=4, n_u=4))
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    img = backend.encode_images(photos[:1])[0].tolist()
    recs = [
        {
            "task": "generation",
            "kind": "generation_real",
            "question": "A photo of <sks>.",
            "image": "x",
            "n_g": 4,
        },
        {
            "task": "understanding",
            "kind": "recognition",
            "question": "Is <sks> here?<image>",
            "answer": "Yes, it is <sks>.",
            "image": "x",
        },
    ]
    batch = collate([build_sequence(backend, r, tokens, img) for r in recs], backend.special.pad)
    opt = torch.optim.AdamW(get_bank(backend).parameters(), lr=3e-2)
    losses = []
    for _ in range(15):
        loss, _ = label_only_loss(backend, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.3, losses
    after = backend.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if ".rows." not in k)
    # Inference runs on the quantized base too. (bitsandbytes repacks 4-bit blocks for its CPU
    # kernel on the first single-token matmul, so the frozen check above comes first.)
    assert PersonalizedModel(backend).generate_image("A photo of <q>.", n=1, temperature=0)[0].size[0] == 64
    detach(backend, "q")
