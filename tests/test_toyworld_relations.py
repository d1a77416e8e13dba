"""The toy-world relations measurement (issue 28): pairs, facts, questions and their scoring, the text
baseline's preamble, the related layout, the summary and the CLI; ``--quick`` end to end (slow)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import yaml

from yochameleon.eval.toyworld import ToyWorld
from yochameleon.eval.toyworld.bench import BenchError
from yochameleon.eval.toyworld.cli import register, relations_config_from_args
from yochameleon.eval.toyworld.relations import (
    CASES,
    METRICS,
    PLAIN_NAMES,
    RELATION_CHOICES,
    TEAMS,
    Pair,
    Question,
    RelationsConfig,
    TextPromptPair,
    draw_pairs,
    first_named,
    markdown_relations,
    pair_questions,
    score_answer,
    summarize_relations,
    write_pair_folders,
)
from yochameleon.eval.toyworld.world import caption
from yochameleon.relations import split_facts


@pytest.fixture(scope="module")
def world():
    return ToyWorld(0)


@pytest.fixture(scope="module")
def units(world):
    return draw_pairs(3, 0, [0, 1], "heldout", world)


# ---- pairs and facts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["heldout", "dev"])
def test_pairs_come_only_from_the_requested_split(world, split):
    units = draw_pairs(4, 1, [0], split, world)
    drawn = [i for u in units for i in u.identities]
    assert len(set(drawn)) == len(drawn) == 12  # A, B and the distractor: three distinct per pair
    assert set(drawn) <= set(world.splits[split])
    assert not set(drawn) & set(world.splits["pretrain"])
    other = "dev" if split == "heldout" else "heldout"
    assert not set(drawn) & set(world.splits[other])
    with pytest.raises(BenchError, match="pretrain"):
        draw_pairs(1, 0, [0], "pretrain", world)


def test_a_seed_chooses_relation_and_teams_but_not_the_identities(units):
    assert [u.key for u in units[:2]] == ["pair0/seed0", "pair0/seed1"]
    assert units[0].identities == units[1].identities and units[0].identities != units[2].identities
    for u in units:
        assert u.relation in RELATION_CHOICES
        assert len(set(u.teams)) == 3 and set(u.teams) <= set(TEAMS)
        # The object's own colour never answers the team question.
        assert all(team != ident.colour for team, ident in zip(u.teams, u.identities))


def test_invisible_facts_are_in_the_facts_never_in_the_description(world, units, tmp_path):
    pair = units[0]
    folders = write_pair_folders(world, pair, tmp_path, n_photos=3)
    a, b, c = pair.names
    assert list(folders) == [a, b, c]
    for k, (name, folder) in enumerate(folders.items()):
        meta = yaml.safe_load((folder / "concept.yaml").read_text())
        assert meta["name"] == name and meta["description"] == caption(pair.identities[k])
        assert "team" not in meta["description"] and pair.relation not in meta["description"]
        assert pair.team_fact(k) in meta["facts"]
        assert len(list((folder / "photos").glob("*.png"))) == 3
        plain, related = split_facts(meta["facts"], name)
        # The team is an ordinary fact of its concept; the relation names B and lives in A's folder only.
        assert f"<sks> belongs to the {pair.teams[k]} team." in plain
        if name == a:
            assert [f.text for f in related] == [pair.relation_fact()]
            assert (related[0].subject, related[0].relation, related[0].object) == (a, pair.relation, b)
        else:
            assert related == []


# ---- questions and scoring ---------------------------------------------------------------------------
def test_relation_questions_have_the_right_concept_and_the_attached_distractor(units):
    from yochameleon.relations import RELATIONS

    for pair in units:
        a, b, c = (f"<{n}>" for n in pair.names)
        qs = pair_questions(pair)
        mc = [q for q in qs if q.kind == "relation_mc"]
        assert [q.correct for q in mc] == [a, a, b, b]  # B's <relation> is A; A's <inverse> is B
        assert mc[0].text.startswith(f"Who is {b}'s {pair.relation}?")
        assert mc[2].text.startswith(f"Who is {a}'s {RELATIONS[pair.relation].inverse}?")
        assert len(mc) == 4 and [q.options for q in mc[:2]] == [(a, c), (c, a)]  # both orders
        for q in mc:
            assert set(q.options) == {q.correct, c}  # the wrong option is the distractor
            assert q.text.endswith(f"{q.options[0]} or {q.options[1]}?")
        opened = [q for q in qs if q.kind == "relation_open"]
        assert [q.correct for q in opened] == [a, b] and all(set(q.options) == {a, b, c} for q in opened)
        assert "?" == opened[0].text[-1] and " or " not in opened[0].text
        teams = [q for q in qs if q.kind == "team_fact"]
        assert [q.correct for q in teams] == list(pair.teams[:2])
        assert all(set(q.options) == set(TEAMS) and q.text.startswith("Which team does <") for q in teams)


def test_team_recall_asks_the_question_the_fact_was_trained_with(world, units, tmp_path):
    from yochameleon.data.qa import facts_to_qa

    pair = units[0]
    folders = write_pair_folders(world, pair, tmp_path, n_photos=3)
    recall = [q for q in pair_questions(pair) if q.kind == "team_recall"]
    for k, q in enumerate(recall):
        name = pair.names[k]
        plain, _ = split_facts(yaml.safe_load((folders[name] / "concept.yaml").read_text())["facts"], name)
        fact = f"<sks> belongs to the {pair.teams[k]} team."
        trained = [question for question, answer in facts_to_qa(plain) if answer == fact]
        # The fact's own question: the one trained question whose only answer is the team fact.
        own = [
            question
            for question in trained
            if [a for qq, a in facts_to_qa(plain) if qq == question] == [fact]
        ]
        assert own and q.text == own[0].replace("<sks>", f"<{name}>") == f"What does <{name}> belong to?"
        assert q.correct == pair.teams[k] and set(q.options) == set(TEAMS)


def test_team_option_order_is_seeded(world):
    units = draw_pairs(10, 0, [0, 1], "heldout", world)
    team = [next(q for q in pair_questions(u) if q.kind == "team_fact") for u in units]
    assert len({q.options.index(q.correct) for q in team}) > 1  # the right team is not always first
    assert pair_questions(units[0]) == pair_questions(units[0])


def test_scoring_multiple_choice_open_and_plain_names():
    mc = Question("relation_mc", "Who is <bo>'s brother? <mam> or <ti>?", ("<mam>", "<ti>"), "<mam>")
    assert score_answer(mc, "<mam> is <bo>'s brother.")
    assert not score_answer(mc, "<ti> is <bo>'s brother.")
    assert not score_answer(mc, "<mam> or <ti>")  # naming both options is ambiguous
    assert not score_answer(mc, "<bo> is a circle.")
    opened = Question("relation_open", "Who is <bo>'s brother?", ("<mam>", "<bo>", "<ti>"), "<mam>")
    assert score_answer(opened, "<mam> is <bo>'s brother.")
    assert not score_answer(opened, "<bo> is <mam>'s brother.")  # the first concept named decides
    assert not score_answer(opened, "I do not know.")
    # The text baseline writes concepts by plain names, and is scored on them.
    names = {"mam": "sks", "bo": "qvo", "ti": "zub"}
    assert score_answer(mc, "sks is qvo's brother.", names)
    assert not score_answer(mc, "zub.", names)
    assert score_answer(opened, "Sks is qvo's brother.", names)
    team = Question("team_fact", "Which team …? blue, red, green or yellow?", TEAMS, "red")
    assert score_answer(team, "<bo> belongs to the red team.") and not score_answer(team, "blue or red")
    assert first_named("asks sks", ["sks", "qvo"]) == "sks"  # whole words only: "asks" is not "sks"


def test_text_baseline_defines_the_attached_concepts_and_states_their_facts(units):
    pair = units[0]
    a, b, c = pair.names
    both = TextPromptPair(None, pair, [a, b])
    pa, pb, pc = PLAIN_NAMES
    # The benchmark's definition wording (prompting.definition), under each concept's plain name.
    assert both.preamble.startswith(f"{pa} is {caption(pair.a)}. {pb} is {caption(pair.b)}.")
    assert f"{pa} is the {pair.relation} of {pb}." in both.preamble
    assert f"{pa} belongs to the {pair.teams[0]} team." in both.preamble
    assert pc not in both.preamble and "<" not in both.preamble
    alone = TextPromptPair(None, pair, [b])
    assert alone.preamble == f"{pb} is {caption(pair.b)}. {pb} belongs to the {pair.teams[1]} team."
    three = TextPromptPair(None, pair, [a, b, c])
    assert f"{pc} is {caption(pair.distractor)}." in three.preamble
    assert f"{pc} belongs to the {pair.teams[2]} team." in three.preamble


def test_the_related_layout_is_what_ask_lays_out(backend, photos, tmp_path):
    """yes_no_related = the related question's preamble (both prompts) + the u-tokens; unrelated = alone."""
    from yochameleon.concept import ConceptSpec, add_relation, attach, get_bank, save_concept
    from yochameleon.conversation import yes_no_logprobs
    from yochameleon.eval.toyworld.relations import _Trained
    from yochameleon.relations import parse_fact

    attach(backend, ConceptSpec("bo", n_g=2, n_u=2))
    attach(backend, ConceptSpec("mam", n_g=2, n_u=2))
    files = [save_concept(backend, n, tmp_path / "plain" / n)[0] for n in ("bo", "mam")]
    add_relation(
        backend, "bo", {"with": "mam", "facts": [parse_fact("<bo> is the brother of <mam>").to_dict()]}
    )
    related = [save_concept(backend, n, tmp_path / "related" / n)[0] for n in ("bo", "mam")]
    for name in ("bo", "mam"):
        from yochameleon.concept import detach

        detach(backend, name)
    question, image = "<image>Is <bo> in this photo?", photos[0]
    with _Trained(backend, files) as t:
        assert t.yes_no_related(question, image, "bo") == t.yes_no(question, image)
    with _Trained(backend, related) as t:
        ids, used = t.model._prompt_ids(question, image, related=True)
        want = yes_no_logprobs(backend, ids + used[0].u_ids)
        assert t.yes_no_related(question, image, "bo") == want != t.yes_no(question, image)
    assert get_bank(backend) is None or not get_bank(backend).concepts  # detached after the block


