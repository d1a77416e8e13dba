"""Concepts trained in separate runs attach together: free ids, per-concept mapping, true clashes only."""

from __future__ import annotations

import json

import pytest
import torch

from yochameleon.backends import load_backend
from yochameleon.cli import main
from yochameleon.concept import ConceptSpec, attach, detach, get_bank, load_concept
from yochameleon.config import from_dict
from yochameleon.errors import ConceptError, TokenBudgetError
from yochameleon.infer import PersonalizedModel
from yochameleon.train.config import TrainConfig
from yochameleon.train.trainer import Trainer

MAM = "m\u1eafm"  # mắm, composed (NFC)


def _records(answer: str) -> list[dict]:
    return [
        {
            "id": f"qa{i}",
            "task": "understanding",
            "kind": "text_qa",
            "question": question,
            "answer": answer,
            "image": None,
            "flip": False,
        }
        for i, question in enumerate(["What is <sks>?", "Who is <sks>?"])
    ]


def _train(tiny_dir, tmp_path, name: str, answer: str):
    """One run of its own: a fresh model, one concept, its concept file."""
    backend = load_backend(tiny_dir)
    cfg = from_dict(
        TrainConfig,
        {
            "output_dir": str(tmp_path / f"run-{name}"),
            "model": {"name_or_path": str(tiny_dir), "dtype": "float32", "device": "cpu"},
            "concept": {"name": name, "n_g": 2, "n_u": 2},
            "optim": {"lr": 3e-2, "batch_size": 2, "epochs": 1, "max_steps": 4},
            "logging": {"loggers": [], "progress": False, "sample_images": 0},
        },
    )
    trainer = Trainer(cfg, backend=backend)
    trainer.setup(records={name: _records(answer)}, image_ids=lambda rec: None)
    return trainer.train().concept_files[name]


@pytest.fixture(scope="module")
def files(tiny_dir, tmp_path_factory):
    """``bo`` and ``mắm``, each trained in a separate run (so both sit on the same ids)."""
    tmp = tmp_path_factory.mktemp("separate")
    return {"bo": _train(tiny_dir, tmp, "bo", "a brown dog"), MAM: _train(tiny_dir, tmp, MAM, "a cat")}


def _ids(path) -> list[int]:
    return json.loads(path.with_suffix(".json").read_text())["token_ids"]


def _own_logits(pm: PersonalizedModel, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a prompt about ``name``: over the plain vocabulary, and over the concept's own ids in order."""
    ids, _ = pm._prompt_ids(f"What is <{name}>?", None)
    tokens = pm.concepts[name]
    ids = ids + tokens.u_ids
    hidden, _ = pm.backend.hidden_states(torch.tensor([ids]))
    logits = pm.backend.logits(hidden)[0]
    plain = torch.ones(pm.backend.vocab_size, dtype=torch.bool)
    plain[pm.backend.free_token_ids()] = False
    return logits[:, plain], logits[:, tokens.ids]


def test_two_concepts_from_separate_runs_attach_and_match_alone(tiny_dir, files):
    assert _ids(files["bo"]) == _ids(files[MAM])  # both runs took the same lowest free ids
    alone = {}
    for name, path in files.items():
        backend = load_backend(tiny_dir)
        load_concept(backend, path)
        alone[name] = _own_logits(PersonalizedModel(backend), name)
    backend = load_backend(tiny_dir)
    bo = load_concept(backend, files["bo"])
    mam = load_concept(backend, files[MAM])
    assert bo.ids == _ids(files["bo"])  # the first keeps its ids, the second moves to free ones
    assert not set(bo.ids) & set(mam.ids) and set(mam.ids) <= set(backend.free_token_ids())
    assert mam.strings == [backend.id_to_token(i) for i in mam.ids]
    pm = PersonalizedModel(backend)
    for name in files:
        got = _own_logits(pm, name)
        assert torch.equal(got[0], alone[name][0]) and torch.equal(got[1], alone[name][1]), name
    # Each answers as it does alone; a prompt naming both carries both personalized prompts.
    ids, used = pm._prompt_ids(f"Is <bo> next to <{MAM}>?", None)
    assert [c.spec.name for c in used] == ["bo", MAM] and set(bo.ids + mam.ids) <= set(ids)


def test_ask_about_both_through_the_cli(tiny_dir, files, capsys):
    argv = ["ask", "--model", str(tiny_dir), "--device", "cpu", "--strict"]
    argv += ["--concept", str(files["bo"]), "--concept", str(files[MAM]), f"Is <bo> next to <{MAM}>?"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    # A random-init model may answer with nothing, but it answers: one printed line, no error.
    assert out.out.endswith("\n") and "error" not in out.err


def test_only_true_clashes_are_refused(tiny_dir, files):
    backend = load_backend(tiny_dir)
    load_concept(backend, files["bo"])
    with pytest.raises(ConceptError, match="a concept named 'bo' is already attached"):
        load_concept(backend, files["bo"])
    free = len(backend.free_token_ids()) - len(_ids(files["bo"]))
    attach(backend, ConceptSpec("filler", n_g=free - 4, n_u=0))  # leaves 3 free ids
    with pytest.raises(TokenBudgetError, match=r"needs 5 token ids but only 3 free reserved ids are left"):
        load_concept(backend, files[MAM])
    assert sorted(get_bank(backend).concepts) == ["bo", "filler"]  # the refused one attached nothing
    detach(backend, "filler")
    assert load_concept(backend, files[MAM]).spec.name == MAM
