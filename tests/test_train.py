"""The trainer on the tiny model: loss equivalence, learning, frozen weights, checkpoints and failures."""

from __future__ import annotations

import pytest
import torch

from yochameleon.concept import ConceptSpec, attach, concept_rows
from yochameleon.config import from_dict
from yochameleon.errors import TrainingError
from yochameleon.generation import teacher_forced_argmax
from yochameleon.train.checkpoint import RunLock, load_checkpoint
from yochameleon.train.config import TrainConfig
from yochameleon.train.loss import full_logits_loss, label_only_loss
from yochameleon.train.sequences import IGNORE, build_sequence, collate
from yochameleon.train.trainer import Trainer


def _records(n_images: int = 2) -> list[dict]:
    recs = []
    for i in range(n_images):
        recs.append(
            {
                "id": f"rec{i}",
                "task": "understanding",
                "kind": "recognition",
                "question": "Is <sks> in this photo?<image>",
                "answer": "Yes, it is <sks>.",
                "image": f"img{i}",
                "flip": False,
                "label": "pos",
            }
        )
        recs.append(
            {
                "id": f"neg{i}",
                "task": "understanding",
                "kind": "recognition",
                "question": "Can you see <sks> here?<image>",
                "answer": "No, <sks> is not here.",
                "image": f"neg{i}",
                "flip": False,
                "label": "neg_easy",
            }
        )
        recs.append(
            {
                "id": f"gen{i}",
                "task": "generation",
                "kind": "generation_real",
                "question": "A photo of <sks>.",
                "answer": None,
                "image": f"img{i}",
                "flip": False,
                "n_g": 4,
            }
        )
    recs.append(
        {
            "id": "qa",
            "task": "understanding",
            "kind": "text_qa",
            "question": "What is <sks>?",
            "answer": "<sks> is a cat.",
            "image": None,
            "flip": False,
        }
    )
    recs.append(
        {
            "id": "soft",
            "task": "generation",
            "kind": "generation_soft",
            "question": "A photo of <sks>.",
            "answer": None,
            "image": "neg0",
            "flip": False,
            "n_g": 2,
            "prompt_form": "paper",
            "score": 0.5,
        }
    )
    return recs


@pytest.fixture
def image_lookup(backend, photos):
    ids = backend.encode_images(photos)
    table = {"img0": ids[0], "img1": ids[1], "neg0": ids[2], "neg1": ids[3]}
    return lambda rec: table[rec["image"]].tolist()


def _config(tmp_path, **over) -> TrainConfig:
    data = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "unused", "dtype": "float32", "device": "cpu"},
        "concept": {"name": "cat", "n_g": 4, "n_u": 4},
        "optim": {"lr": 1e-2, "batch_size": 2, "epochs": 2},
        "save_every": 3,
        "logging": {"loggers": ["jsonl"]},
    }
    for key, value in over.items():
        section, _, leaf = key.partition(".")
        if leaf:
            data.setdefault(section, {})[leaf] = value
        else:
            data[key] = value
    return from_dict(TrainConfig, data)


def test_sequence_layout_self_prompting(backend, image_lookup):
    tokens = attach(backend, ConceptSpec("cat", n_g=4, n_u=4))
    recs = _records(1)
    und = build_sequence(backend, recs[0], tokens, image_lookup(recs[0]))
    labelled = [t for t in und.labels if t != IGNORE]
    assert labelled[:4] == tokens.u_ids and labelled[-1] == backend.special.eot
    assert und.input_ids[0] == backend.special.bos and und.input_ids[1] == tokens.sks_id
    gen = build_sequence(backend, recs[2], tokens, image_lookup(recs[2]))
    glab = [t for t in gen.labels if t != IGNORE]
    assert glab[:4] == tokens.g_ids and glab[4] == backend.special.boi
    assert glab[5 : 5 + backend.image_seq_len] == image_lookup(recs[2]) and glab[-2:] == [
        backend.special.eoi,
        backend.special.eot,
    ]
    soft = build_sequence(backend, recs[-1], tokens, image_lookup(recs[-1]))
    slab = [t for t in soft.labels if t != IGNORE]
    assert slab[:2] == tokens.g_ids[:2] and slab[2] == backend.special.boi
    plain = build_sequence(backend, recs[2], tokens, image_lookup(recs[2]), self_prompting=False)
    assert [t for t in plain.labels if t != IGNORE][0] == backend.special.boi


