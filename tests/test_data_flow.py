"""``prepare`` as the trainer and the CLI run it: :func:`prepare_concept` on a concept folder with a real
index, the token cache behind :func:`token_lookup`, and the hand-over to training, which refuses a
folder prepared with other settings."""

from __future__ import annotations

import pytest
import torch
from data_helpers import make_concept, pool

from yochameleon.config import load_config
from yochameleon.data.config import DataConfig, prepared_settings
from yochameleon.data.manifest import read_manifest, summary_table
from yochameleon.data.pipeline import load_training_data, prepare_concept, token_lookup
from yochameleon.errors import DataError
from yochameleon.retrieval import TestEmbedder, build_index
from yochameleon.train.config import TrainConfig


class FakeVQ:
    """The three members of a backend the token cache uses; an image's ids are two of its pixels."""

    preprocess_id = "pre-1"

    def __init__(self):
        self.images = 0

    def fingerprint(self) -> str:
        return "fake-vq"

    def encode_images(self, images):
        self.images += len(images)
        return torch.tensor([[im.getpixel((0, 0))[0], im.getpixel((im.width - 1, 0))[0]] for im in images])


class Answerer:
    def answer(self, question, image):
        return "Striped."


@pytest.fixture
def zebra(tmp_path):
    """A concept folder without qa.jsonl (the answerer is asked) and an index over a 20-image pool."""
    concept = make_concept(tmp_path / "zebra", 4, yaml_text="facts: [has a blue mark]\n")
    pool(tmp_path / "pool", 20, 100, size=(32, 32))
    build_index(tmp_path / "pool", tmp_path / "index", TestEmbedder(), progress=False)
    data = DataConfig(
        index_dir=str(tmp_path / "index"),
        n_recognition=12,
        n_hard_negatives=3,
        n_easy_negatives=3,
        n_soft_positives=9,
    )
    return concept, data


def test_prepare_concept_records_its_settings_and_a_second_prepare_encodes_nothing(tmp_path, zebra):
    concept, data = zebra
    header = prepare_concept(concept, tmp_path / "data", data, n_g=4, answerer=Answerer())
    manifest = read_manifest(tmp_path / "data")
    assert header == manifest.header
    assert header["settings"] == prepared_settings(data, 4, concept)
    assert header["settings"]["data.index_dir"] == str((tmp_path / "index").resolve())
    assert header["counts"] == {
        "generation_real": 4,  # the largest soft-positive bin has 3, fewer than the photos
        "generation_soft": 9,  # three bins of three for n_g = 4
        "recognition/neg_easy": 6,
        "recognition/neg_hard": 6,
        "recognition/pos": 12,
        "text_qa": 10 * 4 + 4,  # 10 attribute questions and 1 fact, once per photo
    }
    soft = [r for r in manifest.records if r.kind == "generation_soft"]
    assert [r.n_g for r in soft] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    # The nearest pool images double as hard negatives (they are the most similar soft positives).
    hard = {r.image for r in manifest.records if r.label == "neg_hard"}
    assert hard <= {r.image for r in soft[-3:]}
    assert "generation_soft" in summary_table(manifest)

    vq = FakeVQ()
    lookup = token_lookup(vq, manifest, progress=False, cache_dir=tmp_path / "cache")
    images = {r.image for r in manifest.records if r.image}
    assert lookup.cache.stats["encoded"] == len(images) and vq.images == 2 * len(images)  # with flips
    for r in manifest.records:
        if r.image:
            assert len(lookup(r.to_dict())) == 2

    again = FakeVQ()
    prepare_concept(concept, tmp_path / "data", data, n_g=4, answerer=Answerer())
    manifest2 = read_manifest(tmp_path / "data")
    lookup2 = token_lookup(again, manifest2, progress=False, cache_dir=tmp_path / "cache")
    assert again.images == 0 and lookup2.cache.stats["encoded"] == 0
    assert manifest2.records == manifest.records


