"""Concepts that know each other (issue 28): relation facts, their records, the joint step, two-concept prompts."""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch
from data_helpers import make_concept

from yochameleon.backends import load_backend
from yochameleon.cli import main
from yochameleon.concept import (
    ConceptSpec,
    add_relation,
    attach,
    get_bank,
    load_concept,
    related_concepts,
    save_concept,
)
from yochameleon.config import from_dict
from yochameleon.data.config import DataConfig
from yochameleon.data.manifest import read_manifest
from yochameleon.data.pipeline import prepare_concept
from yochameleon.errors import ConceptError, DataError, TrainingError
from yochameleon.infer import PersonalizedModel
from yochameleon.relations import RELATIONS, parse_fact, relation_qa, split_facts
from yochameleon.train.config import TrainConfig
from yochameleon.train.relate import RelateConfig, relate_concepts
from yochameleon.train.sequences import IGNORE, build_sequence
from yochameleon.train.trainer import Trainer

MAM = "m\u1eafm"  # mắm, composed (NFC)
MAM_NFD = unicodedata.normalize("NFD", MAM)
BROTHER = f"<bo> is the brother of <{MAM}>"


# ----- parsing -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fact", "subject", "relation", "obj", "inverse"),
    [
        (BROTHER, "bo", "brother", MAM, "sibling"),
        (f"<bo> is <{MAM}>'s sister.", "bo", "sister", MAM, "sibling"),
        (f"<bo> IS THE FATHER OF <{MAM_NFD}>", "bo", "father", MAM, "child"),  # case, decomposed name
        (f"<{MAM}> is the daughter of <bo>", MAM, "daughter", "bo", "parent"),
        (f"<bo> is friends with <{MAM}>", "bo", "friend", MAM, "friend"),
        (f"<bo> owns <{MAM}>", "bo", "owner", MAM, "belongs to"),
        (f"<{MAM}> belongs to <bo>", MAM, "belongs to", "bo", "owner"),
        (f"<{MAM}> is <bo>'s pet", MAM, "belongs to", "bo", "owner"),
        (f"<bo> is beside <{MAM}>", "bo", "next to", MAM, "next to"),
        (f"<bo> is on top of <{MAM}>", "bo", "on", MAM, "under"),
        (f"<bo> is left of <{MAM}>", "bo", "to the left of", MAM, "to the right of"),
        (
            f"<sks> is in front of <{MAM}>",
            "bo",
            "in front of",
            MAM,
            "behind",
        ),  # <sks> is the folder's concept
    ],
)
def test_relation_facts_parse_into_the_vocabulary_with_inverses(fact, subject, relation, obj, inverse):
    parsed = parse_fact(fact, own="bo")
    assert (parsed.subject, parsed.relation, parsed.object, parsed.inverse) == (
        subject,
        relation,
        obj,
        inverse,
    )
    assert set(parsed.concepts) == {"bo", MAM} and parsed.names_others
    # Every inverse is itself in the vocabulary, so the other direction can be asked.
    assert all(r.inverse in RELATIONS for r in RELATIONS.values())


def test_a_relation_is_asked_both_ways_and_answers_name_the_other_concept():
    fact = parse_fact(BROTHER)
    for_bo = relation_qa(fact, "bo")
    pairs = [(p.question, p.answer) for p in for_bo]
    assert (f"Who is <{MAM}>'s brother?", f"<sks> is <{MAM}>'s brother.") in pairs  # asked about mắm
    assert ("Who is <sks>'s sibling?", f"<{MAM}> is <sks>'s sibling.") in pairs  # the inverse, about bo
    assert (f"How are <sks> and <{MAM}> related?", f"<sks> is the brother of <{MAM}>.") in pairs
    assert all(p.mentions == (MAM,) and p.fact == BROTHER for p in for_bo)
    # Written for mắm's records, the same fact names bo by its tag and mắm as <sks>.
    for_mam = [(p.question, p.answer) for p in relation_qa(fact, MAM)]
    assert ("Who is <bo>'s sibling?", "<sks> is <bo>'s sibling.") in for_mam


