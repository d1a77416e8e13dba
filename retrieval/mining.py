"""Mining training images for one concept from an :class:`~yochameleon.retrieval.index.ImageIndex`.

* **Query.** The centroid of the concept photos' L2-normalized embeddings, renormalized.
* **Hard negatives.** The pool images nearest to the query (for "No" recognition answers).
* **Random negatives.** A seeded uniform sample of the pool.
* **Soft positives.** The top-``L`` most similar pool images, sorted ascending by similarity and split into
  ``n_g - 1`` contiguous equal-count rank bins (``np.array_split`` semantics: the first bins get the extra
  image). Bin ``i`` (0-based) is described by the first ``i + 1`` g-tokens; real photos get all ``n_g``.

Unlike the original Yo'Chameleon code, which sorted ascending and kept the *first* L (i.e. the least
similar L when the pool is bigger), we keep the most similar L, as the paper describes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from yochameleon.errors import ConfigError, DataError

from .index import ImageIndex, RetrievalWarning

__all__ = [
    "MinedImage",
    "SoftPositive",
    "concept_query",
    "hard_negatives",
    "random_negatives",
    "real_photo_token_count",
    "soft_positive_bins",
    "soft_positives",
]


@dataclass(frozen=True)
class MinedImage:
    """A pool image picked for a concept.

    Attributes:
        path: Absolute path of the image.
        rel_path: Path relative to the pool root (as stored in the index).
        sha256: Content hash.
        index_id: Row in the index.
        score: Cosine similarity to the concept query (``None`` for random negatives).
    """

    path: str
    rel_path: str
    sha256: str
    index_id: int
    score: float | None


@dataclass(frozen=True)
class SoftPositive(MinedImage):
    """A soft positive: a mined image plus its rank bin and how many g-tokens describe it."""

    bin: int = 0
    n_tokens: int = 1


def _warn(message: str) -> None:
    warnings.warn(message, RetrievalWarning, stacklevel=3)


def concept_query(positive_embeddings: np.ndarray) -> np.ndarray:
    """Centroid of the positives' L2-normalized embeddings, renormalized to unit length.

    Args:
        positive_embeddings: ``[N, dim]`` embeddings of the concept photos (normalized or not).

    Raises:
        DataError: no embeddings, non-finite values, or the embeddings cancel out.
    """
    vectors = np.asarray(positive_embeddings, dtype=np.float64)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or len(vectors) == 0:
        raise DataError(f"need at least one positive embedding of shape [N, dim], got {vectors.shape}")
    if not np.all(np.isfinite(vectors)):
        raise DataError("positive embeddings contain NaN or inf")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise DataError("a positive embedding is all zeros")
    centroid = (vectors / norms).mean(axis=0)
    length = np.linalg.norm(centroid)
    if length < 1e-8:
        raise DataError("positive embeddings cancel out; their centroid has no direction")
    return (centroid / length).astype(np.float32)


def real_photo_token_count(n_g: int) -> int:
    """Number of g-tokens describing a real concept photo: all of them."""
    _check_n_g(n_g)
    return n_g


def _check_n_g(n_g: int) -> None:
    if n_g < 2:
        raise ConfigError(f"n_g must be >= 2 (soft positives use n_g - 1 bins), got {n_g}")


def soft_positive_bins(count: int, n_g: int) -> list[tuple[int, int]]:
    """(bin, n_tokens) for each of ``count`` images in ascending-similarity rank order.

    Ranks are split into ``n_g - 1`` contiguous bins with ``np.array_split`` semantics; bin ``i`` gets
    ``i + 1`` tokens. With fewer images than bins the top bins stay empty.

    Raises:
        ConfigError: ``n_g < 2`` or ``count < 0``.
    """
    _check_n_g(n_g)
    if count < 0:
        raise ConfigError(f"count must be >= 0, got {count}")
    assignment: list[tuple[int, int]] = []
    for bin_no, ranks in enumerate(np.array_split(np.arange(count), n_g - 1)):
        assignment.extend((bin_no, bin_no + 1) for _ in ranks)
    return assignment


def _excluded(index: ImageIndex, index_id: int, exclude: set[str]) -> bool:
    entry = index.entries[index_id]
    return bool(exclude) and (
        entry.sha256 in exclude or entry.path in exclude or str(index.path_of(index_id)) in exclude
    )


def _nearest(index: ImageIndex, query: np.ndarray, k: int, exclude: set[str]) -> list[MinedImage]:
    """Top-k by similarity, best first, skipping excluded entries (over-fetching to make up for them).

    Callers handle the empty index, so ``fetch`` is always >= 1 here.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    fetch = min(len(index), k + len(exclude))
    while True:
        scores, ids = index.search(query, fetch)
        picked = []
        for score, index_id in zip(scores[0], ids[0]):
            if index_id < 0 or _excluded(index, int(index_id), exclude):
                continue
            entry = index.entries[int(index_id)]
            picked.append(
                MinedImage(
                    str(index.path_of(int(index_id))), entry.path, entry.sha256, int(index_id), float(score)
                )
            )
            if len(picked) == k:
                return picked
        if fetch >= len(index):
            return picked
        # Many exclusions among the hits (e.g. duplicated positives): look further.
        fetch = min(len(index), fetch * 2)


