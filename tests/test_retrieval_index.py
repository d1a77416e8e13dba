"""ImageIndex: build, resume, add, save/load, search, embedder checks and bad pool files."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from yochameleon.errors import ConfigError, DataError
from yochameleon.retrieval import (
    ImageIndex,
    IndexMismatchError,
    IndexParams,
    RetrievalWarning,
    TestEmbedder,
    build_index,
    list_pool_images,
    load_index,
)


def _pattern(seed: int, size: int = 32) -> Image.Image:
    """A smooth random colour pattern; different seeds give clearly different images."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)


def _make_pool(root: Path, count: int, start_seed: int = 0) -> list[Path]:
    paths = []
    for i in range(count):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        ext = [".png", ".jpg", ".webp", ".bmp"][i % 4]
        path = sub / f"img_{start_seed + i:04d}{ext}"
        _pattern(start_seed + i).save(path)
        paths.append(path)
    return paths


class CountingEmbedder:
    """Wraps an embedder, counting embedded images and optionally failing after ``fail_after`` of them."""

    def __init__(self, inner, fail_after: int | None = None) -> None:
        self.inner = inner
        self.fail_after = fail_after
        self.embedded = 0

    identity = property(lambda self: self.inner.identity)
    dim = property(lambda self: self.inner.dim)

    def embed_images(self, images, progress=True):
        if self.fail_after is not None and self.embedded + len(images) > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.embedded += len(images)
        return self.inner.embed_images(images, progress=progress)

    def embed_texts(self, texts, progress=True):
        return self.inner.embed_texts(texts, progress=progress)


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    root = tmp_path / "pool"
    _make_pool(root, 24)
    return root


