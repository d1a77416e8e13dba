"""Training records and the JSONL manifest."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from types import SimpleNamespace

import pytest
from data_helpers import pool, save_noise, skimage_photo, spec_bins

from yochameleon import prompts as P
from yochameleon.data.config import DataConfig
from yochameleon.data.manifest import MANIFEST, Manifest, read_manifest, summary_table, write_manifest
from yochameleon.data.records import Record, build_records, make_records
from yochameleon.errors import ConfigError, DataError


@pytest.fixture
def photos(tmp_path):
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        p = tmp_path / "concept" / "photos" / f"{name}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        skimage_photo(name).resize((64, 64)).save(p)
        out.append(p)
    return out


def _soft(paths, n_g):
    # Ascending similarity, token counts by the spec's rank bins.
    return [
        (p, 0.1 + 0.001 * i, m)
        for i, (p, m) in enumerate(zip(paths, spec_bins(len(paths), n_g), strict=True))
    ]


def test_default_spec_sized_concept(tmp_path, photos):
    hard = pool(tmp_path / "hard", 100, 1000)
    easy = pool(tmp_path / "easy", 100, 2000)
    soft = _soft(pool(tmp_path / "soft", 150, 3000), 16)  # 15 bins of 10
    qa = [(q, "An answer.") for q in P.ATTRIBUTE_QUESTIONS]
    recs = make_records("bo", photos, hard, easy, soft, qa, tmp_path / "data")
    counts = Counter(r.kind + ("/" + r.label if r.label else "") for r in recs)
    assert counts == {
        "recognition/pos": 200,
        "recognition/neg_hard": 100,
        "recognition/neg_easy": 100,
        "text_qa": 40,
        "generation_real": 10,
        "generation_soft": 150,
    }
    assert all(r.n_g == 16 for r in recs if r.kind == "generation_real")
    assert sorted(Counter(r.n_g for r in recs if r.kind == "generation_soft").values()) == [10] * 15
    # Every hard and easy negative is used exactly once; positives are cycled with both flips.
    assert len({r.image for r in recs if r.label == "neg_hard"}) == 100
    pos = [r for r in recs if r.label == "pos"]
    assert Counter(r.flip for r in pos) == {False: 100, True: 100}
    assert len({r.id for r in recs}) == len(recs)


def test_recognition_text(tmp_path, photos):
    negs = pool(tmp_path / "n", 6, 10)
    recs = make_records(
        "bo", photos, negs[:3], negs[3:], [], [], tmp_path / "d", DataConfig(n_recognition=60)
    )
    rec = [r for r in recs if r.kind == "recognition"]
    assert all(
        r.question.startswith(P.IMAGE) and r.question[len(P.IMAGE) :] in P.RECOGNITION_QUESTIONS for r in rec
    )
    assert all(r.answer in (P.POSITIVE_ANSWERS if r.label == "pos" else P.NEGATIVE_ANSWERS) for r in rec)
    assert len({r.question for r in rec}) >= 15 and len({r.answer for r in rec}) >= 25
    assert all(r.task == "understanding" and r.n_g is None and r.prompt_form is None for r in rec)
    # First pass unflipped, second flipped.
    assert [r.flip for r in rec if r.label == "pos"][:8] == [False] * 4 + [True] * 4


def test_negative_split_and_missing_kinds(tmp_path, photos):
    negs = pool(tmp_path / "n", 4, 10)
    only_hard = make_records("bo", photos, negs, [], [], [], tmp_path / "d", DataConfig(n_recognition=10))
    assert Counter(r.label for r in only_hard if r.label) == {"pos": 10, "neg_hard": 10}
    split = make_records(
        "bo",
        photos,
        negs[:2],
        negs[2:],
        [],
        [],
        tmp_path / "d",
        DataConfig(n_recognition=10, hard_fraction=0.7),
    )
    assert Counter(r.label for r in split if r.label) == {"pos": 10, "neg_hard": 7, "neg_easy": 3}
    none = make_records("bo", photos, [], [], [], [], tmp_path / "d", DataConfig(n_recognition=10))
    assert Counter(r.label for r in none if r.label) == {"pos": 10}


def test_concept_photos_in_the_pool_are_not_negatives(tmp_path, photos):
    copy = tmp_path / "pool" / "same.jpg"
    copy.parent.mkdir()
    shutil.copy(photos[0], copy)
    others = pool(tmp_path / "pool", 2, 50)
    recs = make_records(
        "bo",
        photos,
        [copy] + others,
        [],
        [(copy, 0.99, 1)],
        [],
        tmp_path / "d",
        DataConfig(n_recognition=4),
        n_g=4,
    )
    own = {r.image for r in recs if r.label == "pos"}
    assert not own & {r.image for r in recs if r.label == "neg_hard"}
    assert not any(r.kind == "generation_soft" for r in recs)


def test_text_qa_repeats_per_photo(tmp_path, photos):
    one_answer = [("What colour is <sks>?", "Orange.")]
    recs = make_records("bo", photos[:3], [], [], [], one_answer, tmp_path / "d", DataConfig(n_recognition=0))
    qa = [r for r in recs if r.kind == "text_qa"]
    assert len(qa) == 3 and all(
        r.image is None and r.flip is False and r.question == one_answer[0][0] for r in qa
    )
    per_photo = [("What colour is <sks>?", f"Answer {i}.") for i in range(5)] + [("Is <sks> big?", "No.")]
    recs = make_records(
        "bo", photos, [], [], [], per_photo, tmp_path / "d", DataConfig(n_recognition=0, text_qa_repeats=2)
    )
    answers = [r.answer for r in recs if r.kind == "text_qa"]
    assert answers == [f"Answer {i}." for i in range(5)] + ["No.", "No."]


def test_generation_records(tmp_path, photos):
    soft_paths = pool(tmp_path / "s", 7, 100)
    soft = _soft(soft_paths, 4)  # bins of 3, 2, 2
    recs = make_records(
        "bo",
        photos[:2],
        [],
        [],
        soft,
        [],
        tmp_path / "d",
        DataConfig(n_recognition=0, soft_prompt_form="code"),
        n_g=4,
    )
    real = [r for r in recs if r.kind == "generation_real"]
    assert len(real) == 3 and [r.flip for r in real] == [False, False, True]
    assert all(r.answer is None and r.question == P.GENERATION_REQUEST and r.n_g == 4 for r in real)
    sp = [r for r in recs if r.kind == "generation_soft"]
    assert [r.n_g for r in sp] == [1, 1, 1, 2, 2, 3, 3] and all(r.prompt_form == "code" for r in sp)
    assert [r.score for r in sp] == [s[1] for s in soft]
    # Objects with path/score/n_tokens attributes (e.g. retrieval results) are accepted too.
    objs = [SimpleNamespace(path=p, score=s, n_tokens=m) for p, s, m in soft]
    again = make_records(
        "bo", photos[:2], [], [], objs, [], tmp_path / "d", DataConfig(n_recognition=0), n_g=4
    )
    assert [r.n_g for r in again if r.kind == "generation_soft"] == [1, 1, 1, 2, 2, 3, 3]
    no_soft = make_records(
        "bo", photos, [], [], [], [], tmp_path / "d", DataConfig(n_recognition=0, n_real_min=9)
    )
    assert sum(r.kind == "generation_real" for r in no_soft) == 9


def test_images_are_staged_by_content(tmp_path, photos):
    dup = tmp_path / "dup.jpg"
    shutil.copy(photos[1], dup)
    data = tmp_path / "data"
    recs = make_records("bo", photos, [dup], [], [], [], data, DataConfig(n_recognition=4))
    images = {r.image for r in recs}
    assert all(i.startswith("images/") and (data / i).is_file() for i in images)
    assert len(list((data / "images").iterdir())) == 4  # dup shares photos[1]'s file
    # Hard links by default (no extra disk for large pools), plain copies on request.
    staged = data / next(r.image for r in recs if r.label == "pos")
    assert os.stat(staged).st_nlink == 2
    no_links = make_records(
        "bo", photos, [], [], [], [], tmp_path / "d2", DataConfig(n_recognition=1, link_images=False)
    )
    copied = tmp_path / "d2" / no_links[0].image
    assert os.stat(copied).st_nlink == 1 and copied.read_bytes() == photos[0].read_bytes()


def test_seeded(tmp_path, photos):
    negs = pool(tmp_path / "n", 4, 10)

    def questions(seed):
        recs = make_records(
            "bo", photos, negs, [], [], [], tmp_path / "d", DataConfig(n_recognition=20, seed=seed)
        )
        return [(r.question, r.answer) for r in recs]

    assert questions(1) == questions(1) and questions(1) != questions(2)


def test_bad_inputs(tmp_path, photos):
    d = tmp_path / "d"
    s = save_noise(tmp_path / "s.png", 1)
    with pytest.raises(DataError, match="no photos"):
        make_records("bo", [], [], [], [], [], d)
    with pytest.raises(DataError, match=r"uses 4 g-tokens; it must be 1..3"):
        make_records("bo", photos, [], [], [(s, 0.5, 4)], [], d, DataConfig(), n_g=4)
    with pytest.raises(DataError, match=r"uses 0 g-tokens"):
        make_records("bo", photos, [], [], [(s, 0.5, 0)], [], d, DataConfig(), n_g=4)
    with pytest.raises(DataError, match=r"must be \(path, score, n_tokens\)"):
        make_records("bo", photos, [], [], [(s, 0.5)], [], d)
    with pytest.raises(DataError, match="missing or empty"):
        make_records("bo", photos, [tmp_path / "gone.png"], [], [], [], d)
    with pytest.raises(DataError, match="does not mention"):
        make_records("bo", photos, [], [], [], [("What is it?", "A dog.")], d)
    with pytest.raises(DataError, match="n_g must be at least 1"):
        make_records("bo", photos, [], [], [], [], d, DataConfig(), n_g=0)
    for bad, key in (
        (dict(hard_fraction=1.5), "hard_fraction"),
        (dict(soft_prompt_form="x"), "soft_prompt_form"),
        (dict(text_qa_repeats=0), "text_qa_repeats"),
        (dict(n_recognition=-1), "n_recognition"),
        (dict(tasks=["caption"]), "tasks"),
    ):
        with pytest.raises(ConfigError, match=f"data.{key}"):
            DataConfig(**bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(kind="caption"), "kind must be one of"),
        (dict(task="generation"), "belongs to task understanding"),
        (dict(answer="No, <sks> is not here."), "must start with Yes,"),
        (dict(label=None), "label must be one of"),
        (dict(image="/abs/x.png"), "relative to the data directory"),
        (dict(n_g=3), "n_g is only for generation"),
        (dict(score=0.5), "only for soft positives"),
        (dict(question="Is <sks> here?"), "need an image and <image>"),
        (dict(flip="yes"), "flip must be"),
    ],
)
def test_record_validation(change, message):
    good = dict(
        id="bo-1",
        concept="bo",
        task="understanding",
        kind="recognition",
        question="<image>Is <sks> here?",
        answer="Yes, <sks> is here.",
        image="images/a.png",
        flip=False,
        label="pos",
    )
    Record(**good)
    with pytest.raises(DataError, match=message):
        Record(**{**good, **change})
    gen = dict(
        id="g",
        concept="bo",
        task="generation",
        kind="generation_soft",
        question="A photo of <sks>.",
        image="images/a.png",
        n_g=2,
        prompt_form="paper",
        score=0.3,
    )
    Record(**gen)
    for bad in (dict(answer="x"), dict(n_g=None), dict(prompt_form=None), dict(score=None), dict(image=None)):
        with pytest.raises(DataError):
            Record(**{**gen, **bad})


# ----- manifest --------------------------------------------------------------------------------------


def _prepared(tmp_path, photos):
    data = tmp_path / "data"
    negs = pool(tmp_path / "n", 4, 10)
    soft = _soft(pool(tmp_path / "s", 6, 100), 4)
    recs = make_records(
        "bo",
        photos,
        negs[:2],
        negs[2:],
        soft,
        [("What is <sks>?", "A dog.")],
        data,
        DataConfig(n_recognition=8),
        n_g=4,
    )
    header = write_manifest(data, "bo", 4, recs, {"concept.n_g": 4, "data.n_recognition": 8})
    return data, recs, header


def test_manifest_round_trip(tmp_path, photos):
    data, recs, header = _prepared(tmp_path, photos)
    lines = (data / MANIFEST).read_text().splitlines()
    assert json.loads(lines[0]) == header and len(lines) == len(recs) + 1
    assert header["manifest_version"] == 2 and header["concept"] == "bo" and header["n_g"] == 4
    assert header["settings"] == {"concept.n_g": 4, "data.n_recognition": 8}
    assert header["counts"] == {
        "generation_real": 4,
        "generation_soft": 6,
        "recognition/neg_easy": 4,
        "recognition/neg_hard": 4,
        "recognition/pos": 8,
        "text_qa": 4,
    }
    m = read_manifest(data)
    assert isinstance(m, Manifest) and m.header == header and m.records == recs
    assert m.record_dicts() == build_records(
        "bo",
        photos,
        pool(tmp_path / "n", 4, 10)[:2],
        pool(tmp_path / "n", 4, 10)[2:],
        _soft(pool(tmp_path / "s", 6, 100), 4),
        [("What is <sks>?", "A dog.")],
        data,
        DataConfig(n_recognition=8),
        n_g=4,
    )
    assert m.image_path(m.records[0]).is_file()
    # Self-contained: the data directory can move.
    moved = tmp_path / "elsewhere"
    shutil.move(data, moved)
    assert read_manifest(moved).records == recs


def test_summary_table(tmp_path, photos):
    data, recs, header = _prepared(tmp_path, photos)
    table = summary_table(read_manifest(data))
    assert "recognition/pos" in table and "generation_soft" in table
    rows = [line.split() for line in table.splitlines() if line.startswith(" " * 20)]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(1, 2), (2, 2), (3, 2)]  # g-tokens, count per bin
    assert summary_table(header, [r.to_dict() for r in recs]) == table


def _rewrite(data, fn):
    lines = (data / MANIFEST).read_text().splitlines()
    (data / MANIFEST).write_text("\n".join(fn(lines)) + "\n")


def _set_image(line, value):
    d = json.loads(line)
    d["image"] = value
    return json.dumps(d)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ls: [ls[0], _set_image(ls[1], "../../etc/passwd")] + ls[2:], "outside the data directory"),
        (lambda ls: [ls[0], _set_image(ls[1], "images/../../x.png")] + ls[2:], "outside the data directory"),
        (
            lambda ls: [ls[0].replace('"manifest_version": 2', '"manifest_version": 1')] + ls[1:],
            "manifest_version 1",
        ),
        (lambda ls: ls[:3] + ["{not json"] + ls[4:], r"manifest.jsonl:4: not valid JSON"),
        (lambda ls: ls[:-1], "do not match the header counts"),
        (
            lambda ls: [ls[0], ls[1].replace('"flip"', '"flipped"')] + ls[2:],
            r"manifest.jsonl:2: .*unknown fields",
        ),
        (
            lambda ls: [ls[0], ls[1].replace('"Yes,', '"Maybe,')] + ls[2:],
            r"manifest.jsonl:2: .*must start with Yes,",
        ),
        (lambda ls: [ls[0], ls[2], ls[2]] + ls[3:], "duplicate record id"),
        (lambda ls: [], "is empty"),
    ],
)
def test_manifest_refuses_bad_files(tmp_path, photos, edit, message):
    data, _, _ = _prepared(tmp_path, photos)
    _rewrite(data, edit)
    with pytest.raises(DataError, match=message):
        read_manifest(data)


def test_manifest_refuses_symlinked_escape_and_missing_images(tmp_path, photos):
    data, recs, _ = _prepared(tmp_path, photos)
    secret = save_noise(tmp_path / "secret.png", 3)
    os.symlink(secret, data / "images" / "escape.png")
    _rewrite(data, lambda ls: [ls[0], _set_image(ls[1], "images/escape.png")] + ls[2:])
    with pytest.raises(DataError, match="outside the data directory"):
        read_manifest(data)
    data, recs, _ = _prepared(tmp_path / "again", photos)
    (data / recs[0].image).unlink()
    with pytest.raises(DataError, match="is missing from the data directory"):
        read_manifest(data)
    assert len(read_manifest(data, check_images=False).records) == len(recs)
    with pytest.raises(DataError, match="does not exist; run `yochameleon prepare`"):
        read_manifest(tmp_path / "nowhere")


def test_write_manifest_validates(tmp_path, photos):
    data, recs, _ = _prepared(tmp_path, photos)
    bad = [r.to_dict() for r in recs]
    bad[0]["image"] = "../outside.png"
    with pytest.raises(DataError, match="outside the data directory"):
        write_manifest(data, "bo", 4, bad)
    with pytest.raises(DataError, match="is for concept 'bo'"):
        write_manifest(data, "other", 4, recs)
    with pytest.raises(DataError, match="uses 4 g-tokens, the concept has 5"):
        write_manifest(data, "bo", 5, recs)
    assert read_manifest(data).records == recs  # the failed writes left the old manifest intact