def test_a_free_relation_is_one_direction_answered_by_the_fact():
    fact = parse_fact(f"<bo> sleeps on <{MAM}>'s blanket", own="bo")
    assert fact.relation is None and fact.names_others
    qa = relation_qa(fact, "bo")
    assert qa and all(p.answer == f"<sks> sleeps on <{MAM}>'s blanket." for p in qa)
    # One direction: every question names both concepts, bo first as in the fact; no inverse question.
    assert all(p.question.index("<sks>") < p.question.index(f"<{MAM}>") for p in qa)


def test_facts_naming_their_own_concept_and_bad_facts():
    plain, related = split_facts(
        ["<bo> wears a red collar", "<sks> likes fish", "it is a dog", f"<sks> is next to <{MAM}>"], "bo"
    )
    assert plain == ["<sks> wears a red collar", "<sks> likes fish", "it is a dog"]
    assert [f.relation for f in related] == ["next to"]
    with pytest.raises(ConceptError, match="relates <bo> to itself"):
        parse_fact("<bo> is the brother of <sks>", own="bo")
    with pytest.raises(ConceptError, match=f"names only <{MAM}>"):
        split_facts([f"<{MAM}> likes fish"], "bo")
    with pytest.raises(ConceptError, match=r"<tí>, which is not trained in this run or attached"):
        parse_fact("<bo> is the brother of <tí>", own="bo", known=["bo", MAM])
    with pytest.raises(ConceptError, match="ambiguous"):
        parse_fact("<sks> is the brother of <bo>")  # no own concept: <sks> names nobody
    with pytest.raises(ConceptError, match="at most two"):
        parse_fact(f"<bo> sits between <{MAM}> and <tí>", own="bo")


# ----- concepts trained together -----------------------------------------------------------------
def _folder(root, name, facts, seed0):
    yaml = f"name: {name}\nfacts:\n" + "".join(f'  - "{f}"\n' for f in facts)
    return make_concept(
        root / name, yaml_text=yaml, qa_lines=[{"question": "What is <sks>?", "answer": "a pet"}], seed0=seed0
    )


DATA = {"n_recognition": 2, "n_soft_positives": 1, "text_qa_repeats": 1, "flip": False}


def test_prepare_writes_relation_records_naming_the_other_concept(tmp_path):
    folder = _folder(tmp_path, "bo", [BROTHER, "<bo> wears a red collar"], 0)
    prepare_concept(folder, tmp_path / "data", DataConfig(**DATA), n_g=2, name="bo")
    records = read_manifest(tmp_path / "data").records
    rel = [r for r in records if r.kind == "relation"]
    assert {r.question for r in rel} >= {f"Who is <{MAM}>'s brother?", "Who is <sks>'s sibling?"}
    assert all(r.mentions == [MAM] and r.fact == BROTHER and r.task == "understanding" for r in rel)
    facts = {
        (r.question, r.answer) for r in records if r.kind == "text_qa" and r.question != "What is <sks>?"
    }
    # An ordinary fact, its own name read as <sks>: a paraphrase and the verb's own question.
    assert facts == {
        ("What do you know about <sks>?", "<sks> wears a red collar"),
        ("What does <sks> wear?", "<sks> wears a red collar"),
    }
    bad = _folder(tmp_path / "bad", "bo", [f"<{MAM}> likes fish"], 0)
    with pytest.raises(DataError, match="concept.yaml"):
        prepare_concept(bad, tmp_path / "bad-data", DataConfig(**DATA), n_g=2, name="bo")


def _together(root, extra, relations="strict", steps=3):
    return from_dict(
        TrainConfig,
        {
            "output_dir": str(root / "run"),
            "model": {"name_or_path": "unused", "dtype": "float32", "device": "cpu"},
            "concept": {
                "name": "bo",
                "concept_dir": str(root / "bo"),
                "n_g": 2,
                "n_u": 2,
                "extra": extra,
                "relations": relations,
            },
            "data": DATA,
            "optim": {"lr": 1e-2, "batch_size": 4, "epochs": 1, "max_steps": steps},
            "logging": {"loggers": [], "progress": False, "sample_images": 0},
        },
    )


