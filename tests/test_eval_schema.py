"""The results schema: record validation, summary statistics against numpy, differences, file round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from yochameleon.errors import ConfigError, YoChameleonError
from yochameleon.eval.metrics import bootstrap_ci
from yochameleon.eval.schema import (
    METRICS,
    SCHEMA_VERSION,
    ConceptResult,
    SchemaError,
    load_summary,
    records_of,
    summarize,
    validate_summary,
    write_summary,
)

CONCEPTS = ("bo", "mam", "thao", "yuheng", "viruss")


def _records(seed: int = 0) -> list[ConceptResult]:
    """Two methods over 5 concepts x 2 seeds with seeded random scores; some metrics not applicable."""
    rng = np.random.default_rng(seed)
    out = []
    for s in (0, 1):
        for i, concept in enumerate(CONCEPTS):
            out.append(
                ConceptResult(
                    "yochameleon",
                    concept,
                    s,
                    recognition_weighted=float(rng.uniform(0.6, 0.9)),
                    clip_i=float(rng.uniform(0.6, 0.8)),
                    face_sim=float(rng.uniform(0.1, 0.3)) if i < 2 else None,  # two people
                    prompt_tokens=33,
                )
            )
            if (concept, s) == ("viruss", 1):
                continue  # a missing run: differences pair only what both methods have
            out.append(
                ConceptResult(
                    "text_prompt",
                    concept,
                    s,
                    recognition_weighted=float(rng.uniform(0.4, 0.8)),
                    clip_i=float(rng.uniform(0.4, 0.6)),
                    prompt_tokens=60 + i,
                )
            )
    return out


# --------------------------------------------------------------------------------------------- the record


def test_record_accepts_valid_values_and_normalizes_numpy_scalars():
    r = ConceptResult("m", "c", np.int64(2), clip_i=np.float32(-0.5), vqa=1, prompt_tokens=np.int64(4))
    assert r.clip_i == -0.5 and type(r.clip_i) is float and r.vqa == 1.0
    assert r.seed == 2 and type(r.seed) is int and r.prompt_tokens == 4
    assert r.key == ("m", "c", 2)
    assert ConceptResult.from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "", "concept": "c"}, "non-empty method"),
        ({"method": "  ", "concept": "c"}, "non-empty method"),
        ({"method": "m", "concept": ""}, "non-empty concept"),
        ({"method": "m", "concept": "c", "seed": 1.5}, "seed"),
        ({"method": "m", "concept": "c", "seed": True}, "seed"),
        ({"method": "m", "concept": "c", "prompt_tokens": -1}, "prompt_tokens"),
        ({"method": "m", "concept": "c", "prompt_tokens": 3.0}, "prompt_tokens"),
        ({"method": "m", "concept": "c", "recognition_pos": 1.5}, "outside"),
        ({"method": "m", "concept": "c", "vqa": -0.1}, "outside"),
        ({"method": "m", "concept": "c", "clip_i": -1.5}, "outside"),
        ({"method": "m", "concept": "c", "text_qa": float("nan")}, "not a number"),
        ({"method": "m", "concept": "c", "gen_fidelity": True}, "not a number"),
        ({"method": "m", "concept": "c", "face_sim": "0.2"}, "not a number"),
    ],
)
def test_record_rejects_bad_values(kwargs, match):
    with pytest.raises(SchemaError, match=match):
        ConceptResult(**kwargs)


def test_record_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(SchemaError, match="unknown fields \\['recognition'\\]"):
        ConceptResult.from_dict({"method": "m", "concept": "c", "recognition": 0.5})
    with pytest.raises(SchemaError, match="lacks \\['concept'\\]"):
        ConceptResult.from_dict({"method": "m"})
    with pytest.raises(SchemaError, match="JSON object"):
        ConceptResult.from_dict(["m", "c"])


def test_schema_errors_are_project_errors():
    assert issubclass(SchemaError, ConfigError) and issubclass(SchemaError, YoChameleonError)


# -------------------------------------------------------------------------------------------- the summary


def test_summary_means_and_cis_match_numpy():
    records = _records()
    s = summarize(records, {"model": "tiny"}, n_boot=500, seed=3)
    assert list(s["methods"]) == ["yochameleon", "text_prompt"]  # order of first appearance
    for method, stats in s["methods"].items():
        rows = [r for r in records if r.method == method]
        assert stats["n"] == len(rows)
        assert stats["prompt_tokens"] == pytest.approx(np.mean([r.prompt_tokens for r in rows]))
        for metric in METRICS:
            values = np.array([getattr(r, metric) for r in rows if getattr(r, metric) is not None])
            if values.size == 0:
                assert stats[metric] is None and stats[metric + "_ci"] is None
                continue
            assert stats[metric] == pytest.approx(values.mean())
            lo, hi = stats[metric + "_ci"]
            assert lo <= values.mean() <= hi
            assert [lo, hi] == list(bootstrap_ci(values, n_boot=500, seed=3))
    assert s["methods"]["yochameleon"]["face_sim"] is not None  # 4 of 10 records have a face score
    assert s["methods"]["text_prompt"]["face_sim"] is None  # null everywhere: null mean and CI
    assert s["config"] == {"model": "tiny"} and s["schema_version"] == SCHEMA_VERSION


def test_single_value_has_a_mean_but_no_ci():
    s = summarize([ConceptResult("none", "bo", vqa=0.4)])
    assert s["methods"]["none"]["vqa"] == 0.4 and s["methods"]["none"]["vqa_ci"] is None


def test_differences_are_paired_on_concept_and_seed():
    records = _records()
    s = summarize(list(reversed(records)), n_boot=300)  # order must not matter for the pairing
    ref = {(r.concept, r.seed): r for r in records if r.method == "yochameleon"}
    for metric in ("recognition_weighted", "clip_i"):
        want = [
            getattr(ref[(r.concept, r.seed)], metric) - getattr(r, metric)
            for r in records
            if r.method == "text_prompt"
        ]
        d = s["differences"]["text_prompt"][metric]
        assert d["n"] == 9  # ("viruss", 1) has no text_prompt run
        assert d["mean"] == pytest.approx(np.mean(want))  # reference minus method
        assert d["ci"][0] <= d["mean"] <= d["ci"][1]
    assert "face_sim" not in s["differences"]["text_prompt"]  # no pair has both values
    assert s["reference"] == "yochameleon"


def test_no_differences_without_the_reference_method():
    records = [r for r in _records() if r.method == "text_prompt"]
    s = summarize(records)
    assert "differences" not in s and s["reference"] is None
    s = summarize(_records(), reference="text_prompt")
    assert s["reference"] == "text_prompt" and set(s["differences"]) == {"yochameleon"}
    assert "differences" not in summarize(_records(), reference=None)


def test_summarize_accepts_dict_records_and_rejects_duplicates_and_nothing():
    as_dicts = [r.to_dict() for r in _records()]
    assert summarize(as_dicts, n_boot=50)["per_concept"] == as_dicts
    with pytest.raises(SchemaError, match="two results for method 'm', concept 'c', seed 0"):
        summarize([ConceptResult("m", "c"), ConceptResult("m", "c", vqa=0.5)])
    with pytest.raises(SchemaError, match="no results"):
        summarize([])
    with pytest.raises(SchemaError, match="outside"):
        summarize([{"method": "m", "concept": "c", "vqa": 2.0}])


# ------------------------------------------------------------------------------------------- file round trip


def test_write_and_load_round_trip(tmp_path):
    s = summarize(_records(), {"model": "tiny", "seeds": [0, 1]}, n_boot=200)
    path = write_summary(tmp_path / "out" / "summary.json", s)
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]  # no temporary file left
    loaded = load_summary(path)
    assert loaded == json.loads(json.dumps(s))
    assert records_of(loaded) == _records()


def _saved(tmp_path, data) -> str:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_load_rejects_bad_files(tmp_path):
    good = summarize(_records(), n_boot=50)
    with pytest.raises(SchemaError, match="does not exist"):
        load_summary(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SchemaError, match="not valid JSON"):
        load_summary(tmp_path / "broken.json")
    with pytest.raises(SchemaError, match="schema_version 99, expected 1"):
        load_summary(_saved(tmp_path, {**good, "schema_version": 99}))
    with pytest.raises(SchemaError, match="schema_version None"):
        load_summary(_saved(tmp_path, {k: v for k, v in good.items() if k != "schema_version"}))
    with pytest.raises(SchemaError, match="missing key\\(s\\) \\['methods'\\]"):
        load_summary(_saved(tmp_path, {k: v for k, v in good.items() if k != "methods"}))
    bad_method = json.loads(json.dumps(good))
    del bad_method["methods"]["text_prompt"]["clip_i_ci"]
    with pytest.raises(SchemaError, match="methods\\['text_prompt'\\] lacks \\['clip_i_ci'\\]"):
        load_summary(_saved(tmp_path, bad_method))
    bad_ci = json.loads(json.dumps(good))
    bad_ci["methods"]["yochameleon"]["clip_i_ci"] = [0.9, 0.1]
    with pytest.raises(SchemaError, match="lo <= hi"):
        load_summary(_saved(tmp_path, bad_ci))
    bad_record = json.loads(json.dumps(good))
    bad_record["per_concept"][3]["vqa"] = 7
    with pytest.raises(SchemaError, match="per_concept\\[3\\].*vqa=7"):
        load_summary(_saved(tmp_path, bad_record))


def test_write_refuses_an_invalid_summary(tmp_path):
    s = summarize(_records(), n_boot=50)
    s["methods"]["yochameleon"]["clip_i"] = float("nan")
    with pytest.raises(SchemaError, match="number or null"):
        write_summary(tmp_path / "s.json", s)
    assert not (tmp_path / "s.json").exists()
    with pytest.raises(SchemaError, match="JSON object"):
        validate_summary([1, 2])
