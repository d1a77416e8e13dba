"""Concept query, hard/random negatives and soft-positive rank binning."""

from __future__ import annotations

import numpy as np
import pytest

from yochameleon.errors import ConfigError, DataError
from yochameleon.retrieval import (
    ImageIndex,
    RetrievalWarning,
    concept_query,
    hard_negatives,
    random_negatives,
    real_photo_token_count,
    soft_positive_bins,
    soft_positives,
)

IDENTITY = {"kind": "synthetic", "dim": 16}


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _pool_index(
    count: int, dim: int = 16, seed: int = 0, tmp_root: str = "/pool"
) -> tuple[ImageIndex, np.ndarray]:
    vectors = _unit(np.random.default_rng(seed).standard_normal((count, dim)))
    paths = [f"img_{i:05d}.png" for i in range(count)]
    hashes = [f"hash{i}" for i in range(count)]
    return ImageIndex.from_vectors(vectors, paths, tmp_root, IDENTITY, hashes=hashes), vectors


# --------------------------------------------------------------------------- bin arithmetic
def test_bins_for_paper_setting_are_ten_of_67_then_five_of_66():
    assignment = soft_positive_bins(1000, 16)
    bins = [b for b, _ in assignment]
    sizes = np.bincount(bins).tolist()
    assert len(sizes) == 15
    assert sizes == [67] * 10 + [66] * 5
    # Contiguous: bin numbers never go down along the ascending-similarity ranks.
    assert all(a <= b for a, b in zip(bins, bins[1:]))
    assert [n for _, n in assignment] == [b + 1 for b in bins]
    assert {n for _, n in assignment} == set(range(1, 16))
    assert real_photo_token_count(16) == 16