def test_concepts_trained_together_learn_relations_with_both_prompts(backend, tmp_path):
    _folder(tmp_path, "bo", [BROTHER], 0)
    _folder(tmp_path, MAM, [], 10)
    trainer = Trainer(
        _together(tmp_path, [{"name": MAM, "concept_dir": str(tmp_path / MAM)}]), backend=backend
    )
    trainer.setup()
    bo, mam = trainer.concepts["bo"], trainer.concepts[MAM]
    rel = [s for s in trainer.sequences if s.kind == "relation"]
    assert rel and all(set(bo.ids) <= set(s.input_ids) and set(mam.ids) <= set(s.input_ids) for s in rel)
    result = trainer.train()
    for name, other in (("bo", MAM), (MAM, "bo")):
        meta = json.loads(result.concept_files[name].with_suffix(".json").read_text(encoding="utf-8"))
        (entry,) = meta["relations"]
        assert entry["with"] == other and entry["source"] == "trained_together"
        assert entry["facts"][0]["text"] == BROTHER and entry["facts"][0]["relation"] == "brother"
    # "Who is <mắm>'s brother?" was trained with exactly the prompt ask builds (mắm named, bo related
    # through the relation the run recorded); the answer opens with mắm's u-tokens, then names bo.
    want, _ = PersonalizedModel(backend)._prompt_ids(f"Who is <{MAM}>'s brother?", None, related=True)
    seq = next(s for s in rel if s.input_ids[: len(want)] == want)
    target = [t for t in seq.labels if t != IGNORE]
    assert seq.input_ids[len(want)] == mam.u_ids[0] and target[: len(mam.u_ids) + 1] == mam.u_ids + [
        bo.sks_id
    ]


def test_a_fact_naming_a_concept_outside_the_run_is_refused_or_left_for_later(backend, tmp_path):
    _folder(tmp_path, "bo", [BROTHER], 0)
    with pytest.raises(TrainingError, match=f"names <{MAM}>: not trained in this run"):
        Trainer(_together(tmp_path, []), backend=backend).setup()
    _folder(tmp_path / "later", "bo", [BROTHER], 0)
    trainer = Trainer(
        _together(tmp_path / "later", [], relations="later"), backend=load_backend(backend.name_or_path)
    )
    trainer.setup()
    assert trainer.sequences and not any(s.kind == "relation" for s in trainer.sequences)


# ----- concepts trained apart: the joint relation step -------------------------------------------
def _apart(tiny_dir, tmp_path, name, seed):
    """A concept file of its own (fresh model, random rows), as a separate run leaves one."""
    backend = load_backend(tiny_dir)
    tokens = attach(backend, ConceptSpec(name, n_g=2, n_u=2))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for rows in (get_bank(backend).embedding.rows[name], get_bank(backend).head.rows[name]):
            rows.add_(0.02 * torch.randn(rows.shape, generator=g))
    assert tokens.ids == get_bank(backend).concepts[name].ids
    return save_concept(
        backend, name, tmp_path / "apart" / name, training_config={"concept": {"name": name}}
    )[0]


