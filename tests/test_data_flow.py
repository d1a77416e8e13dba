"""The order ``prepare`` calls the data pieces in, with mining results as plain inputs and a fake encoder."""

from __future__ import annotations

from data_helpers import make_concept, pool, spec_bins

from yochameleon.data.concept_folder import ConceptFolder
from yochameleon.data.manifest import read_manifest, summary_table, write_manifest
from yochameleon.data.qa import facts_to_qa, generate_text_qa
from yochameleon.data.records import RecordOptions, make_records
from yochameleon.data.token_cache import TokenCache
from yochameleon.prompts import attribute_questions


class Encoder:
    def __init__(self):
        self.images = 0

    def __call__(self, images):
        self.images += len(images)
        return [[im.getpixel((0, 0))[0], im.getpixel((im.width - 1, 0))[0]] for im in images]


class Answerer:
    def answer(self, question, image):
        return "Striped."


def prepare(concept_dir, data_dir, cache_dir, mined, encoder):
    folder = ConceptFolder.load(concept_dir)
    qa = (
        folder.qa
        or generate_text_qa(
            folder.photo_paths, attribute_questions(folder.is_person), Answerer(), progress=False
        ).pairs
    )
    qa = qa + facts_to_qa(folder.facts)
    opts = RecordOptions(n_g=4, n_recognition=12)
    records = make_records(
        folder.name, folder.photo_paths, mined["hard"], mined["easy"], mined["soft"], qa, data_dir, opts
    )
    write_manifest(data_dir, folder.name, opts.n_g, records)
    manifest = read_manifest(data_dir)
    cache = TokenCache(cache_dir, "fake-vq", "pre-1")
    images = sorted({manifest.image_path(r) for r in manifest.records if r.image})
    cache.ensure(images, encoder, progress=False)
    return manifest, cache, summary_table(manifest)


def test_prepare_twice_encodes_nothing_the_second_time(tmp_path):
    concept = make_concept(tmp_path / "zebra", 4, yaml_text="facts: [has a blue mark]\n")
    soft = pool(tmp_path / "pool", 9, 100)
    mined = {
        "hard": soft[-3:],
        "easy": pool(tmp_path / "rand", 3, 200),
        "soft": [(p, i / 10, m) for i, (p, m) in enumerate(zip(soft, spec_bins(9, 4), strict=True))],
    }
    enc = Encoder()
    manifest, cache, table = prepare(concept, tmp_path / "data", tmp_path / "cache", mined, enc)
    # 4 photos + 9 soft positives (the hard negatives are among them) + 3 random: each once, with its flip.
    assert cache.stats["encoded"] == 4 + 9 + 3 and enc.images == 2 * 16
    assert manifest.counts["text_qa"] == 10 * 4 + 4  # 10 default questions and 1 fact, once per photo
    assert "generation_soft" in table
    for r in manifest.records:
        if r.image:
            assert cache.get(manifest.image_path(r), r.flip) is not None
    again = Encoder()
    manifest2, cache2, _ = prepare(concept, tmp_path / "data", tmp_path / "cache", mined, again)
    assert again.images == 0 and cache2.stats["encoded"] == 0 and manifest2.records == manifest.records
