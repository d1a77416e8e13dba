"""Template strings and their renderers."""

from __future__ import annotations

import pytest

from yochameleon import prompts as P
from yochameleon.errors import ConfigError


@pytest.mark.parametrize("pool", ["RECOGNITION_QUESTIONS", "POSITIVE_ANSWERS", "NEGATIVE_ANSWERS"])
def test_at_least_twenty_distinct_paraphrases_naming_the_concept(pool):
    items = getattr(P, pool)
    assert len(items) >= 20 and len(set(items)) == len(items)
    assert all(P.SKS in s and P.IMAGE not in s for s in items)


def test_answers_start_with_yes_or_no():
    assert all(a.startswith("Yes, ") for a in P.POSITIVE_ANSWERS)
    assert all(a.startswith("No, ") for a in P.NEGATIVE_ANSWERS)
    assert all(P.recognition_answer(i, True).startswith("Yes,") for i in range(50))
    assert all(P.recognition_answer(i, False).startswith("No,") for i in range(50))
    assert P.recognition_question(len(P.RECOGNITION_QUESTIONS)) == P.RECOGNITION_QUESTIONS[0]


def test_renderers_with_real_token_strings():
    g, u = ["<g1>", "<g2>", "<g3>"], ["<u1>", "<u2>"]
    assert P.personalized_prompt("<bo>", g, u) == "<bo> is <g1><g2><g3><u1><u2>."
    assert P.soft_positive_prompt("<bo>", g[:2]) == "<bo> is <g1><g2>. A photo of <bo>."
    assert P.soft_positive_prompt("<bo>", g[:2], form="code") == "A photo of <g1><g2>."
    assert P.real_generation_request("<bo>") == "A photo of <bo>."
    assert P.substitute_identifier("Is <sks> here? Yes, <sks> is.", "<r1>") == "Is <r1> here? Yes, <r1> is."
    with pytest.raises(ConfigError, match="paper"):
        P.soft_positive_prompt("<bo>", g, form="poster")


def test_other_templates():
    assert P.with_image("Is <sks> here?") == "<image>Is <sks> here?"
    assert P.with_image("Is <sks> here?<image>") == "Is <sks> here?<image>"
    for person in (False, True):
        qs = P.attribute_questions(person)
        assert len(qs) >= 10 and all(P.SKS in q for q in qs)
    assert P.attribute_questions(True) != P.attribute_questions(False)
    text = P.answerer_prompt("What colour is <sks>?", "the dog")
    assert P.SKS not in text and text.startswith(P.IMAGE) and text.endswith("What colour is the dog?")
    assert all(P.SKS in q for q in P.FACT_QUESTIONS + P.GENERATION_REQUESTS)
    assert P.GENERATION_REQUEST in P.GENERATION_REQUESTS and P.CAPTION_REQUEST in P.CAPTION_REQUESTS
