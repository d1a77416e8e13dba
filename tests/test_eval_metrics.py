"""Evaluation metrics on small hand-built cases; every expected value is worked out in the comments."""

from __future__ import annotations

import logging
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from yochameleon.errors import YoChameleonError
from yochameleon.eval.metrics import (
    MetricError,
    bootstrap_ci,
    choice_matches,
    clip_i,
    clip_i_with,
    clip_t,
    clip_t_with,
    face_similarity,
    logits_identical_except,
    mc_prompt,
    mcqa_accuracy,
    paired_bootstrap_diff,
    parse_yes_no,
    recognition_scores,
    score_choice,
    shuffle_options,
    yes_no_from_logprobs,
)

# ------------------------------------------------------------------------------------------- recognition


def test_recognition_weighted_gives_each_negative_kind_equal_weight():
    labels = ["pos"] * 4 + ["neg_hard"] * 2 + ["neg_easy"] * 4
    preds = [True, True, False, None, True, False, False, False, False, True]
    s = recognition_scores(preds, labels)
    # pos 2/4 (None is wrong); hard 1/2; easy 3/4.
    assert s["recognition_pos"] == 0.5
    assert s["recognition_neg_hard"] == 0.5
    assert s["recognition_neg_easy"] == 0.75
    # 0.5 * 0.5 + 0.5 * (0.5 + 0.75) / 2 = 0.5625 (pooling the 6 negatives would give 0.5833).
    assert s["recognition_weighted"] == pytest.approx(0.5625)
    assert s["recognition_unparsed"] == 1