class _FakeAsker:
    """Answers by rule and logs what was attached: A is recognised only alone, every answer names A."""

    names = None

    def __init__(self, attached, log):
        self.attached = list(attached)
        log.append(self.attached)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def yes_no(self, question, image):
        return (1.0, 0.0) if image == "pos" and len(self.attached) == 1 else (0.0, 1.0)

    def yes_no_related(self, question, image, name):
        return (1.0, 0.0)  # always "yes": positives right, negatives wrong

    def answer(self, question):
        return f"<{self.attached[0]}> belongs to the blue team."

    def generate_images(self, prompt, n, seed):
        assert prompt.startswith("A photo of <") and " next to <" in prompt
        return ["a", "b", "x"][:n]


def test_measure_unit_attaches_alone_both_then_three_and_scores_each_metric(units):
    from types import SimpleNamespace

    from yochameleon.eval.toyworld.relations import measure_unit

    pair = units[0]
    a, b, c = pair.names
    tests = {
        n: SimpleNamespace(positives=["pos"] * 2, hard_negatives=["twin"] * 2, easy_negatives=["x"] * 2)
        for n in (a, b)
    }
    log = []
    # The scorer reads image "a" as A and "b" as B (one object per image).
    scorer = SimpleNamespace(
        identity_correct=lambda images, ident: [im == {pair.a: "a", pair.b: "b"}[ident] for im in images]
    )
    m = measure_unit(lambda names: _FakeAsker(names, log), pair, tests, scorer, n_generated=3)
    assert log == [[a], [b], [a, b], [a, b, c]]
    assert m["recognition_alone"] == 1.0 and m["recognition_both"] == 0.5 and m["recognition_drop"] == 0.5
    assert m["recognition_related"] == 0.5 and m["recognition_drop_related"] == 0.5
    # Every answer names A first: the relation questions whose answer is A are right, those about B not.
    assert m["relation_mc"] == 0.5 and m["relation_open"] == 0.5
    blue = [t == "blue" for t in pair.teams[:2]].count(True) / 2
    assert m["team_fact"] == m["team_recall"] == blue
    assert (m["gen_a"], m["gen_b"], m["gen_either"]) == pytest.approx((1 / 3, 1 / 3, 2 / 3))
    assert len(m["answers"]) == 10 and m["generation_prompt"] == f"A photo of <{a}> next to <{b}>."


