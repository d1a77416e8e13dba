"""Inputs at inference and indexing: photos, the pixel limit, test sets, concept names, model paths."""

from __future__ import annotations

import json
import logging
import re
import time
import unicodedata
import warnings

import pytest
from data_helpers import make_concept, png_header_only, save_noise

from yochameleon.backends import load_backend
from yochameleon.cli import main
from yochameleon.concept import ConceptSpec, attach, read_concept_file, save_concept
from yochameleon.config import from_dict
from yochameleon.data.concept_folder import ConceptFolder
from yochameleon.errors import BackendError, ConceptError, DataError
from yochameleon.eval.harness import TestSet
from yochameleon.eval.metrics import face_similarity
from yochameleon.infer import PersonalizedModel
from yochameleon.retrieval import TestEmbedder, build_index
from yochameleon.retrieval.index import RetrievalWarning
from yochameleon.train.config import TrainConfig

MAM_NFC = "m\u1eafm"
MAM_NFD = unicodedata.normalize("NFD", MAM_NFC)  # what macOS input can produce


@pytest.fixture
def bad_images(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    return {
        "missing": (tmp_path / "nope.png", "image .*nope.png does not exist"),
        "text": (text, "cannot use image .*notes.png: not a readable image"),
        "bomb": (
            png_header_only(tmp_path / "bomb.png", 30000, 30000),
            "bomb.png: decompression bomb \\(900,000,000 pixels is more than the limit of 80,000,000\\)",
        ),
        # 144 megapixels in a few bytes: under PIL's own error limit, over ours.
        "big": (
            png_header_only(tmp_path / "big.png", 12000, 12000),
            "big.png: decompression bomb \\(144,000,000 pixels \\(12000x12000\\) is more than the limit of 80,000,000\\)",
        ),
    }


def test_ask_image_gives_one_error_line_and_exit_2(tiny_dir, bad_images, capsys):
    for path, match in bad_images.values():
        code = main(["ask", "--model", str(tiny_dir), "--image", str(path), "Is <sks> here?"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        assert re.search(match, err[0]), err[0]


def test_library_image_paths_use_the_same_loader(backend, bad_images):
    pm = PersonalizedModel(backend)
    attach(backend, ConceptSpec("sks", n_g=2, n_u=2))
    for path, match in bad_images.values():
        with pytest.raises(DataError, match=match):
            pm.ask("Is <sks> here?", image=str(path))
        with pytest.raises(DataError, match=match):
            pm.recognize(path)


def test_face_similarity_paths_use_the_same_loader(bad_images):
    for path, match in bad_images.values():
        with pytest.raises(DataError, match=match):
            face_similarity([path], [path], backend=lambda image: None)


def test_index_skips_over_limit_images_and_warns_on_an_empty_pool(tmp_path):
    pool = tmp_path / "pool"
    save_noise(pool / "ok.png", 0)
    png_header_only(pool / "big.png", 12000, 12000)
    with pytest.warns(RetrievalWarning, match="over-limit"):
        index = build_index(pool, tmp_path / "idx", TestEmbedder(dim=8), progress=False)
    assert len(index) == 1 and index.report.skipped_paths == ["big.png"]
    (pool / "ok.png").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = build_index(pool, tmp_path / "idx2", TestEmbedder(dim=8), progress=False)
    assert len(index) == 0
    assert any("empty pool" in str(w.message) and "no usable images" in str(w.message) for w in caught)


def test_index_command_prints_the_empty_pool_warning_as_one_line(tmp_path, caplog):
    (tmp_path / "pool").mkdir()
    argv = ["index", str(tmp_path / "pool"), "--out", str(tmp_path / "idx"), "--embedder", "test"]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--no-progress"]) == 0
    assert any(r.getMessage().startswith("empty pool: ") for r in caplog.records)


def test_test_set_images_must_stay_inside_the_test_folder(tmp_path):
    root = tmp_path / "test"
    save_noise(root / "positives" / "a.png", 0)
    save_noise(tmp_path / "outside.png", 1)
    item = {"question": "What colour?", "options": {"A": "red", "B": "blue"}, "answer": "A"}
    for image in ("../outside.png", str(tmp_path / "outside.png")):
        (root / "vqa.json").write_text(json.dumps([{**item, "image": image}]))
        with pytest.raises(DataError, match="resolves outside the test directory"):
            TestSet.load(root)
    (root / "vqa.json").write_text(json.dumps([{**item, "image": "positives/a.png"}]))
    assert len(TestSet.load(root).vqa) == 1


def test_eval_refuses_a_bad_test_set_before_loading_the_model(tmp_path, capsys):
    root = tmp_path / "test"
    save_noise(root / "positives" / "a.png", 0)
    save_noise(tmp_path / "outside.png", 1)
    item = {"question": "What colour?", "options": {"A": "red", "B": "blue"}, "answer": "A"}
    (root / "vqa.json").write_text(json.dumps([{**item, "image": "../outside.png"}]))
    argv = ["eval", "--model", "outputs/no-such-model", "--method", "none", "--embedder", "test"]
    concept = make_concept(tmp_path / "c")
    argv += ["--concept", str(concept), "--test-dir", str(root), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    # The test set's error, not the (missing) model's: nothing was loaded first.
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image '../outside.png' resolves outside the test directory" in err[0], err


def test_prompt_naming_a_concept_that_is_not_attached(backend, caplog):
    attach(backend, ConceptSpec("sks", n_g=2, n_u=2))
    pm = PersonalizedModel(backend)
    with caplog.at_level(logging.WARNING, logger="yochameleon.infer"):
        pm.ask("Is <bo> a dog?", max_new_tokens=2)
    assert [r.getMessage() for r in caplog.records] == [
        "the prompt names <bo>, which is not an attached concept (attached: <sks>); it is read as plain text"
    ]
    with pytest.raises(
        ConceptError, match=r"names <bo>, which is not an attached concept \(attached: <sks>\)"
    ):
        PersonalizedModel(backend, strict=True).ask("Is <bo> a dog?", max_new_tokens=2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="yochameleon.infer"):
        pm.ask("Is <sks> a dog?", max_new_tokens=2)  # a known name is no warning
    assert not caplog.records


def test_strict_flag_on_the_cli(tiny_dir, tmp_path, capsys):
    backend = load_backend(tiny_dir)
    attach(backend, ConceptSpec("sks", n_g=2, n_u=2))
    st, _ = save_concept(backend, "sks", tmp_path / "sks")
    argv = ["ask", "--model", str(tiny_dir), "--concept", str(st), "--device", "cpu", "Is <bo> a dog?"]
    assert main([*argv, "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the prompt names <bo>") and "attached: <sks>" in err


def test_concept_names_are_nfc_everywhere(backend, tmp_path):
    tokens = attach(backend, ConceptSpec(MAM_NFD, n_g=2, n_u=2))
    assert tokens.spec.name == MAM_NFC
    pm = PersonalizedModel(backend, strict=True)
    for spelling in (MAM_NFC, MAM_NFD):
        _, used = pm._prompt_ids(f"What is <{spelling}>?", None)
        assert used == [tokens]
    st, js = save_concept(backend, MAM_NFD, tmp_path / MAM_NFD)
    assert st.name == f"{MAM_NFC}.safetensors" and json.loads(js.read_text())["name"] == MAM_NFC
    assert not (tmp_path / f"{MAM_NFD}.safetensors").exists()
    # The decomposed spelling of the file name finds the file written under the composed one.
    meta, _ = read_concept_file(tmp_path / f"{MAM_NFD}.safetensors")
    assert meta.name == MAM_NFC
    cfg = from_dict(TrainConfig, {"concept": {"name": MAM_NFD, "extra": [{"name": MAM_NFD + "2"}]}})
    assert cfg.concept.name == MAM_NFC and cfg.concept.extra[0]["name"] == MAM_NFC + "2"
    folder = ConceptFolder.load(make_concept(tmp_path / MAM_NFD))
    assert folder.name == MAM_NFC


def test_missing_local_model_path_fails_at_once_naming_make_tiny(tmp_path, capsys):
    for name in ("outputs/no-such-tiny-model", str(tmp_path / "model"), "./model", "a/b/c"):
        started = time.perf_counter()
        with pytest.raises(
            BackendError, match=r"does not exist; write a tiny test model there with `yochameleon make-tiny"
        ):
            load_backend(name)
        assert time.perf_counter() - started < 5
    assert main(["ask", "--model", "outputs/no-such-tiny-model", "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`yochameleon make-tiny outputs/no-such-tiny-model`" in err[0]
