"""Concept folders (concept.yaml, qa.jsonl, photos) and the Yo'LLaVA / Yo'Chameleon importers."""

from __future__ import annotations

import json
import logging
import os

import pytest
from data_helpers import make_concept, save_noise, skimage_photo

from yochameleon.data.concept_folder import ConceptFolder
from yochameleon.data.importers import import_yochameleon_json, import_yollava
from yochameleon.errors import DataError


def test_full_concept_folder(tmp_path):
    root = make_concept(
        tmp_path / "my-dog",
        4,
        yaml_text="name: bo\ncategory: dog\nis_person: false\ndescription: <sks> is a shiba.\n"
        "facts: [likes walks, ' has a red collar ']\n",
        qa_lines=[
            {"question": "What colour is <sks>?", "answer": "Orange."},
            "",
            {"question": "Is <sks> fluffy?", "answer": "Yes."},
        ],
    )
    folder = ConceptFolder.load(root)
    assert folder.name == "bo" and folder.category == "dog" and folder.is_person is False
    assert folder.description == "<sks> is a shiba." and folder.facts == ["likes walks", "has a red collar"]
    assert folder.qa == [("What colour is <sks>?", "Orange."), ("Is <sks> fluffy?", "Yes.")]
    assert [p.name for p in folder.photo_paths] == ["p0.png", "p1.png", "p2.png", "p3.png"]
    assert folder.report.n_skipped == 0


def test_defaults_without_yaml_or_qa(tmp_path):
    folder = ConceptFolder.load(make_concept(tmp_path / "mug_2", 3))
    assert (folder.name, folder.category, folder.is_person, folder.description, folder.facts, folder.qa) == (
        "mug_2",
        "object",
        False,
        "",
        [],
        [],
    )