def test_recognition_with_one_negative_kind_is_the_spec_pos_plus_neg_over_two():
    s = recognition_scores(
        [True, False, False, False, True], ["pos", "pos", "neg_easy", "neg_easy", "neg_easy"]
    )
    # pos 1/2, neg 2/3: (1/2 + 2/3) / 2.
    assert s["recognition_weighted"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert s["recognition_neg_hard"] is None


@pytest.mark.parametrize("constant", [True, False])
def test_a_constant_answer_scores_one_half(constant):
    labels = ["pos"] * 3 + ["neg_hard"] * 5 + ["neg_easy"] * 11
    assert recognition_scores([constant] * len(labels), labels)["recognition_weighted"] == 0.5


def test_recognition_weighted_is_none_without_positives_or_negatives():
    assert recognition_scores([True, True], ["pos", "pos"])["recognition_weighted"] is None
    only_neg = recognition_scores([False], ["neg_hard"])
    assert only_neg["recognition_weighted"] is None and only_neg["recognition_neg_hard"] == 1.0
    assert only_neg["recognition_pos"] is None


@pytest.mark.parametrize(
    "preds, labels, match",
    [
        ([True], ["pos", "pos"], "differ in length"),
        ([], [], "at least one"),
        ([True], ["maybe"], "unknown labels"),
        (["yes"], ["pos"], "True, False or None"),
    ],
)
def test_recognition_rejects_bad_input(preds, labels, match):
    with pytest.raises(MetricError, match=match):
        recognition_scores(preds, labels)


@pytest.mark.parametrize(
    "text, want",
    [
        ("Yes, it is.", True),
        ("YES", True),
        ("no.", False),
        ("NO!", False),
        ("<reserved16200><reserved16201> Yes", True),
        ("<u1> <u2>No, it is not", False),
        ("No, yes is wrong", False),  # the first yes/no word wins
        ("Nope, yes", True),  # "Nope" is not the word "no"
        ("I think not", None),
        ("yesterday", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_yes_no(text, want):
    assert parse_yes_no(text) is want


def test_parse_yes_no_skips_the_given_prefix_tokens():
    # A self-prompted token whose text contains a yes/no word must not be read as the answer.
    assert parse_yes_no("<yes-token> No") is False  # default: leading <...> markup stripped
    assert parse_yes_no("<yes-token> No", skip_prefix_tokens=()) is True  # nothing stripped
    assert parse_yes_no("[yes][yes] no", skip_prefix_tokens=["[yes]"]) is False
    assert parse_yes_no("[yes][yes] no") is True  # the default only strips <...> tokens
    assert parse_yes_no("[yes] ", skip_prefix_tokens=["[yes]"]) is None


def test_yes_no_from_logprobs():
    assert yes_no_from_logprobs(-0.1, -2.0) is True
    assert yes_no_from_logprobs(-2.0, -0.1) is False
    assert yes_no_from_logprobs(-1.0, -1.0) is False  # a tie is No
    with pytest.raises(MetricError, match="NaN"):
        yes_no_from_logprobs(float("nan"), -1.0)


# ---------------------------------------------------------------------------------------- multiple choice


def test_shuffle_is_deterministic_and_ignores_the_files_order():
    q = {
        "question": "Is <sks> a dog or a cat?",
        "options": {"A": "Dog", "B": "Cat"},
        "answer": "A",
        "image": "x",
    }
    flipped = {"question": q["question"], "options": {"A": "Cat", "B": "Dog"}, "answer": "B", "image": "x"}
    a = shuffle_options(q, 3)
    assert a == shuffle_options(q, 3)
    b = shuffle_options(flipped, 3)
    assert (a["options"], a["correct"]) == (b["options"], b["correct"])
    assert a["correct"] == "Dog" and sorted(a["options"]) == ["Cat", "Dog"]
    assert a["options"][a["correct_index"]] == "Dog" and a["image"] == "x"
    assert {tuple(shuffle_options(q, s)["options"]) for s in range(30)} == {("Dog", "Cat"), ("Cat", "Dog")}


def test_shuffle_removes_the_position_bias_of_the_original_file():
    # 400 questions with the answer always first (like the original text-QA file): after shuffling the
    # answer should be first about half the time (binomial sd 0.025, so 0.4..0.6 is a >4 sd margin).
    items = [
        {"question": f"q{i}", "options": [f"right{i}", f"wrong{i}"], "answer": f"right{i}"}
        for i in range(400)
    ]
    first = np.mean([shuffle_options(it, 0)["correct_index"] == 0 for it in items])
    assert 0.4 < first < 0.6


@pytest.mark.parametrize(
    "options, answer, want",
    [
        (["red", "blue", "green"], "C", "green"),  # a letter indexes a list
        (["red", "blue", "green"], "blue", "blue"),  # or the answer is the text
        ({"A": "Dog", "B": "Cat"}, "Cat", "Cat"),  # text answer with keyed options
        ({"x": "Dog", "y": "Cat"}, "y", "Cat"),
    ],
)
def test_shuffle_resolves_the_answer(options, answer, want):
    assert shuffle_options({"question": "q", "options": options, "answer": answer}, 0)["correct"] == want


@pytest.mark.parametrize(
    "question, match",
    [
        ({"question": "q", "options": ["x", "y"]}, "lacks"),
        ({"question": " ", "options": ["x", "y"], "answer": "x"}, "non-empty"),
        ({"question": "q", "options": ["x"], "answer": "x"}, "two options"),
        ({"question": "q", "options": "xy", "answer": "x"}, "list or a dict"),
        ({"question": "q", "options": ["Dog", "dog"], "answer": "Dog"}, "repeat"),
        ({"question": "q", "options": ["x", ""], "answer": "x"}, "non-empty string"),
        ({"question": "q", "options": ["x", "y"], "answer": "z"}, "neither"),
        ({"question": "q", "options": ["x", "y", "w"], "answer": "D"}, "neither"),
    ],
)
def test_shuffle_rejects_bad_questions(question, match):
    with pytest.raises(MetricError, match=match):
        shuffle_options(question, 0)


def test_mc_prompt_lists_the_options():
    assert mc_prompt({"question": "Color?", "options": ["red", "blue"]}) == "Color? red or blue?"
    assert mc_prompt({"question": "Color?", "options": ["a", "b", "c"]}) == "Color? a, b or c?"


def test_score_choice_by_option_text():
    opts = ["Dog", "Cat"]
    assert score_choice("It is a dog.", opts, "Dog")
    assert not score_choice("It is a dog.", opts, "Cat")
    assert not score_choice("A dog or a cat", opts, "Dog")  # ambiguous
    assert not score_choice("no idea", opts, "Dog")  # no match
    assert not score_choice(None, opts, "Dog")
    assert score_choice("  a GOLDEN\n  retriever", ["golden retriever", "poodle"], "golden retriever")
    # Whole words by default: "no" inside "know" is not an answer; the spec's plain substring says it is.
    assert not score_choice("I don't know", ["Yes", "No"], "No")
    assert score_choice("I don't know", ["Yes", "No"], "No", whole_words=False)
    with pytest.raises(MetricError, match="not one of the options"):
        score_choice("dog", opts, "Bird")


def test_a_shorter_option_inside_a_longer_one_does_not_count():
    opts = ["dog", "hot dog"]
    assert choice_matches("a hot dog", opts) == ["hot dog"]
    assert score_choice("a hot dog", opts, "hot dog") and not score_choice("a hot dog", opts, "dog")
    assert choice_matches("a hot dog and a dog", opts) == ["dog", "hot dog"]  # both named: ambiguous
    assert not score_choice("a hot dog and a dog", opts, "dog")


def test_mcqa_accuracy_counts_ambiguous_and_unmatched_answers():
    questions = [
        shuffle_options({"question": f"q{i}", "options": ["Dog", "Cat"], "answer": "Dog"}, 0)
        for i in range(4)
    ]
    answers = ["dog", "cat", "dog and cat", "a bird"]
    # 1 right, 1 wrong, 1 ambiguous, 1 unmatched: accuracy 1/4.
    assert mcqa_accuracy(answers, questions) == {
        "accuracy": 0.25,
        "n": 4,
        "correct": 1,
        "ambiguous": 1,
        "no_match": 1,
    }
    with pytest.raises(MetricError, match="differ in length"):
        mcqa_accuracy(answers[:2], questions)
    with pytest.raises(MetricError, match="shuffle_options"):
        mcqa_accuracy(["dog"], [{"options": ["Dog", "Cat"]}])
    with pytest.raises(MetricError, match="at least one"):
        mcqa_accuracy([], [])


# ------------------------------------------------------------------------------------------ CLIP-I / CLIP-T


def test_clip_i_by_hand():
    real = np.array([[1.0, 0.0], [0.0, 1.0]])  # mean direction (1, 1)/sqrt(2)
    gen = np.array([[1.0, 0.0], [1.0, 1.0]])  # cosines 1/sqrt(2) and 1
    assert clip_i(gen, real) == pytest.approx((1 / math.sqrt(2) + 1.0) / 2)


def test_clip_i_averages_the_real_embeddings_as_given():
    # Mean of [2, 0] and [0, 1] is [1, 0.5]; the cosine of [1, 0] to it is 2/sqrt(5). Averaging unit
    # vectors first would give 1/sqrt(2) instead.
    assert clip_i(np.array([[1.0, 0.0]]), np.array([[2.0, 0.0], [0.0, 1.0]])) == pytest.approx(
        2 / math.sqrt(5)
    )


def test_clip_t_paired_and_broadcast():
    # Pairs: cos([1,0],[1,0]) = 1 and cos([0,2],[1,0]) = 0.
    assert clip_t(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(
        0.5
    )
    # One prompt for three images: cosines 0, 1/sqrt(2), 1.
    got = clip_t(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]]), np.array([[0.0, 1.0]]))
    assert got == pytest.approx((1 + 1 / math.sqrt(2)) / 3)


@pytest.mark.parametrize(
    "gen, other, match",
    [
        (np.ones((2, 3)), np.ones((2, 4)), "sizes differ"),
        (np.zeros((0, 3)), np.ones((2, 3)), "non-empty"),
        (np.array([[0.0, 0.0]]), np.ones((1, 2)), "zero vector"),
        (np.array([[np.nan, 1.0]]), np.ones((1, 2)), "NaN"),
        (np.ones((2, 2, 2)), np.ones((1, 2)), "non-empty"),
    ],
)
def test_clip_rejects_bad_embeddings(gen, other, match):
    with pytest.raises(MetricError, match=match):
        clip_i(gen, other)
    with pytest.raises(MetricError, match=match):
        clip_t(gen, other)


def test_clip_t_needs_one_text_or_one_per_image():
    with pytest.raises(MetricError, match="one per image"):
        clip_t(np.ones((3, 2)), np.ones((2, 2)))


class _LookupEmbedder:
    """A duck-typed embedder: images and texts are keys into fixed vectors."""

    def __init__(self, table, with_progress):
        self.table, self.calls = table, []
        if with_progress:
            self.embed_images = self._images_with_progress
            self.embed_texts = self._texts_with_progress
        else:
            self.embed_images = self._images
            self.embed_texts = self._images

    def _images(self, items):
        return np.array([self.table[i] for i in items])

    def _images_with_progress(self, items, progress=True):
        self.calls.append(progress)
        return self._images(items)

    def _texts_with_progress(self, items, progress=True):
        self.calls.append(progress)
        return self._images(items)


@pytest.mark.parametrize("with_progress", [False, True])
def test_clip_wrappers_go_through_the_embedder(with_progress):
    table = {"g1": [1.0, 0.0], "g2": [1.0, 1.0], "r1": [1.0, 0.0], "r2": [0.0, 1.0], "t": [0.0, 1.0]}
    emb = _LookupEmbedder(table, with_progress)
    assert clip_i_with(emb, ["g1", "g2"], ["r1", "r2"]) == pytest.approx((1 / math.sqrt(2) + 1.0) / 2)
    assert clip_t_with(emb, ["g1", "g2"], ["t"]) == pytest.approx((0 + 1 / math.sqrt(2)) / 2)
    assert emb.calls == ([False] * 4 if with_progress else [])  # progress bars silenced when supported
    with pytest.raises(MetricError, match="at least one"):
        clip_i_with(emb, [], ["r1"])
    with pytest.raises(MetricError, match="at least one"):
        clip_t_with(emb, ["g1"], [])


# ----------------------------------------------------------------------------------------- face similarity


def _img(value):
    return Image.new("RGB", (8, 8), (value, value, value))


# A fake face model: the gray level picks the face embedding; 0 means "no face".
_FACES = {10: np.array([1.0, 0.0]), 20: np.array([0.0, 3.0]), 30: np.array([1.0, 1.0]), 0: None}


def _fake_face_model(image):
    return _FACES[image.getpixel((0, 0))[0]]


def test_face_similarity_by_hand(tmp_path):
    real = [_img(10), _img(20), _img(0)]  # faces (1,0) and (0,1); the third photo has none
    path = tmp_path / "g.png"
    _img(30).save(path)
    gen = [_img(10), path, _img(0)]
    got = face_similarity(gen, real, backend=_fake_face_model)
    # (1,0): mean cosine (1 + 0)/2 = 0.5; (1,1)/sqrt(2): (0.7071 + 0.7071)/2 = 0.7071; third: no face.
    want = (0.5 + 1 / math.sqrt(2)) / 2
    assert got["face_sim"] == pytest.approx(want)
    assert got["face_sim_with_zeros"] == pytest.approx((0.5 + 1 / math.sqrt(2) + 0.0) / 3)
    assert got["no_face_count"] == 1 and got["n_generated"] == 3


def test_face_similarity_without_generated_faces_or_real_faces():
    got = face_similarity([_img(0)], [_img(10)], backend=_fake_face_model)
    assert got["face_sim"] is None and got["face_sim_with_zeros"] == 0.0 and got["no_face_count"] == 1
    assert face_similarity([_img(10)], [_img(0)], backend=_fake_face_model) is None


def test_face_similarity_skips_cleanly_without_insightface(monkeypatch, caplog):
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "insightface", None)
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with caplog.at_level(logging.WARNING, logger="yochameleon.eval.metrics"):
        assert face_similarity([_img(10)], [_img(10)]) is None
    assert "face similarity skipped" in caplog.text and "insightface is not installed" in caplog.text


def test_face_similarity_skips_cleanly_without_the_face_model(monkeypatch, caplog):
    class NoModel:
        def __init__(self, name):
            raise RuntimeError(f"model pack {name} not found and downloads are off")

    package, app = types.ModuleType("insightface"), types.ModuleType("insightface.app")
    app.FaceAnalysis = NoModel
    package.app = app
    monkeypatch.setitem(sys.modules, "insightface", package)
    monkeypatch.setitem(sys.modules, "insightface.app", app)
    with caplog.at_level(logging.WARNING, logger="yochameleon.eval.metrics"):
        assert face_similarity([_img(10)], [_img(10)]) is None
    assert "face model is unavailable" in caplog.text and "buffalo_l not found" in caplog.text


def test_face_similarity_rejects_bad_input():
    with pytest.raises(MetricError, match="unknown face backend"):
        face_similarity([_img(10)], [_img(10)], backend="dlib")
    with pytest.raises(MetricError, match="at least one generated"):
        face_similarity([], [_img(10)], backend=_fake_face_model)


# ---------------------------------------------------------------------------------------------- forgetting


def test_forgetting_check_on_numpy_logits():
    base = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    changed_excluded = base.copy()
    changed_excluded[0, 1] = 9.0
    assert logits_identical_except(base, changed_excluded, [1]) == (True, 0.0)
    changed_other = base.copy()
    changed_other[0, 3] = 4.5
    assert logits_identical_except(base, changed_other, [1]) == (False, 0.5)
    assert logits_identical_except(base, changed_other, [1, 3]) == (True, 0.0)


def test_forgetting_check_compares_bits():
    base = np.array([0.0, np.nan, 1.0], dtype=np.float32)
    assert logits_identical_except(base, base.copy(), []) == (True, 0.0)  # same NaN bits are identical
    assert logits_identical_except(base, np.array([-0.0, np.nan, 1.0], dtype=np.float32), []) == (False, 0.0)
    same, diff = logits_identical_except(base, np.array([0.0, 5.0, 1.0], dtype=np.float32), [])
    assert not same and diff == math.inf


def test_forgetting_check_on_bfloat16_tensors():
    torch.manual_seed(0)
    base = torch.randn(2, 3, 6).to(torch.bfloat16)
    new = base.clone()
    new[..., 5] += 1
    assert logits_identical_except(base, new, torch.tensor([5])) == (True, 0.0)
    new[1, 2, 0] = base[1, 2, 0] + 0.25
    want = float(abs(new[1, 2, 0].float() - base[1, 2, 0].float()))
    assert logits_identical_except(base, new, [5]) == (False, pytest.approx(want))


@pytest.mark.parametrize(
    "base, new, ids, match",
    [
        (np.zeros(4), np.zeros(5), [], "shapes differ"),
        (np.zeros(4, np.float32), np.zeros(4, np.float64), [], "dtypes differ"),
        (np.zeros(4), np.zeros(4), [4], "lie in"),
        (np.zeros(4), np.zeros(4), [-1], "lie in"),
    ],
)
def test_forgetting_check_rejects_bad_input(base, new, ids, match):
    with pytest.raises(MetricError, match=match):
        logits_identical_except(base, new, ids)


# ----------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_exact_small_case():
    # Resampling [0, 1] gives means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    assert bootstrap_ci([0.0, 1.0], n_boot=20000, seed=0) == (0.0, 1.0)  # 2.5% / 97.5% quantiles
    assert bootstrap_ci([0.0, 1.0], n_boot=20000, seed=0, alpha=0.6) == (0.5, 0.5)  # 30% / 70%
    assert bootstrap_ci([0.7] * 5) == (pytest.approx(0.7), pytest.approx(0.7))


def test_bootstrap_ci_matches_the_normal_approximation():
    values = np.random.default_rng(7).normal(3.0, 2.0, size=80)
    lo, hi = bootstrap_ci(values, n_boot=4000, seed=1)
    half = 1.96 * values.std() / math.sqrt(values.size)  # the CLT interval the bootstrap approximates
    assert (lo + hi) / 2 == pytest.approx(values.mean(), abs=0.1 * half)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)