def test_fast_loss_equals_full_logits_with_padding(backend, image_lookup):
    tokens = attach(backend, ConceptSpec("cat", n_g=4, n_u=4))
    seqs = [build_sequence(backend, r, tokens, image_lookup(r) if r["image"] else None) for r in _records(1)]
    batch = collate(seqs, backend.special.pad)
    assert len({len(s) for s in seqs}) > 1  # padding is really exercised
    fast, per_kind = label_only_loss(backend, batch, chunk=37)
    full = full_logits_loss(backend, batch)
    assert abs(fast.item() - full.item()) < 1e-4
    assert set(per_kind) == {s.kind for s in seqs}
    # Padding must not change a sample's loss: alone vs in the padded batch.
    alone, _ = label_only_loss(backend, collate(seqs[:1], backend.special.pad))
    padded, _ = label_only_loss(backend, collate(seqs[:1], backend.special.pad, pad_to=len(seqs[0]) + 7))
    assert abs(float(alone) - float(padded)) < 1e-5


def test_concept_learns_one_photo_and_base_stays_frozen(backend, image_lookup, tmp_path):
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    # 16 + 16 prompt rows are enough capacity to steer a random 4-layer model onto one image.
    cfg = _config(
        tmp_path,
        **{
            "optim.epochs": 60,
            "optim.batch_size": 1,
            "data.tasks": ["generation_real"],
            "optim.lr": 3e-2,
            "save_every": 1000,
            "concept.n_g": 16,
            "concept.n_u": 16,
        },
    )
    gen = [dict(r, n_g=16) for r in _records(1) if r["kind"] == "generation_real"]
    trainer = Trainer(cfg, backend=backend)
    trainer.setup(records={"cat": gen}, image_ids=image_lookup)
    result = trainer.train()
    tokens = trainer.concepts["cat"]
    seq = build_sequence(backend, gen[0], tokens, image_lookup(gen[0]))
    n_prompt = seq.labels.index(next(t for t in seq.labels if t != IGNORE))
    prompt = torch.tensor([seq.input_ids[:n_prompt]])
    cont = torch.tensor([seq.input_ids[n_prompt:]])
    pred = teacher_forced_argmax(backend, prompt, cont)[0]
    start = 16 + 1  # g-tokens, then boi
    img_true = cont[0, start : start + backend.image_seq_len]
    acc = (pred[start : start + backend.image_seq_len] == img_true).float().mean().item()
    assert acc >= 0.9, f"only {acc:.2%} of the image tokens are reproduced"
    # A random model starts near log(1536) = 7.3 nats/token; its small logit scale keeps the loss
    # well above 0 even when the argmax is right, so require a drop of 2 nats.
    assert result.losses[-1] < result.losses[0] - 2.0, result.losses[::10]
    from yochameleon.concept import detach

    detach(backend, "cat")
    after = backend.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_recognition_loss_falls(backend, image_lookup, tmp_path):
    recs = [r for r in _records(2) if r["kind"] == "recognition"]
    cfg = _config(tmp_path, **{"optim.epochs": 15, "data.tasks": ["recognition"], "save_every": 1000})
    trainer = Trainer(cfg, backend=backend)
    trainer.setup(records={"cat": recs}, image_ids=image_lookup)
    batch = collate(trainer.sequences, backend.special.pad)
    with torch.no_grad():
        start, _ = label_only_loss(backend, batch)
    trainer.train()
    with torch.no_grad():
        end, _ = label_only_loss(backend, batch)
    # Yes/No answers on four images: the prompt rows alone must at least halve the loss; a random
    # model starts near log(vocab) ~ 7.3 nats per token.
    assert float(end) < 0.5 * float(start), (float(start), float(end))