def test_missing_folder_and_photos(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ConceptFolder.load(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        ConceptFolder.load(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no photos/ folder"):
        ConceptFolder.load(tmp_path / "empty")
    root = make_concept(tmp_path / "two", 2)
    with pytest.raises(DataError, match="2 usable photos, at least 3"):
        ConceptFolder.load(root)
    assert len(ConceptFolder.load(root, min_photos=2).photos) == 2


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("name: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("nmae: x\n", r"unknown keys \['nmae'\]"),
        ("name: 'bad name'\n", "invalid concept name"),
        ("name: 12\n", "name must be a string"),
        ("is_person: 'yes'\n", "is_person must be true or false"),
        ("facts: likes walks\n", "facts must be a list"),
        ("facts: ['', x]\n", "facts must be a list of non-empty strings"),
        ("category: ''\n", "category must not be empty"),
    ],
)
def test_bad_concept_yaml(tmp_path, yaml_text, message):
    root = make_concept(tmp_path / "c", 3, yaml_text=yaml_text)
    with pytest.raises(DataError, match=message):
        ConceptFolder.load(root)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question": "Is <sks> red?", "answer": "No."}', "{oops"], r"qa.jsonl:2: not valid JSON"),
        (['{"question": "Is <sks> red?"}'], r"qa.jsonl:1: each line needs string fields"),
        (['["Is <sks> red?", "No."]'], r"qa.jsonl:1: each line needs"),
        (
            ["", '{"question": "Is <sks> red?", "answer": "  "}'],
            r"qa.jsonl:2: question and answer must not be empty",
        ),
        (
            ['{"question": "Is it red?", "answer": "No."}'],
            r"qa.jsonl:1: the question must name the concept as <sks>",
        ),
    ],
)
def test_bad_qa_lines_name_the_line(tmp_path, lines, message):
    root = make_concept(tmp_path / "c", 3, qa_lines=lines)
    with pytest.raises(DataError, match=message):
        ConceptFolder.load(root)


def test_symlinks_bounded_by_the_concept_folder(tmp_path):
    root = make_concept(tmp_path / "c", 3)
    save_noise(root / "more" / "x.png", 50)
    os.symlink(root / "more" / "x.png", root / "photos" / "in.png")
    os.symlink(save_noise(tmp_path / "elsewhere.png", 51), root / "photos" / "out.png")
    folder = ConceptFolder.load(root)
    assert "in.png" in [p.name for p in folder.photo_paths]
    assert folder.report.skipped == {"symlink outside the concept folder": 1}


def test_many_photos_warn_but_load(tmp_path, caplog):
    root = make_concept(tmp_path / "c", 12)
    with caplog.at_level(logging.WARNING):
        assert len(ConceptFolder.load(root).photos) == 12
    assert "designed for 3–10" in caplog.text


# ----- importers ------------------------------------------------------------------------------------


def _yollava_dataset(tmp_path):
    ds = tmp_path / "yollava-data"
    train = ds / "train" / "bo"
    train.mkdir(parents=True)
    for i, name in enumerate(["astronaut", "coffee", "rocket"]):
        skimage_photo(name).resize((64, 64)).save(train / f"{i}.png")
    (train / "3.png").write_bytes((train / "0.png").read_bytes())  # a duplicate file
    save_noise(train / "negative_example" / "n0.png", 9)  # must not be imported
    qa = tmp_path / "text_qa.json"
    qa.write_text(
        json.dumps(
            {
                "bo": {
                    "0": {
                        "question": "Is sks a dog or a cat?",
                        "option": {"A": "Dog", "B": "Cat"},
                        "correct_answer": "A",
                    },
                    "1": {
                        "question": "What is sks's breed?",
                        "options": {"A": "Corgi", "B": "Shiba inu"},
                        "correct_answer": "B",
                    },
                },
                "other": {},
            }
        )
    )
    caps = tmp_path / "captions.json"
    caps.write_text(json.dumps({"bo": "<sks> is a shiba who likes asks."}))
    return ds, qa, caps


def test_import_yollava_dataset_root(tmp_path):
    ds, qa, caps = _yollava_dataset(tmp_path)
    out = import_yollava(ds, tmp_path / "bo", "bo", qa, caps)
    folder = ConceptFolder.load(out)
    assert folder.name == "bo" and len(folder.photos) == 3  # duplicate and negative_example/ left out
    assert folder.qa == [("Is <sks> a dog or a cat?", "Dog"), ("What is <sks>'s breed?", "Shiba inu")]
    assert folder.description == "<sks> is a shiba who likes asks."  # "asks" is not the identifier
    with pytest.raises(DataError, match="already holds photos"):
        import_yollava(ds / "train" / "bo", tmp_path / "bo", "bo")
    assert import_yollava(ds / "train" / "bo", tmp_path / "bo", "bo", overwrite=True) == tmp_path / "bo"


def test_import_yollava_errors(tmp_path):
    ds, qa, caps = _yollava_dataset(tmp_path)
    with pytest.raises(DataError, match="no concept 'zz'"):
        import_yollava(ds / "train" / "bo", tmp_path / "o1", "zz", qa)
    bad = tmp_path / "bad_qa.json"
    bad.write_text(
        json.dumps({"bo": {"0": {"question": "Is sks red?", "option": {"A": "y"}, "correct_answer": "C"}}})
    )
    with pytest.raises(DataError, match=r"\['bo'\]\['0'\] needs a question, an option mapping"):
        import_yollava(ds, tmp_path / "o2", "bo", bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        import_yollava(ds, tmp_path / "o3", "bo", tmp_path / "broken.json")
    with pytest.raises(DataError, match="no caption for 'bo'"):
        import_yollava(ds, tmp_path / "o4", "bo", captions_json=qa)
    with pytest.raises(DataError, match="does not exist"):
        import_yollava(tmp_path / "missing", tmp_path / "o5", "bo")
    with pytest.raises(DataError, match="no photos of 'zz'"):
        import_yollava(ds, tmp_path / "o6", "zz")


def _entry(image, human, bot):
    return {
        "image": [image],
        "conversations": [{"from": "human", "value": human}, {"from": "bot", "value": bot}],
    }


def test_import_yochameleon_training_json(tmp_path):
    real = tmp_path / "somewhere" / "yochameleon-data"
    photos = [save_noise(real / "train" / "bo" / f"{i}.png", i, (64, 64)) for i in range(4)]
    negs = [save_noise(real / "train" / "bo" / "negative_example" / f"n{i}.png", 20 + i) for i in range(2)]
    authors = "/mnt/localssd/code/data/yochameleon-data"  # the released files' absolute paths

    def a(p):
        return f"{authors}/{p.relative_to(real).as_posix()}"

    recognition = [
        _entry(a(photos[0]), "Is <sks> in this photo?<image>", "Yes, <sks> is in this photo."),
        _entry(a(photos[1]), "Can you see <sks>?<image>", "Yes, I can see <sks>."),
        _entry(a(negs[0]), "Is <sks> in this photo?<image>", "No, <sks> is not in this photo."),
    ]
    text = [
        _entry(a(photos[0]), "What color is <sks>?", "<sks> is orange."),
        _entry(a(photos[1]), "What color is <sks>?", "Mostly orange."),
        _entry(a(photos[1]), "What color is <sks>?", "Mostly orange."),
    ]
    g = "".join(f"<reserved{16201 + i}>" for i in range(4))
    gen = [
        _entry(a(p), f"<reserved16200> is {g}. A photo of <reserved16200>.", "<image>") for p in photos[2:]
    ]
    gen += [
        _entry(a(negs[1]), "A photo of <reserved16201>.", "<image>"),
        _entry(
            a(negs[0]),
            "<reserved16200> is <reserved16201><reserved16202>. A photo of <reserved16200>.",
            "<image>",
        ),
    ]
    files = []
    for name, data in [
        ("recognition.json", recognition),
        ("text_conversation.json", text),
        ("1000.json", gen),
    ]:
        (tmp_path / name).write_text(json.dumps(data))
        files.append(tmp_path / name)
    with pytest.raises(DataError, match="no positive images found"):
        import_yochameleon_json(files, tmp_path / "x", "bo")
    out = import_yochameleon_json(files, tmp_path / "bo", "bo", image_root=real, description="a shiba")
    folder = ConceptFolder.load(out)
    imported = sorted(p.read_bytes() for p in folder.photo_paths)
    assert imported == sorted(
        p.read_bytes() for p in photos
    )  # positives only, soft positives/negatives left out
    assert folder.qa == [
        ("What color is <sks>?", "<sks> is orange."),
        ("What color is <sks>?", "Mostly orange."),
    ]
    assert folder.description == "a shiba"


def test_import_yochameleon_json_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="must be a list of entries"):
        import_yochameleon_json([tmp_path / "a.json"], tmp_path / "o", "bo")
    (tmp_path / "b.json").write_text(json.dumps([{"image": ["x.png"], "conversations": [{"from": "human"}]}]))
    with pytest.raises(DataError, match=r"b.json\[0\]: 'conversations' must be a list"):
        import_yochameleon_json([tmp_path / "b.json"], tmp_path / "o", "bo")
    with pytest.raises(DataError, match="does not exist"):
        import_yochameleon_json([tmp_path / "missing.json"], tmp_path / "o", "bo")