def hard_negatives(
    index: ImageIndex, query: np.ndarray, k: int = 100, exclude: Iterable[str] = ()
) -> list[MinedImage]:
    """The ``k`` pool images most similar to ``query``, most similar first.

    Args:
        index: The pool index.
        query: Concept query from :func:`concept_query`.
        k: How many.
        exclude: Content hashes or paths (relative or absolute) to leave out, typically the hashes of the
            concept photos so an exact copy of a positive is never used as a negative.

    Raises:
        ConfigError: ``k < 1`` or a query of the wrong dimension.
    """
    exclude_set = set(exclude)
    if len(index) == 0:
        _warn("empty pool: no hard negatives")
        return []
    mined = _nearest(index, query, k, exclude_set)
    if len(mined) < k:
        _warn(
            f"pool has only {len(mined)} usable images; returning {len(mined)} hard negatives instead of {k}"
        )
    return mined


def random_negatives(
    index: ImageIndex, k: int = 100, seed: int = 0, exclude: Iterable[str] = ()
) -> list[MinedImage]:
    """A seeded uniform sample of ``k`` pool images (fewer, with a warning, if the pool is smaller).

    Args:
        index: The pool index.
        k: How many.
        seed: Sampling seed.
        exclude: Content hashes or paths to leave out (positives, already-chosen hard negatives).

    Raises:
        ConfigError: ``k < 1``.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    exclude_set = set(exclude)
    candidates = [i for i in range(len(index)) if not _excluded(index, i, exclude_set)]
    if len(candidates) < k:
        _warn(f"pool has only {len(candidates)} usable images; returning all of them as random negatives")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(candidates))[:k]
    picked = []
    for position in chosen:
        index_id = candidates[int(position)]
        entry = index.entries[index_id]
        picked.append(MinedImage(str(index.path_of(index_id)), entry.path, entry.sha256, index_id, None))
    return picked


def soft_positives(
    index: ImageIndex, query: np.ndarray, L: int = 1000, n_g: int = 16, exclude: Iterable[str] = ()
) -> list[SoftPositive]:
    """Top-``L`` most similar pool images with their rank bins and g-token counts.

    Returns the images sorted ascending by similarity; each record keeps its score. Bin ``i`` (of
    ``n_g - 1``, ``np.array_split`` sizes) gets ``i + 1`` tokens, so more similarity never means fewer tokens.
    A pool smaller than ``L`` degrades to the whole pool with a :class:`RetrievalWarning`; an empty pool gives
    ``[]`` with a warning.

    Args:
        index: The pool index.
        query: Concept query from :func:`concept_query`.
        L: How many soft positives to keep.
        n_g: Number of g-tokens of the concept.
        exclude: Content hashes or paths to leave out (the concept photos themselves).

    Raises:
        ConfigError: ``L < 1`` or ``n_g < 2``.
    """
    _check_n_g(n_g)
    if L < 1:
        raise ConfigError(f"L must be >= 1, got {L}")
    if len(index) == 0:
        _warn("empty pool: no soft positives")
        return []
    top = _nearest(index, query, L, set(exclude))
    if len(top) < L:
        _warn(
            f"pool has only {len(top)} usable images, fewer than L={L}: using all of them as soft positives"
        )
    ascending = sorted(top, key=lambda m: (m.score, -m.index_id))
    return [
        SoftPositive(m.path, m.rel_path, m.sha256, m.index_id, m.score, bin=bin_no, n_tokens=n_tokens)
        for m, (bin_no, n_tokens) in zip(ascending, soft_positive_bins(len(ascending), n_g))
    ]