def test_non_finite_loss_stops_and_keeps_last_good(backend, image_lookup, tmp_path, monkeypatch):
    import yochameleon.train.trainer as tr

    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss, kinds = label_only_loss(*args, **kwargs)
        return (loss * float("nan"), kinds) if calls["n"] == 4 else (loss, kinds)

    monkeypatch.setattr(tr, "label_only_loss", flaky)
    trainer = Trainer(_config(tmp_path), backend=backend)
    trainer.setup(records={"cat": _records(1)}, image_ids=image_lookup)
    with pytest.raises(TrainingError, match="loss became nan at step 4"):
        trainer.train()
    tensors, state = load_checkpoint(tmp_path / "run", "last_good")
    assert state["step"] == 3
    assert torch.isfinite(tensors["cat/embed"]).all()
    assert torch.equal(tensors["cat/embed"], concept_rows(backend, "cat")["embed"])


def test_lock_refuses_second_writer(backend, image_lookup, tmp_path):
    trainer = Trainer(_config(tmp_path), backend=backend)
    trainer.setup(records={"cat": _records(1)}, image_ids=image_lookup)
    with RunLock(tmp_path / "run"), pytest.raises(TrainingError, match="another run"):
        trainer.train()


def test_resume_refuses_changed_recipe_and_existing_run(backend, image_lookup, tmp_path):
    trainer = Trainer(_config(tmp_path, **{"optim.max_steps": 2}), backend=backend)
    trainer.setup(records={"cat": _records(1)}, image_ids=image_lookup)
    trainer.train()
    from yochameleon.concept import detach

    detach(backend, "cat")
    again = Trainer(_config(tmp_path, **{"optim.max_steps": 2}), backend=backend)
    again.setup(records={"cat": _records(1)}, image_ids=image_lookup)
    with pytest.raises(TrainingError, match="already holds a run"):
        again.train()
    detach(backend, "cat")
    changed = Trainer(_config(tmp_path, **{"optim.max_steps": 2, "optim.lr": 5e-3}), backend=backend)
    changed.setup(records={"cat": _records(1)}, image_ids=image_lookup)
    with pytest.raises(TrainingError, match="optim.lr"):
        changed.train(resume=True)


def test_resume_in_process_matches_uninterrupted(backend, image_lookup, tmp_path):
    from yochameleon.concept import detach

    full = Trainer(_config(tmp_path / "a", **{"optim.epochs": 2}), backend=backend)
    full.setup(records={"cat": _records(1)}, image_ids=image_lookup)
    full.train()
    want = concept_rows(backend, "cat")
    detach(backend, "cat")
    # First half: stop after 3 steps (a checkpoint is written at step 3), then resume to the end.
    part = Trainer(_config(tmp_path / "b", **{"optim.epochs": 2, "optim.max_steps": 3}), backend=backend)
    part.setup(records={"cat": _records(1)}, image_ids=image_lookup)
    part.train()
    detach(backend, "cat")
    import json

    run = tmp_path / "b" / "run"
    meta = json.loads((run / "run.json").read_text())
    # Pretend the recipe never had max_steps (as if the process had been killed at step 3).
    meta["config"]["optim"]["max_steps"] = None
    from yochameleon.train.checkpoint import config_hash

    meta["config_hash"] = config_hash(meta["config"])
    (run / "run.json").write_text(json.dumps(meta))
    rest = Trainer(_config(tmp_path / "b", **{"optim.epochs": 2}), backend=backend)
    rest.setup(records={"cat": _records(1)}, image_ids=image_lookup)
    rest.train(resume=True)
    got = concept_rows(backend, "cat")
    assert torch.equal(want["embed"], got["embed"]) and torch.equal(want["head"], got["head"])