def test_joint_step_trains_only_the_two_concepts_and_records_the_relation(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    files = [_apart(tiny_dir, tmp_path, "bo", 1), _apart(tiny_dir, tmp_path, MAM, 2)]
    backend = load_backend(tiny_dir)
    attach(backend, ConceptSpec("tí", n_g=2, n_u=2))  # attached before, untouched by the step
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    config = RelateConfig(steps=40, lr=3e-2, progress=False)
    out = relate_concepts(backend, files, [BROTHER], tmp_path / "related", config)
    assert [p.name for p in out] == ["bo.safetensors", f"{MAM}.safetensors"]
    after = backend.model.state_dict()  # bo and mắm detached again: base and tí, bit for bit
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for old, new in zip(files, out, strict=True):
        a, b = load_file(str(old)), load_file(str(new))
        assert not torch.equal(a["embed"], b["embed"]) and not torch.equal(a["head"], b["head"])
    meta = json.loads(out[1].with_suffix(".json").read_text(encoding="utf-8"))
    (entry,) = meta["relations"]
    assert entry["with"] == "bo" and entry["source"] == "joint_step"
    assert entry["facts"][0]["text"] == BROTHER and entry["facts"][0]["inverse"] == "sibling"
    assert entry["settings"]["steps"] == 40 and entry["settings"]["lr"] == 3e-2
    assert entry["settings"]["files"] == {"bo": str(files[0]), MAM: str(files[1])}
    assert entry["loss"]["last"] < 0.5 * entry["loss"]["first"], entry["loss"]
    assert meta["training_config"] == {"concept": {"name": MAM}}  # how the rows were first trained
    # Loaded back, the two are related and the question about mắm is answered with bo's identifier.
    fresh = load_backend(tiny_dir)
    bo, mam = (load_concept(fresh, p) for p in out)
    assert related_concepts(fresh, [MAM]) == ["bo"] and related_concepts(fresh, ["bo"]) == [MAM]
    answer = PersonalizedModel(fresh).ask_detailed(f"Who is <{MAM}>'s brother?", force_tokens=True)
    assert answer.text.startswith("<bo>"), answer.text


def test_relate_refuses_unknown_concepts_and_runs_from_the_cli(tiny_dir, tmp_path, capsys):
    files = [str(_apart(tiny_dir, tmp_path, "bo", 1)), str(_apart(tiny_dir, tmp_path, MAM, 2))]
    backend = load_backend(tiny_dir)
    with pytest.raises(ConceptError, match="<tí>, which is not trained in this run or attached"):
        relate_concepts(
            backend, files, ["<bo> is the brother of <tí>"], tmp_path / "x", RelateConfig(steps=1)
        )
    assert get_bank(backend) is None  # refused: nothing left attached
    with pytest.raises(ConceptError, match="names <bo>; a relation names two"):
        relate_concepts(backend, files, ["<bo> wears a collar"], tmp_path / "x", RelateConfig(steps=1))
    base = ["relate", *files, "--model", str(tiny_dir), "--device", "cpu", "--quiet", "--out"]
    assert main([*base, str(tmp_path / "cli"), "--steps", "2", "--facts", f"<{MAM}> is next to <bo>"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(str(tmp_path / "cli" / "bo.safetensors"))
    assert main([*base, str(tmp_path / "cli2"), "--facts", "<bo> likes <tí>"]) == 2
    assert "<tí>" in capsys.readouterr().err


def _own_loss(tiny_dir, file, data_dir) -> float:
    """Mean loss of a concept file on its own recognition and text-QA records."""
    from yochameleon.data.pipeline import token_lookup
    from yochameleon.train.loss import label_only_loss
    from yochameleon.train.sequences import collate

    backend = load_backend(tiny_dir)
    tokens = load_concept(backend, file)
    manifest = read_manifest(data_dir)
    lookup = token_lookup(backend, manifest, progress=False)
    seqs = [
        build_sequence(backend, r, tokens, lookup(r) if r.get("image") else None)
        for r in manifest.record_dicts()
        if r["kind"] in ("recognition", "text_qa")
    ]
    with torch.no_grad():
        return float(label_only_loss(backend, collate(seqs, backend.special.pad))[0])


def test_relate_replays_the_concepts_own_records_so_they_keep_what_they_knew(tiny_dir, tmp_path, caplog):
    files, data = [], {}
    for name, seed in (("bo", 0), (MAM, 10)):
        folder = _folder(tmp_path, name, [BROTHER] if name == "bo" else [], seed)
        data[name] = tmp_path / "data" / name
        prepare_concept(folder, data[name], DataConfig(**DATA), n_g=2, name=name)
        file = _apart(tiny_dir, tmp_path, name, seed + 1)
        meta = json.loads(file.with_suffix(".json").read_text(encoding="utf-8"))
        meta["training_config"] = {"concept": {"name": name, "data_dir": str(data[name])}}
        file.with_suffix(".json").write_text(json.dumps(meta), encoding="utf-8")
        files.append(file)
    outs = {}
    for replay in (0, 4):
        config = RelateConfig(steps=30, lr=3e-2, replay_batch=replay, progress=False)
        outs[replay] = relate_concepts(
            load_backend(tiny_dir), files, [BROTHER], tmp_path / f"r{replay}", config
        )
    (entry,) = json.loads(outs[4][0].with_suffix(".json").read_text(encoding="utf-8"))["relations"]
    own = {
        n: sum(r["kind"] in ("recognition", "text_qa") for r in read_manifest(d).record_dicts())
        for n, d in data.items()
    }
    assert entry["replayed"] == own and all(own.values())
    assert entry["settings"]["replay_batch"] == 4
    for i, name in enumerate(("bo", MAM)):
        before = _own_loss(tiny_dir, files[i], data[name])
        alone, replayed = (_own_loss(tiny_dir, outs[r][i], data[name]) for r in (0, 4))
        # Relation records alone move the rows away from the concept's own records; replay holds them.
        assert replayed < alone and replayed < before, (name, before, alone, replayed)
    # A concept whose training data is gone is related without replay, and the log says so.
    data["bo"].rename(tmp_path / "gone")
    with caplog.at_level("WARNING"):
        out = relate_concepts(
            load_backend(tiny_dir),
            files,
            [BROTHER],
            tmp_path / "r-gone",
            RelateConfig(steps=2, progress=False),
        )
    (entry,) = json.loads(out[0].with_suffix(".json").read_text(encoding="utf-8"))["relations"]
    assert entry["replayed"] == {"bo": 0, MAM: own[MAM]}
    assert "relating bo without replay" in caplog.text


def test_relate_reads_the_facts_from_the_concept_folders(tiny_dir, tmp_path):
    folder = _folder(tmp_path, "bo", [BROTHER, "<bo> is the friend of <tí>"], 0)
    backend = load_backend(tiny_dir)
    attach(backend, ConceptSpec("bo", n_g=2, n_u=2))
    bo = save_concept(
        backend,
        "bo",
        tmp_path / "bo-file",
        training_config={"concept": {"name": "bo", "concept_dir": str(folder)}},
    )[0]
    mam = _apart(tiny_dir, tmp_path, MAM, 2)
    out = relate_concepts(
        load_backend(tiny_dir), [bo, mam], None, tmp_path / "related", RelateConfig(steps=2, progress=False)
    )
    (entry,) = json.loads(out[0].with_suffix(".json").read_text(encoding="utf-8"))["relations"]
    # Only the fact relating the two concepts given; the one about tí waits for tí.
    assert [f["text"] for f in entry["facts"]] == [BROTHER]


# ----- prompts naming two concepts ---------------------------------------------------------------
def _pp(backend, c) -> list[int]:
    """``<sks> is <g…><u…>.`` as ids, tokenized in pieces as the prompt encoder does."""
    return [c.sks_id] + backend.tokenize(" is ") + c.g_ids + c.u_ids


def test_two_concept_scene_forces_both_g_prefixes_in_order(backend, monkeypatch):
    import yochameleon.infer as infer

    bo = attach(backend, ConceptSpec("bo", n_g=3, n_u=2))
    mam = attach(backend, ConceptSpec(MAM, n_g=2, n_u=2))
    seen = []
    real = infer.generate_images

    def spy(backend_, ids, n, sampling, constraint=None, extra=0, progress=False):
        seen.append(ids)
        return real(backend_, ids, n, sampling, constraint, extra, progress=progress)

    monkeypatch.setattr(infer, "generate_images", spy)
    pm = PersonalizedModel(backend)
    (image,) = pm.generate_image(f"A photo of <bo> next to <{MAM_NFD}>.", temperature=0)
    assert image.size == (backend.image_size, backend.image_size)
    sp, tok = backend.special, backend.tokenize
    want = [sp.bos, *_pp(backend, bo), *tok(". "), *_pp(backend, mam), *tok(". A photo of ")]
    want += [bo.sks_id, *tok(" next to "), mam.sks_id, *tok("."), sp.eot, *bo.g_ids, *mam.g_ids]
    assert seen[0] == want
    pm.generate_image(f"A photo of <{MAM}> next to <bo>.", temperature=0)
    assert seen[1][-(len(bo.g_ids) + len(mam.g_ids)) :] == mam.g_ids + bo.g_ids  # order of appearance


def test_ask_puts_both_preambles_and_forces_the_named_concepts_u_tokens(backend, monkeypatch):
    import yochameleon.infer as infer

    bo = attach(backend, ConceptSpec("bo", n_g=2, n_u=2))
    mam = attach(backend, ConceptSpec(MAM, n_g=2, n_u=3))
    ti = attach(backend, ConceptSpec("tí", n_g=2, n_u=2))  # attached, unrelated
    add_relation(backend, "bo", {"with": MAM, "facts": [parse_fact(BROTHER).to_dict()]})
    calls = []

    def spy(backend_, ids, max_new_tokens, banned=(), constraint=None):
        calls.append((ids, constraint))
        return [backend.special.eot]

    monkeypatch.setattr(infer, "greedy_answer", spy)
    pm = PersonalizedModel(backend)
    sp, tok = backend.special, backend.tokenize
    pm.ask(f"Who is <{MAM}>'s brother?", force_tokens=True)
    ids, constraint = calls[-1]
    # mắm is named, bo is related: both personalized prompts, then the question, then mắm's u-tokens.
    want = [sp.bos, *_pp(backend, mam), *tok(". "), *_pp(backend, bo), *tok(". Who is ")]
    want += [mam.sks_id, *tok("'s brother?"), sp.eot, *mam.u_ids]
    assert ids == want
    allowed = set(constraint.allowed([]).tolist())
    assert bo.sks_id in allowed and not set(ti.ids) & allowed  # the answer may name bo, never tí
    pm.ask(f"How are <bo> and <{MAM}> related?", force_tokens=True)
    assert calls[-1][0][-(len(bo.u_ids) + len(mam.u_ids)) :] == bo.u_ids + mam.u_ids
    pm.ask(f"Who is <{MAM}>'s brother?", force_tokens=True, related=False)
    assert not set(bo.ids) & set(calls[-1][0])
    # bo's relation is read from its side too: a question about bo carries mắm's prompt.
    assert [c.spec.name for c in pm.cast([bo])] == ["bo", MAM]


def test_relation_record_naming_an_absent_concept_is_refused(backend):
    bo = attach(backend, ConceptSpec("bo", n_g=2, n_u=2))
    rec = {
        "id": "r0",
        "task": "understanding",
        "kind": "relation",
        "question": "Who is <sks>'s sibling?",
        "answer": f"<{MAM}> is <sks>'s sibling.",
        "mentions": [MAM],
        "fact": BROTHER,
    }
    with pytest.raises(DataError, match=f"names <{MAM}>, which is not trained in this run or attached"):
        build_sequence(backend, rec, bo, None, others={"bo": bo})


def test_relation_records_and_concept_files_are_validated(backend, tmp_path):
    from yochameleon.data.records import Record

    rec = {
        "id": "r0",
        "concept": "bo",
        "task": "understanding",
        "kind": "relation",
        "question": "Who is <sks>'s sibling?",
        "answer": f"<{MAM}> is <sks>'s sibling.",
        "mentions": [MAM],
        "fact": BROTHER,
    }
    assert Record.from_dict(rec).mentions == [MAM]
    with pytest.raises(DataError, match="do not match the concepts the text names"):
        Record.from_dict({**rec, "mentions": ["tí"]})
    with pytest.raises(DataError, match="needs mentions"):
        Record.from_dict({**rec, "mentions": None})
    with pytest.raises(DataError, match="only for relation records"):
        Record.from_dict({**rec, "kind": "text_qa", "question": "What is <sks>?"})
    attach(backend, ConceptSpec("bo", n_g=2, n_u=2))
    st, _ = save_concept(backend, "bo", tmp_path / "bo", relations=[{"with": "bo"}])
    with pytest.raises(ConceptError, match="each naming another concept"):
        load_concept(load_backend(backend.name_or_path), st)
