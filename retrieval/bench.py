"""Retrieval speed and memory benchmark on synthetic vectors (``yochameleon bench retrieval``).

Synthetic data are clustered unit vectors (Gaussian blobs around random centres), which is closer to real
image embeddings than uniform noise on the sphere; uniform data has no structure for IVF to exploit and makes
any approximate index look worse than it is in practice.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from yochameleon.errors import ConfigError

from .index import IndexParams, _make_faiss_index

__all__ = ["bench_retrieval", "format_bench", "synthetic_vectors"]


def synthetic_vectors(
    count: int, dim: int, seed: int = 0, clusters: int = 1000, spread: float = 0.6, chunk: int = 100_000
) -> np.ndarray:
    """``[count, dim]`` float32 unit vectors drawn around ``clusters`` random centres.

    ``spread`` is the noise scale relative to a centre (each centre has unit norm, noise per coordinate is
    ``spread / sqrt(dim)``).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, clusters), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        block = centres[rng.integers(0, len(centres), stop - start)]
        block = block + rng.standard_normal(block.shape, dtype=np.float32) * (spread / np.sqrt(dim))
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


class _PeakRss:
    """Samples this process's RSS in a thread to report the peak above a baseline."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


@contextmanager
def _measure() -> Iterator[dict[str, float]]:
    gc.collect()
    result: dict[str, float] = {}
    with _PeakRss() as rss:
        started = time.perf_counter()
        yield result
        result["build_s"] = time.perf_counter() - started
    result["peak_rss_delta_mb"] = rss.delta_mb


def _search_ms(index: Any, queries: np.ndarray, k: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time per query (ms) for one batched search."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        index.search(queries, k)
        best = min(best, time.perf_counter() - started)
    return 1000.0 * best / len(queries)


def _recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx_ids, exact_ids))
    return hits / exact_ids.size


def bench_retrieval(
    n_exact: int = 100_000,
    n_approx: int = 1_000_000,
    dim: int = 512,
    seed: int = 0,
    n_queries: int = 100,
    k: int = 10,
    approx_kind: str = "ivf",
    params: IndexParams | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Benchmark exact flat search on ``n_exact`` vectors and an approximate index on ``n_approx``.

    Args:
        n_exact: Vectors in the exact (``IndexFlatIP``) benchmark.
        n_approx: Vectors in the approximate benchmark.
        dim: Vector dimension.
        seed: Seed of the synthetic data and queries.
        n_queries: Queries per batched search (per-query time = batch time / n_queries).
        k: Neighbours per query; recall@k of the approximate index is measured against exact search on the
            same vectors for these queries.
        approx_kind: ``"ivf"`` (IVF-Flat) or ``"hnsw"``.
        params: Index tuning (nlist, nprobe, HNSW M/ef, IVF training-sample size).
        progress: Show a progress bar over the stages.

    Returns:
        ``{"exact": {...}, "approx": {...}, "config": {...}}`` where each section holds ``n``, ``kind``,
        ``build_s``, ``peak_rss_delta_mb`` (peak RSS above the start of the build, index + working memory;
        the input vectors are allocated before), ``search_ms_per_query`` and, for ``approx``, the effective
        index ``params`` and ``recall_at_k``.

    Raises:
        ConfigError: non-positive sizes or an unknown ``approx_kind``.
    """
    import faiss

    for name, value in (("n_exact", n_exact), ("n_approx", n_approx), ("dim", dim), ("n_queries", n_queries)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if approx_kind not in ("ivf", "hnsw"):
        raise ConfigError(f"approx_kind must be 'ivf' or 'hnsw', got {approx_kind!r}")
    params = params or IndexParams()
    stages = tqdm(total=4, desc="bench retrieval", disable=not progress)
    queries = synthetic_vectors(n_queries, dim, seed=seed + 1)
    result: dict[str, Any] = {
        "config": {
            "dim": dim,
            "seed": seed,
            "n_queries": n_queries,
            "k": k,
            "faiss_threads": faiss.omp_get_max_threads(),
        }
    }

    stages.set_postfix_str(f"generate {n_exact} vectors")
    data = synthetic_vectors(n_exact, dim, seed=seed)
    stages.update()
    with _measure() as exact:
        index, _ = _make_faiss_index(data, params, "flat")
    exact.update(n=n_exact, kind="flat (IndexFlatIP)", search_ms_per_query=_search_ms(index, queries, k))
    result["exact"] = exact
    del index, data
    stages.update()

    stages.set_postfix_str(f"generate {n_approx} vectors")
    data = synthetic_vectors(n_approx, dim, seed=seed)
    stages.update()
    with _measure() as approx:
        index, effective = _make_faiss_index(data, params, approx_kind)
    approx_ids = index.search(queries, k)[1]
    exact_ids = faiss.knn(queries, data, k, metric=faiss.METRIC_INNER_PRODUCT)[1]
    label = "IVF-Flat (IndexIVFFlat, inner product)" if approx_kind == "ivf" else "HNSW (IndexHNSWFlat)"
    approx.update(
        n=n_approx,
        kind=label,
        params=effective,
        search_ms_per_query=_search_ms(index, queries, k),
        recall_at_k=_recall_at_k(approx_ids, exact_ids),
    )
    result["approx"] = approx
    stages.update()
    stages.close()
    return result


def format_bench(result: dict[str, Any]) -> str:
    """A short human-readable table of :func:`bench_retrieval` output."""
    cfg = result["config"]
    lines = [
        f"retrieval bench: dim={cfg['dim']}, {cfg['n_queries']} queries, k={cfg['k']}, "
        f"{cfg['faiss_threads']} faiss threads"
    ]
    for section in ("exact", "approx"):
        row = result[section]
        line = (
            f"  {section:6s} {row['kind']}: n={row['n']:,}  build {row['build_s']:.2f} s  "
            f"peak +{row['peak_rss_delta_mb']:.0f} MiB  search {row['search_ms_per_query']:.3f} ms/query"
        )
        if "recall_at_k" in row:
            line += f"  recall@{cfg['k']} {row['recall_at_k']:.3f}  params {row['params']}"
        lines.append(line)
    return "\n".join(lines)