def test_train_runs_concepts_together_or_alone_and_detaches_them(backend, tmp_path):
    from data_helpers import make_concept

    from yochameleon.concept import get_bank
    from yochameleon.config import from_dict
    from yochameleon.eval.toyworld.relations import _train
    from yochameleon.train.config import TrainConfig

    fact = "<bo> is the brother of <mam>."
    for name, facts, seed0 in (("bo", [fact], 0), ("mam", [], 10)):
        yaml_text = f"name: {name}\nfacts:\n" + "".join(f'  - "{f}"\n' for f in facts)
        make_concept(
            tmp_path / name,
            yaml_text=yaml_text,
            qa_lines=[{"question": "What is <sks>?", "answer": "a pet"}],
            seed0=seed0,
        )
    cfg = from_dict(
        TrainConfig,
        {
            "model": {"name_or_path": "unused", "dtype": "float32", "device": "cpu"},
            "concept": {"n_g": 2, "n_u": 2},
            "data": {"n_recognition": 2, "n_soft_positives": 1, "text_qa_repeats": 1, "flip": False},
            "optim": {"lr": 1e-2, "batch_size": 4, "epochs": 1, "max_steps": 2},
            "logging": {"loggers": [], "sample_images": 0},
        },
    )
    entries = {
        n: {"name": n, "concept_dir": str(tmp_path / n), "data_dir": str(tmp_path / "data" / n)}
        for n in ("bo", "mam")
    }
    joint = _train(backend, cfg, [entries["bo"], entries["mam"]], tmp_path / "joint", "strict", False)
    assert set(joint) == {"bo", "mam"} and not (get_bank(backend) and get_bank(backend).concepts)
    meta = json.loads(joint["mam"].with_suffix(".json").read_text())
    assert meta["relations"][0]["with"] == "bo" and meta["relations"][0]["source"] == "trained_together"
    alone = _train(backend, cfg, [entries["bo"]], tmp_path / "alone", "later", False)
    assert json.loads(alone["bo"].with_suffix(".json").read_text())["relations"] == []
    assert not (get_bank(backend) and get_bank(backend).concepts)