def test_build_saves_index_that_finds_each_image_itself(pool: Path, tmp_path: Path):
    embedder = TestEmbedder(dim=32)
    index = build_index(pool, tmp_path / "idx", embedder, progress=False)
    assert len(index) == 24 and index.kind == "flat"
    assert index.report.embedded == 24 and index.report.skipped == 0

    out = tmp_path / "idx"
    assert {p.name for p in out.iterdir()} >= {"meta.json", "entries.jsonl", "index.faiss", "vectors"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["embedder"] == embedder.identity and meta["pool_root"] == str(pool.resolve())
    entries = [json.loads(line) for line in (out / "entries.jsonl").read_text().splitlines()]
    assert all(not Path(e["path"]).is_absolute() and (pool / e["path"]).is_file() for e in entries)

    loaded = load_index(out)
    target = loaded.entries.index(next(e for e in loaded.entries if e.path.endswith("img_0006.webp")))
    scores, ids = loaded.search_with(embedder, images=[loaded.path_of(target)], k=3)
    assert ids[0, 0] == target and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert scores[0, 0] >= scores[0, 1] >= scores[0, 2]
    assert loaded.path_of(target) == pool.resolve() / loaded.entries[target].path
    # Saved and in-memory indexes agree.
    vectors = embedder.embed_images([loaded.path_of(i) for i in range(5)], progress=False)
    np.testing.assert_array_equal(index.search(vectors, 4)[1], loaded.search(vectors, 4)[1])


def test_pool_scan_is_recursive_filters_extensions_and_skips_out_dir(pool: Path, tmp_path: Path):
    (pool / "notes.txt").write_text("not an image")
    (pool / ".hidden.png").write_bytes(b"")
    _pattern(99).save(pool / "UPPER.JPEG")
    found = list_pool_images(pool)
    assert len(found) == 25 and all(p.suffix.lower() != ".txt" for p in found)
    # An index written inside the pool is not indexed itself.
    inner_out = pool / "my-index"
    index = build_index(pool, inner_out, TestEmbedder(dim=16), progress=False)
    assert len(index) == 25
    _pattern(100).save(inner_out / "stray.png")
    assert len(build_index(pool, inner_out, TestEmbedder(dim=16), progress=False)) == 25
    with pytest.raises(DataError, match="not a directory"):
        list_pool_images(tmp_path / "missing")


def test_symlinks_out_of_the_pool_are_not_followed(pool: Path, tmp_path: Path):
    outside = tmp_path / "outside.png"
    _pattern(500).save(outside)
    os.symlink(outside, pool / "escape.png")
    os.symlink(pool / "part0" / "img_0000.png", pool / "inside-link.png")
    with pytest.warns(RetrievalWarning, match="symlink out of the pool"):
        found = list_pool_images(pool)
    names = {p.name for p in found}
    assert "escape.png" not in names and "inside-link.png" in names


def test_unreadable_images_are_skipped_with_warning_and_count(pool: Path, tmp_path: Path):
    (pool / "empty.png").write_bytes(b"")
    (pool / "text.jpg").write_text("this is not a jpeg")
    good = pool / "part0" / "img_0000.png"
    (pool / "truncated.png").write_bytes(good.read_bytes()[:60])
    with pytest.warns(RetrievalWarning, match="unreadable"):
        index = build_index(pool, tmp_path / "idx", TestEmbedder(dim=16), progress=False)
    assert index.report.skipped == 3
    assert sorted(index.report.skipped_paths) == ["empty.png", "text.jpg", "truncated.png"]
    assert len(index) == 24


def test_interrupted_build_resumes_without_re_embedding(pool: Path, tmp_path: Path):
    out = tmp_path / "idx"
    failing = CountingEmbedder(TestEmbedder(dim=32), fail_after=10)
    with pytest.raises(KeyboardInterrupt):
        build_index(pool, out, failing, batch_size=4, progress=False)
    assert failing.embedded == 8  # two chunks of 4 were committed before the third failed
    with pytest.raises(DataError, match="incomplete"):
        load_index(out)

    resumed = CountingEmbedder(TestEmbedder(dim=32))
    index = build_index(pool, out, resumed, batch_size=4, progress=False)
    assert resumed.embedded == 24 - 8
    assert index.report.reused == 8 and index.report.embedded == 16

    fresh = build_index(pool, tmp_path / "fresh", TestEmbedder(dim=32), batch_size=4, progress=False)
    queries = TestEmbedder(dim=32).embed_images([_pattern(s) for s in range(6)], progress=False)
    for got, want in zip(index.search(queries, 5), fresh.search(queries, 5)):
        np.testing.assert_array_equal(got, want)
    assert [e.path for e in index.entries] == [e.path for e in fresh.entries]

    # A finished index re-run embeds nothing; a new pool image is the only one embedded.
    again = CountingEmbedder(TestEmbedder(dim=32))
    build_index(pool, out, again, progress=False)
    assert again.embedded == 0
    _pattern(777).save(pool / "new.png")
    once_more = CountingEmbedder(TestEmbedder(dim=32))
    assert len(build_index(pool, out, once_more, progress=False)) == 25
    assert once_more.embedded == 1

    # Renamed or duplicated files are recognised by content and not embedded again either.
    (pool / "new.png").rename(pool / "renamed.png")
    (pool / "copy.png").write_bytes((pool / "renamed.png").read_bytes())
    by_content = CountingEmbedder(TestEmbedder(dim=32))
    index = build_index(pool, out, by_content, progress=False)
    assert by_content.embedded == 0 and len(index) == 26
    assert {"renamed.png", "copy.png"} <= {e.path for e in index.entries}
    assert "new.png" not in {e.path for e in index.entries}


def test_add_embeds_only_new_images_and_replaces_changed_ones(pool: Path, tmp_path: Path):
    base = TestEmbedder(dim=32)
    index = build_index(pool, tmp_path / "idx", base, progress=False)
    new_paths = _make_pool(pool / "added", 3, start_seed=200)
    counting = CountingEmbedder(base)
    report = index.add(new_paths + [pool / "part0" / "img_0000.png"], counting, progress=False)
    assert counting.embedded == 3 and report.reused == 1 and len(index) == 27

    counting = CountingEmbedder(base)
    index.add(new_paths, counting, progress=False)
    assert counting.embedded == 0 and len(index) == 27
    reloaded = load_index(tmp_path / "idx")
    assert len(reloaded) == 27
    scores, ids = reloaded.search_with(base, images=[new_paths[1]], k=1)
    assert reloaded.path_of(int(ids[0, 0])) == new_paths[1].resolve()

    # Same path, new content: re-embedded, and the stale vector is gone (size unchanged).
    _pattern(999).save(new_paths[1])
    counting = CountingEmbedder(base)
    index.add([new_paths[1]], counting, progress=False)
    assert counting.embedded == 1 and len(index) == 27
    scores, ids = index.search_with(base, images=[new_paths[1]], k=1)
    assert index.path_of(int(ids[0, 0])) == new_paths[1].resolve() and scores[0, 0] == pytest.approx(
        1, abs=1e-5
    )

    outside = tmp_path / "elsewhere.png"
    _pattern(5).save(outside)
    with pytest.raises(DataError, match="outside the pool"):
        index.add([outside], base, progress=False)
    with pytest.raises(DataError, match="not found"):
        index.add([pool / "nope.png"], base, progress=False)
    with pytest.raises(IndexMismatchError):
        index.add(new_paths, TestEmbedder(dim=32, seed=1), progress=False)


def test_other_embedder_or_pool_is_refused(pool: Path, tmp_path: Path):
    out = tmp_path / "idx"
    index = build_index(pool, out, TestEmbedder(dim=32), progress=False)
    with pytest.raises(IndexMismatchError, match="built with embedder"):
        index.search_with(TestEmbedder(dim=32, seed=7), images=[_pattern(1)], k=1)
    with pytest.raises(IndexMismatchError, match="built with embedder"):
        build_index(pool, out, TestEmbedder(dim=32, seed=7), progress=False)
    other_pool = tmp_path / "other"
    _make_pool(other_pool, 2)
    with pytest.raises(IndexMismatchError, match="indexes pool"):
        build_index(other_pool, out, TestEmbedder(dim=32), progress=False)
    with pytest.raises(ConfigError, match="exactly one"):
        index.search_with(TestEmbedder(dim=32), k=1)


def test_search_validates_queries(pool: Path, tmp_path: Path):
    index = build_index(pool, tmp_path / "idx", TestEmbedder(dim=32), progress=False)
    with pytest.raises(ConfigError, match="shape"):
        index.search(np.ones((2, 5), dtype=np.float32), 3)
    with pytest.raises(ConfigError, match="NaN"):
        index.search(np.full(32, np.nan), 3)
    with pytest.raises(ConfigError, match="k must"):
        index.search(np.ones(32), 0)
    scores, ids = index.search(np.ones(32) / np.sqrt(32), 1000)
    assert ids.shape == (1, 24) and sorted(ids[0].tolist()) == list(range(24))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_find_exact_matches(tmp_path: Path, kind: str):
    pool = tmp_path / "pool"
    _make_pool(pool, 120)
    embedder = TestEmbedder(dim=32)
    index = build_index(pool, tmp_path / "idx", embedder, kind=kind, progress=False)
    assert index.kind == kind
    loaded = load_index(tmp_path / "idx")
    assert loaded.kind == kind and loaded.meta["faiss"] == index.meta["faiss"]
    sample = [5, 50, 100]
    _, ids = loaded.search_with(embedder, images=[loaded.path_of(i) for i in sample], k=1)
    assert ids[:, 0].tolist() == sample


def test_auto_kind_switches_to_ivf_above_threshold(pool: Path, tmp_path: Path):
    params = IndexParams(flat_max=10)
    assert params.resolve_kind(10) == "flat" and params.resolve_kind(11) == "ivf"
    index = ImageIndex.build(pool, tmp_path / "idx", TestEmbedder(dim=16), params=params, progress=False)
    assert index.kind == "ivf"


def test_empty_pool_gives_an_empty_searchable_index(tmp_path: Path):
    (tmp_path / "pool").mkdir()
    index = build_index(tmp_path / "pool", tmp_path / "idx", TestEmbedder(dim=8), kind="auto", progress=False)
    assert len(index) == 0 and index.kind == "flat"
    scores, ids = load_index(tmp_path / "idx").search(np.ones(8), 5)
    assert scores.shape == (1, 0) and ids.shape == (1, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (
            build_index(
                tmp_path / "pool", tmp_path / "ivf", TestEmbedder(dim=8), kind="ivf", progress=False
            ).kind
            == "flat"
        )
    assert any("empty pool" in str(w.message) for w in caught)


def test_bad_options_and_missing_index_are_clear_errors(pool: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="index kind"):
        IndexParams(kind="annoy")
    with pytest.raises(ConfigError, match="nprobe"):
        IndexParams(nprobe=0)
    with pytest.raises(ConfigError, match="flat_max"):
        IndexParams(flat_max=0)
    with pytest.raises(ConfigError, match="batch_size"):
        build_index(pool, tmp_path / "idx", TestEmbedder(), batch_size=0)
    with pytest.raises(DataError, match="no index"):
        load_index(tmp_path / "nothing-here")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a version"):
        load_index(tmp_path / "odd")
    memory_only = ImageIndex.from_vectors(
        np.eye(3), ["a.png", "b.png", "c.png"], pool, TestEmbedder(dim=3).identity
    )
    with pytest.raises(ConfigError, match="in memory"):
        memory_only.add([pool / "part0" / "img_0000.png"], TestEmbedder(dim=3))
    with pytest.raises(ConfigError, match="paths"):
        ImageIndex.from_vectors(np.eye(3), ["a.png"], pool, {})


def test_load_with_moved_pool_root(pool: Path, tmp_path: Path):
    build_index(pool, tmp_path / "idx", TestEmbedder(dim=16), progress=False)
    moved = tmp_path / "moved"
    pool.rename(moved)
    index = load_index(tmp_path / "idx", pool_root=moved)
    assert index.path_of(0).is_file() and index.pool_root == moved.resolve()
