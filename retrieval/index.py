"""FAISS index over a directory of images ("the pool").

Layout of an index directory::

    INDEX_DIR/
      meta.json          format version, pool root, embedder identity, index kind and parameters
      entries.jsonl      one line per index id: {"id", "path" (relative to the pool root), "sha256"}
      index.faiss        the FAISS index (inner product over L2-normalized vectors = cosine similarity)
      vectors/           the embedding store: chunk-NNNNNN.npy + chunk-NNNNNN.jsonl, written one chunk at
                         a time, so an interrupted build resumes and adding images never re-embeds old ones

The embedding store is the source of truth; ``index.faiss`` and ``entries.jsonl`` are rebuilt from it (cheap:
no embedding) whenever the set of images changes.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from yochameleon.errors import ConfigError, DataError

from .embedders import Embedder, ImageLike, comparable_identity, identities_match, load_image_rgb, sha256_file

__all__ = [
    "IMAGE_EXTENSIONS",
    "BuildReport",
    "ImageIndex",
    "IndexEntry",
    "IndexMismatchError",
    "IndexParams",
    "RetrievalWarning",
    "build_index",
    "list_pool_images",
    "load_index",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INDEX_FORMAT = "yochameleon.retrieval.index"
INDEX_VERSION = 1
INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")


class IndexMismatchError(ConfigError):
    """An index directory was built with another embedder or pool than the one given."""


class RetrievalWarning(UserWarning):
    """Something was skipped or degraded during indexing or mining (the message says what)."""


@dataclass
class IndexParams:
    """How the FAISS index is chosen and tuned.

    Args:
        kind: ``"flat"`` (exact), ``"ivf"`` (IVF-Flat), ``"hnsw"`` or ``"auto"`` (flat up to ``flat_max``
            images, IVF above).
        flat_max: Pool size up to which ``auto`` uses exact search.
        nlist: IVF cells; default ``4 * sqrt(n)``, capped so each cell gets at least 39 training points
            (an explicit value is only capped at the training-sample size).
        nprobe: IVF cells visited per query; default ``max(8, sqrt(nlist))``.
        train_sample: Vectors used to train IVF (a seeded random subsample).
        hnsw_m: HNSW graph degree.
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width.
        seed: Seed of the IVF training subsample.
    """

    kind: str = "auto"
    flat_max: int = 200_000
    nlist: int | None = None
    nprobe: int | None = None
    train_sample: int = 100_000
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ConfigError(f"index kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        for name in ("flat_max", "train_sample", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ConfigError(f"IndexParams.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("nlist", "nprobe"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"IndexParams.{name} must be >= 1, got {value}")

    def resolve_kind(self, count: int) -> str:
        """The concrete kind used for ``count`` vectors."""
        if self.kind != "auto":
            return self.kind
        return "flat" if count <= self.flat_max else "ivf"


@dataclass(frozen=True)
class IndexEntry:
    """One indexed image: its id, path relative to the pool root, and content hash."""

    id: int
    path: str
    sha256: str


@dataclass
class BuildReport:
    """What a build (or add) did."""

    found: int = 0
    embedded: int = 0
    reused: int = 0
    skipped: int = 0
    skipped_paths: list[str] = field(default_factory=list)
    kind: str = ""
    count: int = 0
    seconds: float = 0.0


def _warn(message: str) -> None:
    warnings.warn(message, RetrievalWarning, stacklevel=3)


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def list_pool_images(pool_dir: str | Path, exclude_dirs: Iterable[Path] = ()) -> list[Path]:
    """All image files under ``pool_dir`` (recursive, sorted, by extension).

    Hidden files and folders are ignored, as are symlinks that resolve outside the pool (with a warning).

    Raises:
        DataError: ``pool_dir`` is not a directory.
    """
    root = Path(pool_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"image pool is not a directory: {root}")
    excluded = {Path(d).resolve() for d in exclude_dirs}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded
        )
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = here / name
            if path.is_symlink() and not _is_within(path.resolve(), root):
                _warn(f"not following symlink out of the pool: {path} -> {path.resolve()}")
                continue
            found.append(path)
    return sorted(found)


class _VectorStore:
    """Append-only chunked store of embeddings keyed by (relative path, sha256)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.keys: dict[tuple[str, str], tuple[int, int]] = {}
        self._chunks: list[np.ndarray] = []
        directory.mkdir(parents=True, exist_ok=True)
        for meta_file in sorted(directory.glob("chunk-*.jsonl")):
            array_file = meta_file.with_suffix(".npy")
            if not array_file.exists():
                continue  # interrupted between the two writes: the chunk never committed
            rows = [json.loads(line) for line in meta_file.read_text().splitlines() if line.strip()]
            vectors = np.load(array_file)
            if len(rows) != len(vectors):
                _warn(f"ignoring inconsistent embedding chunk {meta_file.name}")
                continue
            chunk_no = len(self._chunks)
            self._chunks.append(vectors.astype(np.float32, copy=False))
            for row_no, row in enumerate(rows):
                self.keys[(row["path"], row["sha256"])] = (chunk_no, row_no)
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in directory.glob("chunk-*.jsonl")), default=-1)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.keys

    def copy_by_content(self, keys: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Store vectors for ``keys`` whose content hash is already embedded under another path (a renamed
        or duplicated file); return the keys that still need embedding."""
        by_hash = {sha: location for (_, sha), location in self.keys.items()}
        copies = [key for key in keys if key[1] in by_hash]
        if copies:
            vectors = np.stack([self._chunks[c][r] for c, r in (by_hash[sha] for _, sha in copies)])
            self.append(copies, vectors)
        return [key for key in keys if key[1] not in by_hash]

    def append(self, keys: Sequence[tuple[str, str]], vectors: np.ndarray) -> None:
        """Persist one chunk; the ``.jsonl`` rename is the commit point."""
        if not keys:
            return
        stem = self.directory / f"chunk-{self._next:06d}"
        self._next += 1
        tmp_array = stem.with_suffix(".npy.tmp")
        with open(tmp_array, "wb") as handle:
            np.save(handle, vectors.astype(np.float32))
        os.replace(tmp_array, stem.with_suffix(".npy"))
        tmp_meta = stem.with_suffix(".jsonl.tmp")
        tmp_meta.write_text("".join(json.dumps({"path": p, "sha256": h}) + "\n" for p, h in keys))
        os.replace(tmp_meta, stem.with_suffix(".jsonl"))
        chunk_no = len(self._chunks)
        self._chunks.append(vectors.astype(np.float32))
        for row_no, key in enumerate(keys):
            self.keys[key] = (chunk_no, row_no)

    def gather(self, keys: Sequence[tuple[str, str]], dim: int) -> np.ndarray:
        out = np.empty((len(keys), dim), dtype=np.float32)
        for row, key in enumerate(keys):
            chunk_no, row_no = self.keys[key]
            out[row] = self._chunks[chunk_no][row_no]
        return out


def _make_faiss_index(vectors: np.ndarray, params: IndexParams, kind: str) -> tuple[Any, dict[str, Any]]:
    """Build a trained, filled FAISS index of ``kind`` over ``vectors``; also return its effective params."""
    import faiss

    count, dim = vectors.shape
    if kind in ("ivf", "hnsw") and count == 0:
        _warn(f"empty pool: using an exact flat index instead of {kind}")
        kind = "flat"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        effective: dict[str, Any] = {}
    elif kind == "ivf":
        train_size = min(count, params.train_sample)
        nlist = params.nlist or int(4 * math.sqrt(count))
        # k-means wants >= 39 training points per centroid; fewer cells beat a badly trained quantizer.
        nlist = max(1, min(nlist, train_size // 39 if params.nlist is None else train_size))
        nprobe = min(nlist, params.nprobe or max(8, int(math.sqrt(nlist))))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors
        if count > params.train_sample:
            rng = np.random.default_rng(params.seed)
            sample = vectors[np.sort(rng.choice(count, params.train_sample, replace=False))]
        index.train(np.ascontiguousarray(sample))
        index.nprobe = nprobe
        effective = {"nlist": nlist, "nprobe": nprobe, "train_sample": int(len(sample))}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
        effective = {
            "M": params.hnsw_m,
            "ef_construction": params.ef_construction,
            "ef_search": params.ef_search,
        }
    else:  # guarded by IndexParams, kept for direct callers
        raise ConfigError(f"unknown index kind {kind!r}")
    if count:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index, {"kind": kind, **effective}


def _apply_search_params(index: Any, effective: dict[str, Any]) -> None:
    # Query-time knobs are set again after loading rather than trusting each index type's serialisation.
    import faiss

    if effective.get("kind") == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(effective["nprobe"])
    elif effective.get("kind") == "hnsw":
        index.hnsw.efSearch = int(effective["ef_search"])


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _load_images(paths: Sequence[Path], report: BuildReport, root: Path) -> tuple[list[Any], list[int]]:
    """Decode images, skipping unreadable or over-limit ones with a warning; return the images and positions."""
    images, kept = [], []
    for position, path in enumerate(paths):
        try:
            images.append(load_image_rgb(path))
            kept.append(position)
        except DataError as exc:
            report.skipped += 1
            report.skipped_paths.append(str(path.relative_to(root)))
            _warn(f"skipping unreadable or over-limit image: {exc}")
    return images, kept


class ImageIndex:
    """A searchable FAISS index over an image pool, with its id->path map and embedder identity.

    Create with :meth:`build` (or :func:`build_index`), reopen with :meth:`load`. Ids are rows of
    :attr:`entries`; :meth:`search` returns inner-product scores (cosine similarity).
    """

    def __init__(
        self, out_dir: Path, meta: dict[str, Any], entries: list[IndexEntry], faiss_index: Any
    ) -> None:
        self.out_dir = out_dir
        self.meta = meta
        self.entries = entries
        self.faiss_index = faiss_index
        self.report: BuildReport | None = None
        self._by_key = {(e.path, e.sha256) for e in entries}

    # ----------------------------------------------------------------- properties
    @property
    def pool_root(self) -> Path:
        return Path(self.meta["pool_root"])

    @property
    def identity(self) -> dict[str, Any]:
        return self.meta["embedder"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def kind(self) -> str:
        return self.meta["faiss"]["kind"]

    def __len__(self) -> int:
        return len(self.entries)

    def path_of(self, index_id: int) -> Path:
        """Absolute path of the image with this id."""
        return self.pool_root / self.entries[index_id].path

    # ----------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        pool_dir: str | Path,
        out_dir: str | Path,
        embedder: Embedder,
        kind: str = "auto",
        batch_size: int = 64,
        params: IndexParams | None = None,
        progress: bool = True,
    ) -> ImageIndex:
        """Embed every image of ``pool_dir`` and write a searchable index to ``out_dir``.

        Safe to re-run: images already in ``out_dir``'s embedding store (same relative path and content hash,
        or the same content under another name) are not embedded again, so an interrupted build resumes where it stopped and a re-run after adding
        files to the pool embeds only the new ones. Unreadable images and images over the pixel limit
        (``yochameleon.data.photos.MAX_PIXELS``, checked before decoding) are skipped with a
        :class:`RetrievalWarning` and counted in :attr:`report`; an empty result warns too.

        Args:
            pool_dir: Directory searched recursively for png/jpg/jpeg/webp/bmp files.
            out_dir: Index directory (created).
            embedder: Produces the vectors; its identity is stored and checked on resume and search.
            kind: ``"auto"``, ``"flat"``, ``"ivf"`` or ``"hnsw"`` (overrides ``params.kind``).
            batch_size: Images decoded, embedded and persisted per step (memory vs. resume granularity).
            params: Index tuning; defaults to :class:`IndexParams`.
            progress: Show progress bars.

        Raises:
            DataError: ``pool_dir`` is not a directory.
            IndexMismatchError: ``out_dir`` holds an index of another embedder or pool.
            ConfigError: bad ``kind`` or ``batch_size``.
        """
        import time

        started = time.perf_counter()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        params = IndexParams(**{**asdict(params or IndexParams()), "kind": kind})
        root = Path(pool_dir).expanduser().resolve()
        out = Path(out_dir).expanduser().resolve()
        paths = list_pool_images(root, exclude_dirs=[out])
        out.mkdir(parents=True, exist_ok=True)
        meta = cls._start_meta(out, root, embedder, params)
        store = _VectorStore(out / "vectors")
        report = BuildReport(found=len(paths))

        keys: list[tuple[str, str]] = []
        pending: list[int] = []
        for path in tqdm(paths, desc="hash pool", unit="img", disable=not progress):
            try:
                key = (path.relative_to(root).as_posix(), sha256_file(path))
            except OSError as exc:
                report.skipped += 1
                report.skipped_paths.append(path.relative_to(root).as_posix())
                _warn(f"skipping unreadable file {path}: {exc}")
                continue
            keys.append(key)
            if key in store:
                report.reused += 1
            else:
                pending.append(len(keys) - 1)

        to_embed = store.copy_by_content([keys[i] for i in pending])
        report.reused += len(pending) - len(to_embed)
        cls._embed_pending(to_embed, root, embedder, store, report, batch_size, progress)
        # Images that failed to decode are not in the store and so drop out here.
        final_keys = [key for key in keys if key in store]
        index = cls._assemble(out, meta, params, store, final_keys)
        report.kind, report.count, report.seconds = index.kind, len(index), time.perf_counter() - started
        index.report = report
        if report.skipped:
            _warn(f"{report.skipped} unreadable or over-limit image(s) skipped while indexing {root}")
        if not len(index):
            _warn(
                f"empty pool: {root} has no usable images ({report.found} found, {report.skipped} skipped), so "
                "the index is empty and `prepare` will retrieve no hard negatives or soft positives"
            )
        return index

    @staticmethod
    def _start_meta(out: Path, root: Path, embedder: Embedder, params: IndexParams) -> dict[str, Any]:
        meta_path = out / "meta.json"
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if not identities_match(old["embedder"], embedder.identity):
                raise IndexMismatchError(
                    f"{out} holds an index built with embedder {comparable_identity(old['embedder'])}, not "
                    f"{comparable_identity(embedder.identity)}; use another --out directory"
                )
            if Path(old["pool_root"]) != root:
                raise IndexMismatchError(
                    f"{out} indexes pool {old['pool_root']}, not {root}; use another --out directory"
                )
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "pool_root": str(root),
            "embedder": embedder.identity,
            "dim": int(embedder.dim),
            "params": asdict(params),
            "faiss": {"kind": None},
            "count": 0,
            "complete": False,
        }
        if not meta_path.exists():
            _write_json_atomic(meta_path, meta)  # records the identity before the first chunk is written
        return meta

    @staticmethod
    def _embed_pending(
        keys: Sequence[tuple[str, str]],
        root: Path,
        embedder: Embedder,
        store: _VectorStore,
        report: BuildReport,
        batch_size: int,
        progress: bool,
    ) -> None:
        bar = tqdm(total=len(keys), desc="embed pool", unit="img", disable=not progress)
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            images, kept = _load_images([root / rel for rel, _ in chunk], report, root)
            if images:
                vectors = np.asarray(embedder.embed_images(images, progress=False), dtype=np.float32)
                if vectors.shape != (len(images), embedder.dim):
                    raise ConfigError(
                        f"embedder returned shape {vectors.shape}, expected {(len(images), embedder.dim)}"
                    )
                kept_keys = [chunk[i] for i in kept]
                store.append(kept_keys, vectors)
                report.embedded += len(kept_keys)
            bar.update(len(chunk))
        bar.close()

    @classmethod
    def _assemble(
        cls,
        out: Path,
        meta: dict[str, Any],
        params: IndexParams,
        store: _VectorStore,
        keys: Sequence[tuple[str, str]],
    ) -> ImageIndex:
        """(Re)write index.faiss, entries.jsonl and meta.json from the embedding store (no embedding)."""
        import faiss

        vectors = store.gather(keys, int(meta["dim"]))
        faiss_index, effective = _make_faiss_index(vectors, params, params.resolve_kind(len(keys)))
        entries = [IndexEntry(i, path, sha) for i, (path, sha) in enumerate(keys)]
        tmp_index = out / "index.faiss.tmp"
        faiss.write_index(faiss_index, str(tmp_index))
        os.replace(tmp_index, out / "index.faiss")
        tmp_entries = out / "entries.jsonl.tmp"
        tmp_entries.write_text("".join(json.dumps(asdict(e)) + "\n" for e in entries))
        os.replace(tmp_entries, out / "entries.jsonl")
        meta = {**meta, "faiss": effective, "count": len(entries), "complete": True, "params": asdict(params)}
        _write_json_atomic(out / "meta.json", meta)
        return cls(out, meta, entries, faiss_index)

    @classmethod
    def from_vectors(
        cls,
        vectors: np.ndarray,
        paths: Sequence[str],
        pool_root: str | Path,
        identity: dict[str, Any],
        hashes: Sequence[str] | None = None,
        kind: str = "flat",
    ) -> ImageIndex:
        """An in-memory index over precomputed vectors (nothing is written; for tests and notebooks).

        Args:
            vectors: ``[N, dim]`` normalized embeddings.
            paths: ``N`` paths relative to ``pool_root``.
            pool_root: Root the paths are relative to.
            identity: Identity of the embedder that produced ``vectors``.
            hashes: ``N`` content hashes; defaults to a placeholder per path.
            kind: Index kind, as for :meth:`build`.

        Raises:
            ConfigError: mismatched lengths or a non-2-D ``vectors``.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(paths):
            raise ConfigError(f"need [N, dim] vectors for {len(paths)} paths, got {vectors.shape}")
        hashes = list(hashes) if hashes is not None else [f"nohash:{p}" for p in paths]
        if len(hashes) != len(paths):
            raise ConfigError(f"{len(hashes)} hashes for {len(paths)} paths")
        params = IndexParams(kind=kind)
        faiss_index, effective = _make_faiss_index(vectors, params, params.resolve_kind(len(vectors)))
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "pool_root": str(Path(pool_root).expanduser().resolve()),
            "embedder": identity,
            "dim": int(vectors.shape[1]),
            "params": asdict(params),
            "faiss": effective,
            "count": len(paths),
            "complete": True,
        }
        entries = [IndexEntry(i, str(p), h) for i, (p, h) in enumerate(zip(paths, hashes))]
        return cls(None, meta, entries, faiss_index)

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, out_dir: str | Path, pool_root: str | Path | None = None) -> ImageIndex:
        """Open an index directory written by :meth:`build`.

        Args:
            out_dir: The index directory.
            pool_root: Use this pool location instead of the stored one (the pool was moved).

        Raises:
            DataError: missing or incomplete index, or an unknown format version.
        """
        import faiss

        out = Path(out_dir).expanduser().resolve()
        meta_path = out / "meta.json"
        if not meta_path.exists():
            raise DataError(f"no index at {out} (meta.json missing); build one with `yochameleon index`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
            raise DataError(f"{out} is not a version-{INDEX_VERSION} {INDEX_FORMAT} directory")
        if not meta.get("complete") or not (out / "index.faiss").exists():
            raise DataError(f"index at {out} is incomplete (interrupted build?); re-run the build to resume")
        if pool_root is not None:
            meta["pool_root"] = str(Path(pool_root).expanduser().resolve())
        rows = [json.loads(line) for line in (out / "entries.jsonl").read_text().splitlines() if line.strip()]
        entries = [IndexEntry(int(r["id"]), r["path"], r["sha256"]) for r in rows]
        faiss_index = faiss.read_index(str(out / "index.faiss"))
        if faiss_index.ntotal != len(entries):
            raise DataError(
                f"index at {out} is corrupt: {faiss_index.ntotal} vectors, {len(entries)} entries"
            )
        _apply_search_params(faiss_index, meta["faiss"])
        return cls(out, meta, entries, faiss_index)

    # ----------------------------------------------------------------- adding
    def add(
        self, paths: Iterable[str | Path], embedder: Embedder, batch_size: int = 64, progress: bool = True
    ) -> BuildReport:
        """Add images (inside the pool root) to the index, embedding only those not already present.

        An image already present with the same relative path and content hash is skipped. A path whose
        content changed gets its new vector and the stale one is dropped.

        Raises:
            IndexMismatchError: ``embedder`` is not the one the index was built with.
            DataError: a path is missing or outside the pool root.
        """
        self.check_embedder(embedder)
        if self.out_dir is None:
            raise ConfigError(
                "this index lives in memory only (from_vectors); build one on disk to add images"
            )
        root = self.pool_root
        report = BuildReport()
        new_keys: list[tuple[str, str]] = []
        for raw in paths:
            path = Path(raw).expanduser()
            path = (path if path.is_absolute() else Path.cwd() / path).resolve()
            if not _is_within(path, root):
                raise DataError(f"{path} is outside the pool root {root}; copy it into the pool first")
            if not path.is_file():
                raise DataError(f"image not found: {path}")
            report.found += 1
            key = (path.relative_to(root).as_posix(), sha256_file(path))
            if key in self._by_key or key in new_keys:
                report.reused += 1
                continue
            new_keys.append(key)
        store = _VectorStore(self.out_dir / "vectors")
        pending = store.copy_by_content([key for key in new_keys if key not in store])
        report.reused += len(new_keys) - len(pending)
        self._embed_pending(pending, root, embedder, store, report, batch_size, progress)
        added = [key for key in new_keys if key in store]
        if added:
            replaced = {path for path, _ in added}
            keys = [(e.path, e.sha256) for e in self.entries if e.path not in replaced] + added
            fresh = self._assemble(self.out_dir, self.meta, IndexParams(**self.meta["params"]), store, keys)
            self.meta, self.entries, self.faiss_index = fresh.meta, fresh.entries, fresh.faiss_index
            self._by_key = fresh._by_key
        report.kind, report.count = self.kind, len(self)
        return report

    # ----------------------------------------------------------------- searching
    def check_embedder(self, embedder: Embedder) -> None:
        """Raise :class:`IndexMismatchError` unless ``embedder`` produced this index's vectors."""
        if not identities_match(self.identity, embedder.identity):
            raise IndexMismatchError(
                f"index {self.out_dir} was built with embedder {comparable_identity(self.identity)}, but "
                f"the query embedder is {comparable_identity(embedder.identity)}; rebuild the index or use "
                "the same embedder"
            )

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest neighbours by inner product.

        Args:
            query_vectors: ``[dim]`` or ``[Q, dim]`` (normalized, from this index's embedder).
            k: Neighbours per query; clamped to the index size.

        Returns:
            ``(scores, ids)``, each ``[Q, min(k, len(self))]``, best first. Approximate indexes may return
            fewer hits, padded with score ``-inf`` and id ``-1``.

        Raises:
            ConfigError: wrong dimension, non-finite values, or ``k < 1``.
        """
        queries = np.atleast_2d(np.asarray(query_vectors, dtype=np.float32))
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ConfigError(f"query vectors must have shape [Q, {self.dim}], got {queries.shape}")
        if not np.all(np.isfinite(queries)):
            raise ConfigError("query vectors contain NaN or inf")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        k = min(k, len(self))
        if k == 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        scores, ids = self.faiss_index.search(np.ascontiguousarray(queries), k)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    def search_with(
        self,
        embedder: Embedder,
        images: Sequence[ImageLike] | None = None,
        texts: Sequence[str] | None = None,
        k: int = 10,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embed ``images`` or ``texts`` with ``embedder`` and search, after checking the embedder matches.

        Raises:
            IndexMismatchError: ``embedder`` is not the one the index was built with.
            ConfigError: neither or both of ``images`` and ``texts`` given.
        """
        self.check_embedder(embedder)
        if (images is None) == (texts is None):
            raise ConfigError("search_with needs exactly one of images= or texts=")
        vectors = embedder.embed_images(images, progress=False) if images is not None else None
        if vectors is None:
            vectors = embedder.embed_texts(texts, progress=False)
        return self.search(vectors, k)


def build_index(
    pool_dir: str | Path,
    out_dir: str | Path,
    embedder: Embedder,
    kind: str = "auto",
    batch_size: int = 64,
    params: IndexParams | None = None,
    progress: bool = True,
) -> ImageIndex:
    """Function form of :meth:`ImageIndex.build`."""
    return ImageIndex.build(pool_dir, out_dir, embedder, kind, batch_size, params, progress)


def load_index(out_dir: str | Path, pool_root: str | Path | None = None) -> ImageIndex:
    """Function form of :meth:`ImageIndex.load`."""
    return ImageIndex.load(out_dir, pool_root)