# ---- summary, table, config, CLI ---------------------------------------------------------------------
def _record(case, pair, seed, value):
    return {"case": case, "pair": pair, "seed": seed, **{m: value for m in METRICS}}


def test_summary_has_cis_with_two_units_and_paired_differences_against_joint():
    records = [_record(case, p, 0, v) for p in (0, 1) for case, v in zip(CASES, (0.9, 0.5 + 0.1 * p, 0.2))]
    summary = summarize_relations(records, {"split": "dev", "n_units": 2}, n_boot=200)
    assert list(summary["cases"]) == list(CASES) and summary["reference"] == "joint"
    assert summary["cases"]["apart"]["relation_mc"] == pytest.approx(0.55)
    assert summary["cases"]["apart"]["relation_mc_ci"] == pytest.approx([0.5, 0.6])
    d = summary["differences"]["text_prompt"]["team_fact"]
    assert d["mean"] == pytest.approx(0.7) and d["n"] == 2 and not d["crosses_zero"]
    one = summarize_relations(records[:3], n_boot=200)
    assert one["cases"]["joint"]["relation_mc_ci"] is None and one["differences"]["apart"] == {}
    with pytest.raises(BenchError, match="two results"):
        summarize_relations(records + records[:1])
    table = markdown_relations(summary)
    assert "| joint | 0.900 ± 0.000 |" in table and "| apart | 0.550 ± 0.050 |" in table
    assert "Paired differences joint − case" in table and "one object per image" in table
    json.dumps(summary, allow_nan=False)


