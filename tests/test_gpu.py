"""On a CUDA device: a bf16 training step, the training benchmark's GPU memory, and image generation.

Selected by ``make test-gpu`` (``-m gpu``); each test skips without CUDA. The tiny model keeps them to
seconds, so they run on any lent GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from yochameleon.backends import LoadOptions, load_backend
from yochameleon.generation import generate, teacher_forced_argmax

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_training_steps_move_only_the_concept_rows(tiny_dir, photos, tmp_path):
    from test_train import _config, _records

    from yochameleon.concept import concept_rows, detach, get_bank
    from yochameleon.train.trainer import Trainer

    backend = load_backend(str(tiny_dir), LoadOptions(dtype="bfloat16", device="cuda"))
    before = {k: v.detach().clone() for k, v in backend.model.state_dict().items()}
    ids = backend.encode_images(photos)
    table = {"img0": ids[0], "img1": ids[1], "neg0": ids[2], "neg1": ids[3]}
    over = {
        "model.device": "cuda",
        "model.dtype": "bfloat16",
        "mixed_precision": "bf16",
        "optim.max_steps": 4,
        "optim.batch_size": 4,
    }
    trainer = Trainer(_config(tmp_path, **over), backend=backend)
    trainer.setup(records={"cat": _records(2)}, image_ids=lambda rec: table[rec["image"]].tolist())
    start = {k: v.clone() for k, v in concept_rows(backend, "cat").items()}
    result = trainer.train()
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    rows = concept_rows(backend, "cat")
    assert rows["embed"].dtype == torch.float32  # fp32 master rows on a bf16 model
    assert all(p.device.type == "cuda" for p in get_bank(backend).parameters())
    assert not torch.equal(rows["embed"], start["embed"]) and not torch.equal(rows["head"], start["head"])
    detach(backend, "cat")
    after = backend.model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"frozen weights moved: {changed[:5]}"


def test_bench_train_on_cuda_reports_max_memory_allocated(tmp_path):
    from yochameleon.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", "train", "--model", "tiny", "--device", "cuda", "--steps", "2", "--repeats", "1"]
    assert main([*argv, "--no-ablation", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for impl in ("ours", "reference"):
        run = result[impl]
        assert run["device"].startswith("cuda")
        assert run["memory_method"] == "torch.cuda.max_memory_allocated"
        assert run["train_memory_mb"] > 0
    # reference / ours: the reference keeps AdamW state for the whole embedding and head matrices.
    assert result["memory_ratio"] > 1


def test_image_generation_on_cuda_is_the_teacher_forced_argmax_chain(tiny_dir):
    backend = load_backend(str(tiny_dir), LoadOptions(dtype="float32", device="cuda"))
    sp = backend.special
    prompt = torch.tensor([[sp.bos, 300, 301, 302, sp.eot]])
    out = generate(backend, prompt, backend.image_span_constraint(), backend.image_seq_len + 2)
    row = out[0].tolist()
    assert row[0] == sp.boi and row[-1] == sp.eoi and len(row) == backend.image_seq_len + 2
    chain = teacher_forced_argmax(backend, prompt, out[:, :-1], allowed=torch.tensor(sp.image_token_ids))
    assert torch.equal(chain[0, 1:], out[0, 1:-1].cpu())
    image = backend.decode_images(out[:, 1:-1])[0]
    assert image.size == (backend.image_size, backend.image_size)