def test_bootstrap_ci_is_seeded_and_skips_none():
    values = [0.21, None, 0.93, 0.44, 0.57, 0.12, 0.78, 0.35]
    assert bootstrap_ci(values, n_boot=300, seed=3) == bootstrap_ci(
        [v for v in values if v is not None], n_boot=300, seed=3
    )
    assert bootstrap_ci(values, n_boot=300, seed=3) != bootstrap_ci(values, n_boot=300, seed=4)
    lo95, hi95 = bootstrap_ci(values, seed=3)
    lo50, hi50 = bootstrap_ci(values, seed=3, alpha=0.5)
    assert lo95 <= lo50 <= hi50 <= hi95


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"values": []}, "at least one"),
        ({"values": [None]}, "at least one"),
        ({"values": [1.0, float("nan")]}, "NaN"),
        ({"values": [1.0], "n_boot": 0}, "n_boot"),
        ({"values": [1.0], "alpha": 1.0}, "alpha"),
    ],
)
def test_bootstrap_ci_rejects_bad_input(kwargs, match):
    with pytest.raises(MetricError, match=match):
        bootstrap_ci(**kwargs)


def test_paired_bootstrap_diff():
    d = paired_bootstrap_diff([1.0, 1.0, 1.0, 1.0], [0.0, 0.1, 0.0, 0.1])
    # Differences 1, 0.9, 1, 0.9: mean 0.95 and every resampled mean lies in [0.9, 1].
    assert d["mean"] == pytest.approx(0.95) and d["n"] == 4 and not d["crosses_zero"]
    assert 0.9 - 1e-12 <= d["ci"][0] <= d["ci"][1] <= 1.0 + 1e-12
    assert paired_bootstrap_diff([0.1, 0.9, 0.2, 0.8], [0.5, 0.5, 0.5, 0.5])["crosses_zero"]
    with pytest.raises(MetricError, match="differ in length"):
        paired_bootstrap_diff([1.0], [1.0, 2.0])
    with pytest.raises(MetricError, match="None"):
        paired_bootstrap_diff([1.0, None], [1.0, 2.0])


def test_metric_errors_are_project_errors():
    assert issubclass(MetricError, YoChameleonError)