def _recipe(concept, data_dir, *overrides):
    return load_config(
        TrainConfig,
        None,
        [
            f"concept.concept_dir={concept}",
            f"concept.data_dir={data_dir}",
            "concept.n_g=4",
            "data.n_recognition=12",
            *overrides,
        ],
    )


def test_training_refuses_a_folder_prepared_with_other_settings(tmp_path, zebra):
    concept, _ = zebra
    data_dir = tmp_path / "data"
    cfg = _recipe(concept, data_dir)
    prepare_concept(concept, data_dir, cfg.data, n_g=4, answerer=Answerer())
    entry = cfg.concept_entries()[0]
    records, _ = load_training_data(FakeVQ(), entry, data_dir, cfg)
    assert len(records) == sum(read_manifest(data_dir).counts.values())

    changed = _recipe(
        concept, data_dir, "data.n_recognition=8", "concept.n_g=8", f"data.index_dir={tmp_path}"
    )
    with pytest.raises(DataError) as exc:
        load_training_data(FakeVQ(), entry, data_dir, changed)
    message = str(exc.value)
    assert "data.n_recognition: prepared with 12, the recipe says 8" in message
    assert "concept.n_g: prepared with 4, the recipe says 8" in message
    assert f"data.index_dir: prepared with None, the recipe says {str(tmp_path.resolve())!r}" in message
    assert "data.flip" not in message and "data.reprepare=true" in message
    # Keys that only steer training are not compared.
    load_training_data(FakeVQ(), entry, data_dir, _recipe(concept, data_dir, "data.tasks=[recognition]"))


def test_reprepare_on_request_and_older_manifests(tmp_path, zebra, backend):
    concept, _ = zebra
    data_dir = tmp_path / "data"
    prepare_concept(concept, data_dir, _recipe(concept, data_dir).data, n_g=4, answerer=Answerer())
    cfg = _recipe(concept, data_dir, "data.n_recognition=5", "data.reprepare=true")
    records, lookup = load_training_data(backend, cfg.concept_entries()[0], data_dir, cfg)
    header = read_manifest(data_dir).header
    assert header["counts"]["recognition/pos"] == 5 and header["settings"]["data.n_recognition"] == 5
    assert sum(r["kind"] == "recognition" for r in records) == 5  # no index: positives only
    # A version-1 manifest records no settings: it is refused like a changed one.
    manifest = data_dir / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text(
        "\n".join([lines[0].replace('"manifest_version": 2', '"manifest_version": 1')] + lines[1:])
    )
    with pytest.raises(
        DataError, match="manifest_version: the folder has 1, this version of yochameleon writes 2"
    ):
        load_training_data(backend, cfg.concept_entries()[0], data_dir, _recipe(concept, data_dir))


def test_a_generation_prefix_longer_than_the_concepts_g_tokens_is_an_error(backend):
    from yochameleon.concept import ConceptSpec, attach
    from yochameleon.prompts import GENERATION_REQUEST
    from yochameleon.train.sequences import build_sequence

    tokens = attach(backend, ConceptSpec("sks", 4, 4))
    image = list(backend.special.image_token_ids[: backend.image_seq_len])
    record = {
        "id": "sks-00001",
        "task": "generation",
        "kind": "generation_real",
        "question": GENERATION_REQUEST,
        "image": "images/a.png",
        "n_g": 4,
    }
    sequence = build_sequence(backend, record, tokens, image, self_prompting=True)
    target = [t for t in sequence.labels if t != -100]
    assert target[:5] == [*tokens.g_ids, backend.special.boi]  # all four g-tokens, then the image
    # Data prepared for 8 g-tokens on a 4-token concept: an error, never a prefix cut to 4.
    with pytest.raises(DataError, match="asks for 8 g-tokens, but concept 'sks' has 4"):
        build_sequence(backend, {**record, "n_g": 8}, tokens, image, self_prompting=True)
