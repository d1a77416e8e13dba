"""Metrics, the results schema and reports, on hand-built predictions with hand-computed answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from yochameleon.errors import ConfigError
from yochameleon.eval.metrics import (
    bootstrap_ci,
    clip_i,
    clip_t,
    face_similarity,
    logits_identical_except,
    paired_bootstrap_diff,
    parse_yes_no,
    recognition_scores,
    score_choice,
    shuffle_options,
)
from yochameleon.eval.report import compare, markdown_table, write_report
from yochameleon.eval.schema import ConceptResult, load_summary, summarize, write_summary


def test_recognition_scores_by_hand():
    labels = ["pos", "pos", "pos", "pos", "neg_hard", "neg_hard", "neg_easy", "neg_easy"]
    preds = [True, True, True, None, True, False, False, False]
    s = recognition_scores(preds, labels)
    # pos: 3/4 (None is wrong); hard: 1/2; easy: 2/2; negatives pooled 3/4; weighted (0.75 + 0.75) / 2.
    assert (
        s["recognition_pos"] == 0.75 and s["recognition_neg_hard"] == 0.5 and s["recognition_neg_easy"] == 1.0
    )
    assert s["recognition_weighted"] == 0.75 and s["recognition_unparsed"] == 1
    always_no = recognition_scores([False] * 8, labels)
    assert always_no["recognition_weighted"] == 0.5  # a constant answer cannot beat chance
    with pytest.raises(ValueError, match="unknown labels"):
        recognition_scores([True], ["maybe"])


@pytest.mark.parametrize(
    "text, want",
    [
        ("Yes, it is.", True),
        ("no.", False),
        ("<u1><u2> Yes", True),
        ("I think not", None),
        ("", None),
        ("Nope, yes", True),
    ],
)
def test_parse_yes_no(text, want):
    assert parse_yes_no(text) is want


def test_shuffle_is_seeded_and_scoring_uses_text():
    item = {"question": "Is sks a dog or a cat?", "options": {"A": "Dog", "B": "Cat"}, "answer": "A"}
    a, b = shuffle_options(item, 0), shuffle_options(item, 0)
    assert a == b and a["correct"] == "Dog" and sorted(a["options"]) == ["Cat", "Dog"]
    orders = {tuple(shuffle_options(item, s)["options"]) for s in range(20)}
    assert len(orders) == 2  # both orders occur across seeds
    assert score_choice("It is a dog.", ["Dog", "Cat"], "Dog")
    assert not score_choice("A dog or a cat", ["Dog", "Cat"], "Dog")  # ambiguous
    assert not score_choice("no idea", ["Dog", "Cat"], "Dog")
    with pytest.raises(ValueError):
        shuffle_options({"question": "q", "options": ["x"], "answer": "y"}, 0)


def test_clip_scores_by_hand():
    real = np.array([[1.0, 0.0], [0.0, 1.0]])  # mean direction (1, 1)/sqrt(2)
    gen = np.array([[1.0, 0.0], [1.0, 1.0]])
    assert clip_i(gen, real) == pytest.approx((1 / np.sqrt(2) + 1.0) / 2)
    assert clip_t(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(
        0.5
    )


def test_face_similarity_skips_cleanly_without_insightface():
    pytest.importorskip  # noqa: B018
    try:
        import insightface  # noqa: F401
    except ImportError:
        assert face_similarity([Image.new("RGB", (8, 8))], [Image.new("RGB", (8, 8))]) is None


def test_forgetting_check():
    base = np.array([[1.0, 2.0, 3.0]])
    same, diff = logits_identical_except(base, np.array([[1.0, 9.0, 3.0]]), [1])
    assert same and diff == 0.0
    same, diff = logits_identical_except(base, np.array([[1.0, 2.0, 3.5]]), [1])
    assert not same and diff == 0.5


def test_bootstrap_ci_and_paired_difference():
    lo, hi = bootstrap_ci([0.5] * 10)
    assert lo == hi == 0.5
    lo, hi = bootstrap_ci(list(range(10)), seed=1)
    assert lo < 4.5 < hi
    d = paired_bootstrap_diff([1.0, 1.0, 1.0, 1.0], [0.0, 0.1, 0.0, 0.1])
    assert d["mean"] == pytest.approx(0.95) and not d["crosses_zero"]
    assert paired_bootstrap_diff([0.1, 0.9, 0.2, 0.8], [0.5, 0.5, 0.5, 0.5])["crosses_zero"]


def _records():
    out = []
    for seed in (0, 1):
        for c, base in (("a", 0.8), ("b", 0.6)):
            out.append(
                ConceptResult(
                    "yochameleon",
                    c,
                    seed,
                    recognition_weighted=base + 0.1 * seed,
                    clip_i=0.7,
                    prompt_tokens=33,
                )
            )
            out.append(
                ConceptResult(
                    "text_prompt", c, seed, recognition_weighted=base - 0.2, clip_i=0.5, prompt_tokens=12
                )
            )
    return out


def test_summary_means_cis_and_round_trip(tmp_path):
    s = summarize(_records(), {"note": "test"})
    ym = s["methods"]["yochameleon"]
    assert ym["recognition_weighted"] == pytest.approx(np.mean([0.8, 0.6, 0.9, 0.7]))
    assert ym["vqa"] is None and ym["vqa_ci"] is None and ym["prompt_tokens"] == 33
    d = s["differences"]["text_prompt"]["recognition_weighted"]
    assert d["mean"] == pytest.approx(0.25) and not d["crosses_zero"]
    write_summary(tmp_path / "s.json", s)
    assert load_summary(tmp_path / "s.json")["methods"] == json.loads(json.dumps(s["methods"]))
    (tmp_path / "bad.json").write_text(json.dumps({**s, "schema_version": 99}))
    with pytest.raises(ConfigError, match="schema_version"):
        load_summary(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="outside"):
        ConceptResult("m", "c", recognition_pos=1.5)


def test_report_and_compare_write_table_and_pngs(tmp_path):
    s = summarize(_records()[:4])
    write_summary(tmp_path / "one.json", s)
    s2 = summarize(_records()[4:])
    write_summary(tmp_path / "two.json", s2)
    merged = compare([tmp_path / "one.json", tmp_path / "two.json"])
    assert len(merged["per_concept"]) == 8
    paths = write_report(merged, tmp_path / "report")
    table = markdown_table(merged)
    assert "| yochameleon | 33 |" in table and "text_prompt" in table
    for key in ("metrics_png", "tokens_png"):
        with Image.open(paths[key]) as im:
            assert im.size[0] > 100
    assert (tmp_path / "report" / "report.md").read_text().startswith("# Results")
