"""Text QA from a pluggable answerer: consistent answers kept, disagreements dropped."""

from __future__ import annotations

import pytest
from data_helpers import skimage_photo

from yochameleon.data.qa import (
    Answerer,
    PromptedAnswerer,
    fact_question,
    facts_to_qa,
    generate_text_qa,
    normalize_answer,
)
from yochameleon.errors import DataError
from yochameleon.prompts import ATTRIBUTE_QUESTIONS, FACT_QUESTIONS, IMAGE


class ScriptedAnswerer:
    """Answers from a table keyed by (question, photo number); records what it was asked."""

    def __init__(self, table):
        self.table = table
        self.asked = []
        self._sizes = {}

    def answer(self, question, image):
        self.asked.append(question)
        n = self._sizes.setdefault(image.size, len(self._sizes))
        return self.table[question][n]


@pytest.fixture
def photos():
    return [skimage_photo(n).resize((64 + i, 64)) for i, n in enumerate(("astronaut", "chelsea", "coffee"))]


def test_majority_kept_disagreement_dropped(photos):
    s = "the main subject"
    answerer = ScriptedAnswerer(
        {
            f"What colour is {s}?": ["Orange.", "orange", "The orange!"],
            f"What shape is {s}?": ["Round.", "Square.", "Long."],
            f"Is {s} big?": ["The main subject is small.", "small", "Big."],
            f"Does {s} wear a hat?": ["", "  ", ""],
        }
    )
    questions = ["What colour is <sks>?", "What shape is <sks>?", "Is <sks> big?", "Does <sks> wear a hat?"]
    assert isinstance(answerer, Answerer)
    result = generate_text_qa(photos, questions, answerer, min_agreement=0.6, progress=False)
    assert result.pairs == [("What colour is <sks>?", "Orange."), ("Is <sks> big?", "<sks> is small.")]
    assert result.dropped == ["What shape is <sks>?", "Does <sks> wear a hat?"]
    assert (
        result.agreement["What colour is <sks>?"] == 1.0 and result.agreement["What shape is <sks>?"] == 1 / 3
    )
    assert all("<sks>" not in q for q in answerer.asked) and len(answerer.asked) == 12
    # A stricter threshold drops the 2-of-3 question too.
    strict = generate_text_qa(photos, questions[:3], answerer, min_agreement=1.0, progress=False)
    assert [q for q, _ in strict.pairs] == ["What colour is <sks>?"]


def test_paths_and_default_questions(tmp_path, photos):
    paths = []
    for i, im in enumerate(photos):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])

    class Constant:
        def answer(self, question, image):
            assert image.mode == "RGB"
            return "Fine."

    result = generate_text_qa(paths, ATTRIBUTE_QUESTIONS, Constant(), progress=False)
    assert [q for q, _ in result.pairs] == ATTRIBUTE_QUESTIONS and not result.dropped


def test_bad_arguments(photos):
    class Bad:
        def answer(self, question, image):
            return None

    with pytest.raises(DataError, match="min_agreement"):
        generate_text_qa(photos, ["Is <sks> red?"], Bad(), min_agreement=0)
    with pytest.raises(DataError, match="at least one photo"):
        generate_text_qa([], ["Is <sks> red?"], Bad())
    with pytest.raises(DataError, match="at least one question"):
        generate_text_qa(photos, [], Bad())
    with pytest.raises(DataError, match="does not name the concept"):
        generate_text_qa(photos, ["Is it red?"], Bad())
    with pytest.raises(DataError, match="returned NoneType, not text"):
        generate_text_qa(photos, ["Is <sks> red?"], Bad(), progress=False)


def test_prompted_answerer_and_helpers(photos):
    seen = []
    answerer = PromptedAnswerer(lambda text, image: seen.append((text, image)) or "Blue.", subject="the mug")
    assert answerer.answer("What colour is the mug?", photos[0]) == "Blue."
    assert (
        seen[0][0].startswith(IMAGE)
        and seen[0][0].endswith("What colour is the mug?")
        and seen[0][1] is photos[0]
    )
    answerer.answer("Hi?", None)
    assert IMAGE not in seen[1][0]
    assert (
        normalize_answer("  The Orange dog!! ") == "orange dog" == normalize_answer("It is an orange  dog.")
    )
    assert facts_to_qa(["likes walks", " has a red collar "]) == [
        (FACT_QUESTIONS[0], "likes walks"),
        (FACT_QUESTIONS[1], "has a red collar"),
    ]
    with pytest.raises(DataError, match="fact 0"):
        facts_to_qa([""])


def test_a_fact_with_a_known_verb_is_also_asked_with_its_own_question():
    facts = ["<sks> is large.", "<sks> belongs to the blue team.", "<sks>  Likes long walks", "a cat"]
    pairs = facts_to_qa([*facts, "<sks> has a red collar."])
    assert pairs == [
        (FACT_QUESTIONS[0], "<sks> is large."),
        (FACT_QUESTIONS[1], "<sks> belongs to the blue team."),
        ("What does <sks> belong to?", "<sks> belongs to the blue team."),
        (FACT_QUESTIONS[2], "<sks>  Likes long walks"),
        ("What does <sks> like?", "<sks>  Likes long walks"),
        (FACT_QUESTIONS[3], "a cat"),
        # A fifth fact shares the first paraphrase with the first: its own question is its alone.
        (FACT_QUESTIONS[0], "<sks> has a red collar."),
        ("What does <sks> have?", "<sks> has a red collar."),
    ]
    assert (
        fact_question("<sks> hasty") is None
        and fact_question("<sks> is from Hanoi") == "Where is <sks> from?"
    )