def test_config_quick_sizes_and_refusals():
    quick = RelationsConfig.create(quick=True)
    assert (quick.n_pairs, quick.seeds, quick.pool_size, quick.overrides) == (1, 1, 1000, ("optim.epochs=1",))
    assert quick.train_config(0).optim.epochs == 1
    default = RelationsConfig()
    assert (default.split, default.relate_steps) == ("heldout", 300)
    assert default.train_config(3).seed == 3 and default.train_config(3).optim.lr == 1e-3
    with pytest.raises(BenchError, match="at most 10 pairs"):
        RelationsConfig(n_pairs=11)
    with pytest.raises(BenchError, match="at most 5 pairs"):
        RelationsConfig(split="dev", n_pairs=6)
    with pytest.raises(BenchError, match="relations must name"):
        RelationsConfig(relations=("cousin",))
    with pytest.raises(BenchError, match="unknown relations settings"):
        RelationsConfig.create(pairs=2)


def test_cli_parses_relations_options():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["toyworld", "relations", "--json", "o.json", "--split", "dev", "--pairs", "2", "--seeds", "1"]
        + ["--threads", "1", "--quick", "--override", "optim.lr=2e-3"]
    )
    config = relations_config_from_args(args)
    assert (config.split, config.n_pairs, config.seeds, config.quick) == ("dev", 2, 1, True)
    assert config.overrides == ("optim.epochs=1", "optim.lr=2e-3")


def test_pair_is_json_ready(units):
    d = units[0].to_dict()
    assert set(d["concepts"]) == {"a", "b", "distractor"} and d["relation_fact"].startswith("<toy-")
    assert isinstance(units[0], Pair) and json.dumps(d)


# ---- --quick end to end on the committed base (slow) -------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_relations_end_to_end(tmp_path, capsys):
    from PIL import Image

    from yochameleon.cli import main

    torch.set_num_threads(1)
    out = tmp_path / "rel" / "quick.json"
    assert main(["toyworld", "relations", "--quick", "--json", str(out), "--quiet"]) == 0
    assert "| joint |" in capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert list(summary["cases"]) == list(CASES) and summary["config"]["n_units"] == 1
    for case, stats in summary["cases"].items():
        for metric in ("relation_mc", "relation_open", "team_fact", "recognition_alone", "gen_either"):
            assert 0.0 <= stats[metric] <= 1.0, (case, metric)
        # Trained concepts attached together give each one exactly its alone logits.
        if case != "text_prompt":
            assert stats["recognition_drop"] == 0.0
    assert summary["cases"]["apart"]["recognition_before_relate"] is not None
    units = summary["per_unit"]
    assert len(units) == 3 and all(len(u["answers"]) == 10 for u in units)
    assert all(u["answers"][0]["question"].startswith("Who is ") for u in units)
    assert out.with_suffix(".md").read_text().startswith("Relations in the toy world (heldout split")
    sheet = Image.open(out.with_name("quick_contact.png"))
    assert sheet.size[1] > sheet.size[0] / 4  # three rows: one per case
