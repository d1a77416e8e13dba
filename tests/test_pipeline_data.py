"""Concept data: bad photos, concept folders, records, manifest, token cache and ``prepare``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from yochameleon.data.concept_folder import ConceptFolder, import_yollava
from yochameleon.data.config import DataConfig
from yochameleon.data.manifest import read_manifest, summary_table, write_manifest
from yochameleon.data.photos import load_photos, load_rgb
from yochameleon.data.pipeline import prepare_concept, token_lookup
from yochameleon.data.records import build_records
from yochameleon.data.token_cache import TokenCache
from yochameleon.errors import ConfigError, DataError


def _photo(path: Path, seed: int, mode: str = "RGB", size=(48, 40)) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


@pytest.fixture
def concept_dir(tmp_path, photos):
    root = tmp_path / "cat"
    (root / "photos").mkdir(parents=True)
    for i, im in enumerate(photos[:4]):
        im.resize((80, 64)).save(root / "photos" / f"p{i}.png")
    (root / "concept.yaml").write_text(
        "name: cat\ncategory: cat\ndescription: a tabby\nfacts: [green eyes]\n"
    )
    (root / "qa.jsonl").write_text(json.dumps({"question": "What is <sks>?", "answer": "A cat."}) + "\n")
    return root


def test_bad_files_are_skipped_and_counted(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(3):
        _photo(d / f"ok{i}.png", i)
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("hello")
    (d / "fake.jpg").write_text("not a jpeg")
    good = (d / "ok0.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "zz_dup.png").write_bytes(good)
    outside = _photo(tmp_path / "outside.png", 9)
    os.symlink(outside, d / "link.png")
    report = load_photos(d)
    assert sorted(p.path.name for p in report.photos) == ["ok0.png", "ok1.png", "ok2.png"]
    assert report.skipped["empty file"] == 1 and report.skipped["duplicate photo"] == 1
    assert (
        report.skipped["not an image file"] == 1 and report.skipped["symlink outside the concept folder"] == 1
    )
    assert report.skipped["not a readable image"] == 2  # fake.jpg and truncated.png


def test_too_few_photos_is_an_error_naming_what_was_skipped(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    _photo(d / "a.png", 0)
    (d / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"1 usable photos, at least 3.*b.png: empty file"):
        load_photos(d)
    with pytest.raises(DataError, match="does not exist"):
        load_photos(tmp_path / "missing")


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    import yochameleon.data.photos as ph

    p = _photo(tmp_path / "big.png", 0, size=(400, 400))
    monkeypatch.setattr(ph, "MAX_PIXELS", 10_000)
    with pytest.raises(DataError, match="decompression bomb"):
        load_rgb(p)


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "L", "I;16"])
def test_odd_modes_become_rgb(tmp_path, mode):
    p = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    if mode == "I;16":
        Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(p)
    elif mode in ("RGBA", "LA"):
        im = Image.new(mode, (8, 8), (10, 20, 30, 0) if mode == "RGBA" else (10, 0))
        im.save(p)
    else:
        _photo(p, 0, mode=mode)
    im = load_rgb(p)
    assert im.mode == "RGB"
    if mode in ("RGBA", "LA"):
        assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent pixels land on white
    if mode == "I;16":
        arr = np.asarray(im)
        assert arr.min() == 0 and arr.max() == 255  # full 16-bit range scaled, not clipped


def test_tiny_and_huge_images(tmp_path):
    tiny = _photo(tmp_path / "t.png", 0, size=(3, 2))
    huge = _photo(tmp_path / "h.png", 1, size=(4000, 3000))
    assert load_rgb(tiny).size == (3, 2) and load_rgb(huge).size == (4000, 3000)


def test_concept_folder_metadata_and_errors(concept_dir):
    folder = ConceptFolder.load(concept_dir)
    assert (
        folder.name == "cat"
        and folder.facts == ["green eyes"]
        and folder.qa == [("What is <sks>?", "A cat.")]
    )
    (concept_dir / "qa.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"qa.jsonl:1: each line needs"):
        ConceptFolder.load(concept_dir)
    (concept_dir / "qa.jsonl").unlink()
    (concept_dir / "concept.yaml").write_text("nmae: x\n")
    with pytest.raises(DataError, match="unknown keys"):
        ConceptFolder.load(concept_dir)
    (concept_dir / "concept.yaml").write_text("name: 'bad name'\n")
    with pytest.raises(DataError, match="invalid concept name"):
        ConceptFolder.load(concept_dir)


def test_import_yollava_layout(tmp_path):
    src = tmp_path / "yollava" / "bo"
    src.mkdir(parents=True)
    for i in range(3):
        _photo(src / f"{i}.png", i)
    qa = tmp_path / "text_qa.json"
    qa.write_text(
        json.dumps(
            {
                "bo": {
                    "0": {
                        "question": "Is sks a dog or a cat?",
                        "option": {"A": "Dog", "B": "Cat"},
                        "correct_answer": "A",
                    }
                }
            }
        )
    )
    caps = tmp_path / "captions.json"
    caps.write_text(json.dumps({"bo": "sks is a corgi."}))
    out = import_yollava(src, tmp_path / "bo", "bo", qa, caps)
    folder = ConceptFolder.load(out)
    assert folder.qa == [("Is <sks> a dog or a cat?", "Dog")] and folder.description == "<sks> is a corgi."


def test_records_balance_and_answers(tmp_path, concept_dir):
    photos = sorted((concept_dir / "photos").glob("*.png"))
    negs = [_photo(tmp_path / f"n{i}.png", 100 + i) for i in range(6)]
    soft = [(_photo(tmp_path / f"s{i}.png", 200 + i), 0.1 * i, 1 + i // 2) for i in range(6)]
    recs = build_records(
        "cat",
        photos,
        negs[:3],
        negs[3:],
        soft,
        [("What is <sks>?", "A cat.")],
        tmp_path / "data",
        DataConfig(n_recognition=20),
        n_g=4,
    )
    rec = [r for r in recs if r["kind"] == "recognition"]
    pos = [r for r in rec if r["label"] == "pos"]
    assert len(pos) == 20 and len(rec) - len(pos) == 20
    assert all(r["answer"].startswith("Yes,") for r in pos)
    assert all(r["answer"].startswith("No,") for r in rec if r["label"] != "pos")
    assert {r["label"] for r in rec} == {"pos", "neg_hard", "neg_easy"}
    assert any(r["flip"] for r in pos) and any(not r["flip"] for r in pos)
    assert len({r["question"] for r in rec}) > 5
    real = [r for r in recs if r["kind"] == "generation_real"]
    assert all(r["n_g"] == 4 for r in real) and len(real) >= len(photos)
    gen_soft = [r for r in recs if r["kind"] == "generation_soft"]
    assert [r["n_g"] for r in gen_soft] == [1, 1, 2, 2, 3, 3] and all(
        r["prompt_form"] == "paper" for r in gen_soft
    )
    assert all((tmp_path / "data" / r["image"]).is_file() for r in recs if r["image"])


def test_manifest_round_trip_and_outside_paths(tmp_path, concept_dir):
    data = tmp_path / "data"
    photos = sorted((concept_dir / "photos").glob("*.png"))
    recs = build_records("cat", photos, [], [], [], [], data, DataConfig(n_recognition=4), n_g=4)
    header = write_manifest(data, "cat", 4, recs)
    m = read_manifest(data)
    assert m.header == header and m.record_dicts() == recs
    assert "recognition" in summary_table(m)
    bad = [dict(recs[0], image="../../etc/passwd")]
    with pytest.raises(DataError, match="outside the data directory"):
        write_manifest(data, "cat", 4, bad)
    # A hand-edited manifest that escapes the data directory is refused on read too.
    lines = (data / "manifest.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["image"] = "../../etc/passwd"
    (data / "manifest.jsonl").write_text("\n".join([lines[0], json.dumps(rec), *lines[2:]]) + "\n")
    with pytest.raises(DataError, match="outside the data directory"):
        read_manifest(data)


class _CountingEncoder:
    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, images):
        out = []
        for im in images:
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise RuntimeError("killed")
            self.calls += 1
            out.append([int(v) for v in np.asarray(im.resize((2, 2))).reshape(-1)[:4]])
        return out


def test_token_cache_encodes_once_and_survives_a_crash(tmp_path):
    paths = [_photo(tmp_path / f"i{i}.png", i) for i in range(5)]
    cache = TokenCache(tmp_path / "cache", "fp", "pre")
    crashing = _CountingEncoder(fail_after=4)
    with pytest.raises(RuntimeError):
        cache.ensure(paths, crashing, batch_size=2)
    enc = _CountingEncoder()
    TokenCache(tmp_path / "cache", "fp", "pre").ensure(paths, enc, batch_size=2)
    assert enc.calls == 10 - 4  # (image, flip) pairs not finished before the crash
    again = _CountingEncoder()
    assert TokenCache(tmp_path / "cache", "fp", "pre").ensure(paths, again) == 0 and again.calls == 0
    # Another backend fingerprint is another cache.
    other = _CountingEncoder()
    TokenCache(tmp_path / "cache", "fp2", "pre").ensure(paths[:1], other)
    assert other.calls == 2
    c = TokenCache(tmp_path / "cache", "fp", "pre")
    assert c.get(paths[0], flip=False) is not None and c.get(paths[0], flip=True) is not None


def test_prepare_then_second_prepare_encodes_nothing(backend, concept_dir, tmp_path, photos):
    from yochameleon.retrieval import TestEmbedder, build_index

    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(12):
        _photo(pool / f"pool{i}.png", 300 + i)
    build_index(pool, tmp_path / "index", TestEmbedder(), progress=False)
    opts = DataConfig(
        index_dir=str(tmp_path / "index"),
        n_recognition=8,
        n_hard_negatives=4,
        n_easy_negatives=4,
        n_soft_positives=6,
    )
    header = prepare_concept(concept_dir, tmp_path / "data", opts, n_g=4)
    assert header["counts"]["recognition/neg_hard"] == 4 and header["counts"]["generation_soft"] == 6
    m = read_manifest(tmp_path / "data")
    first = token_lookup(backend, m, progress=False, cache_dir=tmp_path / "cache")
    assert first.cache.stats["encoded"] > 0
    rec = next(r for r in m.record_dicts() if r["image"])
    assert len(first(rec)) == backend.image_seq_len
    prepare_concept(concept_dir, tmp_path / "data", opts, n_g=4)
    second = token_lookup(
        backend, read_manifest(tmp_path / "data"), progress=False, cache_dir=tmp_path / "cache"
    )
    assert second.cache.stats["encoded"] == 0


def test_prepare_without_index_and_empty_pool_degrade(backend, concept_dir, tmp_path):
    from yochameleon.retrieval import TestEmbedder, build_index

    header = prepare_concept(concept_dir, tmp_path / "d1", DataConfig(n_recognition=4), n_g=4)
    assert "recognition/neg_hard" not in header["counts"] and header["counts"]["recognition/pos"] == 4
    (tmp_path / "empty").mkdir()
    build_index(tmp_path / "empty", tmp_path / "eidx", TestEmbedder(), progress=False)
    with pytest.warns(UserWarning):
        header = prepare_concept(
            concept_dir, tmp_path / "d2", DataConfig(index_dir=str(tmp_path / "eidx"), n_recognition=4), n_g=4
        )
    assert "generation_soft" not in header["counts"]


def test_index_built_with_another_embedder_refused(tmp_path):
    from yochameleon.retrieval import IndexMismatchError, TestEmbedder, build_index, load_index

    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        _photo(pool / f"p{i}.png", i)
    build_index(pool, tmp_path / "idx", TestEmbedder(dim=32), progress=False)
    with pytest.raises(IndexMismatchError):
        load_index(tmp_path / "idx").check_embedder(TestEmbedder(dim=64))


def test_text_qa_from_an_answerer_when_no_qa_file(backend, concept_dir, tmp_path):
    from yochameleon.data.pipeline import base_model_answerer

    (concept_dir / "qa.jsonl").unlink()

    class Constant:
        def answer(self, question, image):
            return "It is a tabby cat."

    header = prepare_concept(
        concept_dir, tmp_path / "d", DataConfig(n_recognition=4), n_g=4, answerer=Constant()
    )
    qa = [r for r in read_manifest(tmp_path / "d").record_dicts() if r["kind"] == "text_qa"]
    assert qa and all(r["answer"] == "It is a tabby cat." for r in qa if "tabby" in r["answer"])
    assert header["counts"]["text_qa"] == len(qa)
    # The default answerer is the base model itself, asked the rendered prompt about the photo.
    from yochameleon.data.qa import DEFAULT_SUBJECT
    from yochameleon.infer import PersonalizedModel
    from yochameleon.prompts import answerer_prompt

    photo = Image.new("RGB", (64, 64), (30, 120, 200))
    answer = base_model_answerer(backend).answer("What colour is <sks>?", photo)
    prompt = answerer_prompt("What colour is <sks>?", DEFAULT_SUBJECT)
    assert answer == PersonalizedModel(backend).ask(prompt, image=photo, max_new_tokens=24)


def test_recipe_text_qa_repeats_sets_how_often_each_qa_pair_is_asked(concept_dir, tmp_path):
    from yochameleon.config import load_config
    from yochameleon.train.config import TrainConfig

    n_pairs = sum(1 for line in (concept_dir / "qa.jsonl").read_text().splitlines() if line.strip())
    counts = {}
    for repeats in (1, 3):
        cfg = load_config(TrainConfig, None, [f"data.text_qa_repeats={repeats}", "data.n_recognition=4"])
        prepare_concept(concept_dir, tmp_path / f"d{repeats}", cfg.data, n_g=4)
        records = read_manifest(tmp_path / f"d{repeats}").record_dicts()
        counts[repeats] = sum(r["kind"] == "text_qa" for r in records)
    # qa.jsonl rows and the facts of concept.yaml, each asked once, then three times.
    assert counts[1] >= n_pairs > 0 and counts[3] == 3 * counts[1]
    with pytest.raises(ConfigError, match="text_qa_repeats"):
        DataConfig(text_qa_repeats=0)