def test_selection_keeps_best_checkpoint(backend, image_lookup, tmp_path):
    recs = _records(2)
    cfg = _config(tmp_path, **{"optim.epochs": 3, "eval_every": 2, "save_every": 100})
    trainer = Trainer(cfg, backend=backend)
    trainer.setup(records={"cat": recs}, image_ids=image_lookup)
    assert len(trainer.eval_sets["cat"].positives) == 2 and len(trainer.eval_sets["cat"].negatives) == 2
    result = trainer.train()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [__import__("json").loads(x) for x in lines if "eval_score" in x]
    assert evals and result.best["score"] == max(e["eval_score"] for e in evals)
    best, state = load_checkpoint(tmp_path / "run", "best")
    assert state["step"] == result.best["step"]
    # The written concept file holds the best rows, not the last ones.
    from safetensors.torch import load_file

    saved = load_file(str(result.concept_files["cat"]))
    assert torch.equal(saved["embed"], best["cat/embed"])


def test_two_concepts_in_one_run_mix_batches_and_save_separately(backend, image_lookup, tmp_path):
    from yochameleon.infer import PersonalizedModel

    recs = _records(1)
    cfg = _config(tmp_path, **{"optim.epochs": 2, "optim.batch_size": 2, "concept.extra": [{"name": "dog"}]})
    trainer = Trainer(cfg, backend=backend)
    trainer.setup(records={"cat": recs, "dog": recs}, image_ids=image_lookup)
    cat, dog = trainer.concepts["cat"], trainer.concepts["dog"]
    assert not set(cat.ids) & set(dog.ids)
    from yochameleon.train.sequences import length_grouped_batches

    # The first epoch's batches exactly as the trainer draws them (one process: the global batches).
    batches = length_grouped_batches([len(s) for s in trainer.sequences], cfg.optim.batch_size, cfg.seed)
    assert {len(b) for b in batches} == {2}
    assert any(len({trainer.sequences[i].concept for i in b}) == 2 for b in batches)  # batches mix concepts
    result = trainer.train()
    assert set(result.concept_files) == {"cat", "dog"}
    pm = PersonalizedModel(backend)
    ids, used = pm._prompt_ids("Is <cat> next to <dog>?", None)
    assert [c.spec.name for c in used] == ["cat", "dog"]


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_follows_logging_progress(backend, image_lookup, tmp_path, capsys, progress):
    cfg = _config(tmp_path, **{"logging.progress": progress, "optim.epochs": 1, "save_every": 1000})
    trainer = Trainer(cfg, backend=backend)
    trainer.setup(records={"cat": _records(2)}, image_ids=image_lookup)
    trainer.train()
    assert ("train:" in capsys.readouterr().err) is progress


def test_description_init_starts_the_latent_tokens_from_the_description_words(
    backend, image_lookup, tmp_path
):
    """``concept.init=description``: each latent input row is a description word's embedding."""
    from yochameleon.errors import ConceptError, ConfigError

    with pytest.raises(ConfigError, match="concept.init"):
        _config(tmp_path, **{"concept.init": "words"})
    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / "concept.yaml").write_text("description: <sks> is a grey cat with a white tail.\n")
    cfg = _config(tmp_path, **{"concept.init": "description", "concept.concept_dir": str(folder)})
    trainer = Trainer(cfg, backend=backend)
    trainer.setup(records={"cat": _records(2)}, image_ids=image_lookup)
    tokens = trainer.concepts["cat"]
    rows = concept_rows(backend, "cat")
    embed, head = backend.base_weight("embed").float(), backend.base_weight("head").float()
    words = backend.tokenize(" a grey cat with a white tail")
    for k, token_id in enumerate(tokens.ids):
        expected = embed[token_id] if k == 0 else embed[words[(k - 1) % len(words)]]
        assert torch.equal(rows["embed"][k], expected), k
        assert torch.equal(rows["head"][k], head[token_id])
    # The default start is the base rows of the ids, as in the original method.
    assert not torch.equal(rows["embed"][1:], embed[tokens.ids[1:]])

    (folder / "concept.yaml").write_text("category: cat\n")  # no description: a clear error
    with pytest.raises(ConceptError, match="no description"):
        Trainer(cfg, backend=backend).setup(records={"cat": _records(2)}, image_ids=image_lookup)
    no_folder = _config(tmp_path, **{"concept.init": "description"})
    with pytest.raises(TrainingError, match="concept_dir"):
        Trainer(no_folder, backend=backend).setup(records={"cat": _records(2)}, image_ids=image_lookup)