def test_bins_match_spec_formula_for_other_sizes():
    for count, n_g in [(1000, 16), (100, 16), (37, 5), (5000, 32), (14, 16)]:
        groups = n_g - 1
        q, r = divmod(count, groups)
        expected = []
        for rank in range(count):
            expected.append(rank // (q + 1) if rank < r * (q + 1) else r + (rank - r * (q + 1)) // q)
        assert [b for b, _ in soft_positive_bins(count, n_g)] == expected


def test_bins_reject_bad_arguments():
    with pytest.raises(ConfigError, match="n_g"):
        soft_positive_bins(10, 1)
    with pytest.raises(ConfigError, match="count"):
        soft_positive_bins(-1, 16)
    with pytest.raises(ConfigError, match="n_g"):
        real_photo_token_count(1)
    assert soft_positive_bins(0, 16) == []


# --------------------------------------------------------------------------- query
def test_concept_query_is_renormalized_centroid_of_normalized_rows():
    rows = np.array([[3.0, 0.0], [0.0, 0.5]])
    query = concept_query(rows)
    np.testing.assert_allclose(query, [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)
    assert query.dtype == np.float32
    # Scaling one photo's embedding must not move the query (it is normalized first).
    np.testing.assert_allclose(concept_query(rows * [[10.0], [1.0]]), query, rtol=1e-6)
    np.testing.assert_allclose(concept_query(np.array([1.0, 1.0])), query, rtol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((0, 4)), "at least one"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (np.array([[0.0, 0.0]]), "all zeros"),
        (np.array([[1.0, 0.0], [-1.0, 0.0]]), "cancel"),
    ],
)
def test_concept_query_rejects_bad_embeddings(bad, message):
    with pytest.raises(DataError, match=message):
        concept_query(bad)


# --------------------------------------------------------------------------- soft positives
def test_soft_positives_keep_the_top_L_most_similar_sorted_ascending():
    index, vectors = _pool_index(1500)
    query = concept_query(vectors[:3])
    similarities = vectors @ query
    records = soft_positives(index, query, L=1000, n_g=16)

    assert len(records) == 1000
    chosen = {r.index_id for r in records}
    top_ids = set(np.argsort(-similarities)[:1000].tolist())
    assert chosen == top_ids  # the most similar, not the least similar
    scores = [r.score for r in records]
    assert scores == sorted(scores)
    np.testing.assert_allclose(scores, similarities[[r.index_id for r in records]], atol=1e-5)
    assert np.bincount([r.bin for r in records]).tolist() == [67] * 10 + [66] * 5
    # More similarity never means fewer tokens.
    tokens = [r.n_tokens for r in records]
    assert all(a <= b for a, b in zip(tokens, tokens[1:]))
    assert tokens[0] == 1 and tokens[-1] == 15
    assert all(r.n_tokens == r.bin + 1 for r in records)
    assert records[0].path == f"/pool/{records[0].rel_path}"


def test_soft_positives_degrade_to_whole_pool_with_warning():
    index, vectors = _pool_index(40)
    with pytest.warns(RetrievalWarning, match="fewer than L=1000"):
        records = soft_positives(index, concept_query(vectors[:2]), L=1000, n_g=16)
    assert len(records) == 40
    assert np.bincount([r.bin for r in records]).tolist() == [3] * 10 + [2] * 5


def test_soft_positives_empty_pool_returns_empty_list_with_warning():
    empty = ImageIndex.from_vectors(np.zeros((0, 16)), [], "/pool", IDENTITY)
    with pytest.warns(RetrievalWarning, match="empty pool"):
        assert soft_positives(empty, np.ones(16, dtype=np.float32) / 4, L=10) == []
    with pytest.warns(RetrievalWarning, match="empty pool"):
        assert hard_negatives(empty, np.ones(16, dtype=np.float32) / 4, k=5) == []


def test_soft_positives_exclude_copies_of_the_positives():
    index, vectors = _pool_index(200)
    query = concept_query(vectors[:3])
    excluded = ["hash0", "hash1", "hash2"]
    records = soft_positives(index, query, L=50, n_g=6, exclude=excluded)
    assert len(records) == 50
    assert not {r.sha256 for r in records} & set(excluded)


def test_soft_positives_reject_bad_arguments():
    index, vectors = _pool_index(10)
    with pytest.raises(ConfigError, match="L must"):
        soft_positives(index, vectors[0], L=0)
    with pytest.raises(ConfigError, match="n_g"):
        soft_positives(index, vectors[0], L=5, n_g=1)
    with pytest.raises(ConfigError, match="shape"):
        soft_positives(index, np.ones(3, dtype=np.float32), L=5)


# --------------------------------------------------------------------------- negatives
def test_hard_negatives_are_nearest_first_and_skip_excluded_hashes_and_paths():
    index, vectors = _pool_index(300)
    query = concept_query(vectors[:2])
    order = np.argsort(-(vectors @ query))
    mined = hard_negatives(index, query, k=10)
    assert [m.index_id for m in mined] == order[:10].tolist()
    assert [m.score for m in mined] == sorted((m.score for m in mined), reverse=True)

    # Excluding many of the nearest (as hashes and as paths) forces the search to look further.
    exclude = [f"hash{i}" for i in order[:30]] + [
        f"img_{order[30]:05d}.png",
        f"/pool/img_{order[31]:05d}.png",
    ]
    mined = hard_negatives(index, query, k=10, exclude=exclude)
    assert [m.index_id for m in mined] == order[32:42].tolist()


def test_hard_negatives_small_pool_warns():
    index, vectors = _pool_index(5)
    with pytest.warns(RetrievalWarning, match="only 5"):
        assert len(hard_negatives(index, vectors[0], k=100)) == 5
    with pytest.raises(ConfigError, match="k must"):
        hard_negatives(index, vectors[0], k=0)


def test_random_negatives_are_seeded_distinct_and_respect_exclusions():
    index, _ = _pool_index(500)
    first = random_negatives(index, k=100, seed=3)
    again = random_negatives(index, k=100, seed=3)
    other = random_negatives(index, k=100, seed=4)
    assert [m.index_id for m in first] == [m.index_id for m in again]
    assert [m.index_id for m in first] != [m.index_id for m in other]
    assert len({m.index_id for m in first}) == 100
    assert all(m.score is None for m in first)

    exclude = [f"hash{i}" for i in range(0, 500, 2)]
    picked = random_negatives(index, k=100, seed=3, exclude=exclude)
    assert all(m.index_id % 2 == 1 for m in picked)

    with pytest.warns(RetrievalWarning, match="only 250"):
        assert len(random_negatives(index, k=400, seed=0, exclude=exclude)) == 250
    with pytest.raises(ConfigError, match="k must"):
        random_negatives(index, k=0)
