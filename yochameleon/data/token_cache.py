"""A content-addressed cache of VQ token ids: every image is encoded once, together with its mirror image.

Layout: ``ROOT/<key>/<sha[:2]>/<sha>.npy`` where ``key`` hashes the backend fingerprint, the
preprocessing id and the cache format, and ``sha`` is the SHA-256 of the image file's bytes. Each
entry is an ``int32`` array of shape ``(2, n_tokens)``: row 0 the image, row 1 its horizontal flip.

Entries are written atomically (temporary name + ``os.replace``), one per image, as soon as its
batch is encoded, so an interrupted run keeps everything it finished and the next run resumes. The
cache is shared across runs and concepts: point every run at the same root (see
:func:`default_cache_dir`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from yochameleon.data.photos import file_sha256, load_rgb
from yochameleon.errors import DataError

CACHE_FORMAT = 1
EncodeFn = Callable[[list[Image.Image]], list[list[int]]]


def default_cache_dir() -> Path:
    """``$YOCHAMELEON_CACHE/token_cache``, else ``~/.cache/yochameleon/token_cache``."""
    base = os.environ.get("YOCHAMELEON_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "yochameleon") / "token_cache"


class TokenCache:
    """VQ ids per (image content, flip) for one backend and preprocessing.

    Args:
        root: the cache folder (shared by every backend; each gets its own sub-folder).
        backend_fingerprint: identifies the VQ encoder's weights (a different model must not reuse ids).
        preprocess_id: identifies the image preprocessing (resolution, resampling…).

    Attributes:
        stats: ``hits`` (lookups and ``ensure`` images already cached), ``misses`` (lookups not
            cached) and ``encoded`` (images encoded by this object, each with its flip).
    """

    def __init__(self, root: str | Path, backend_fingerprint: str, preprocess_id: str) -> None:
        if not backend_fingerprint or not preprocess_id:
            raise DataError("a token cache needs a non-empty backend fingerprint and preprocessing id")
        key = hashlib.sha256(f"{CACHE_FORMAT}|{backend_fingerprint}|{preprocess_id}".encode()).hexdigest()[
            :16
        ]
        self.root = Path(root) / key
        self.root.mkdir(parents=True, exist_ok=True)
        self.stats = {"hits": 0, "misses": 0, "encoded": 0}
        self._hashes: dict[Path, tuple[tuple[int, int], str]] = {}
        self._memory: dict[str, np.ndarray] = {}

    def content_hash(self, path: str | Path) -> str:
        """SHA-256 of the file, memoised per (path, size, mtime)."""
        p = Path(path)
        try:
            st = p.stat()
        except OSError as exc:
            raise DataError(f"image {p} cannot be read: {exc}") from exc
        stamp = (st.st_size, st.st_mtime_ns)
        cached = self._hashes.get(p)
        if cached is None or cached[0] != stamp:
            cached = (stamp, file_sha256(p))
            self._hashes[p] = cached
        return cached[1]

    def _entry(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.npy"

    def _load(self, digest: str) -> np.ndarray | None:
        if digest in self._memory:
            return self._memory[digest]
        entry = self._entry(digest)
        if not entry.is_file():
            return None
        try:
            arr = np.load(entry, allow_pickle=False)
        except (OSError, ValueError):
            return None  # a damaged entry is encoded again
        if arr.ndim != 2 or arr.shape[0] != 2:
            return None
        self._memory[digest] = arr
        return arr

    def contains(self, image_path: str | Path) -> bool:
        """Whether ``image_path`` (and its flip) are cached. Does not touch ``stats``."""
        return self._load(self.content_hash(image_path)) is not None

    def get(self, image_path: str | Path, flip: bool = False) -> np.ndarray | None:
        """Cached ids (``int32``) of an image or of its mirror image, or ``None``."""
        arr = self._load(self.content_hash(image_path))
        if arr is None:
            self.stats["misses"] += 1
            return None
        self.stats["hits"] += 1
        return arr[1 if flip else 0]

    def _write(self, digest: str, plain: list[int], flipped: list[int], source: Path) -> None:
        a, b = np.asarray(plain), np.asarray(flipped)
        if a.ndim != 1 or a.size == 0 or a.shape != b.shape:
            raise DataError(
                f"the encoder returned ids of shapes {a.shape} and {b.shape} for {source} and its "
                "flip; expected two equal non-empty 1-D sequences"
            )
        if not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
            raise DataError(f"the encoder returned non-integer ids for {source}")
        arr = np.stack([a, b]).astype(np.int32)
        entry = self._entry(digest)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as fh:
                np.save(fh, arr)
            os.replace(tmp, entry)
        finally:
            tmp.unlink(missing_ok=True)
        self._memory[digest] = arr

    def ensure(
        self,
        image_paths: Iterable[str | Path],
        encode_fn: EncodeFn,
        batch_size: int = 8,
        progress: bool = True,
    ) -> int:
        """Encode every image (with its flip) that is not cached yet.

        Args:
            image_paths: the images; duplicates (same path or same content) are encoded once.
            encode_fn: the backend's VQ encoder, ``list[PIL.Image] -> list[list[int]]``.
            batch_size: images per ``encode_fn`` call, flips included (so ``batch_size // 2``
                distinct images per call, at least one).
            progress: show a progress bar.

        Returns:
            How many images were newly encoded (each with its flip).

        Raises:
            DataError: an image cannot be read, or ``encode_fn`` returns the wrong number or shape
                of id lists. Whatever finished before stays cached.
        """
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        todo: dict[str, Path] = {}
        for p in image_paths:
            digest = self.content_hash(p)
            if digest in todo:
                continue
            if self._load(digest) is not None:
                self.stats["hits"] += 1
            else:
                todo[digest] = Path(p)
        items = list(todo.items())
        per_call = max(1, batch_size // 2)
        encoded = 0
        with tqdm(total=len(items), desc="VQ-encode", unit="img", disable=not progress or not items) as bar:
            for start in range(0, len(items), per_call):
                chunk = items[start : start + per_call]
                images: list[Image.Image] = []
                for _, path in chunk:
                    try:
                        im = load_rgb(path)
                    except DataError as exc:
                        raise DataError(f"cannot encode {path}: {exc}") from exc
                    images += [im, ImageOps.mirror(im)]
                ids = list(encode_fn(images))
                if len(ids) != len(images):
                    raise DataError(f"the encoder returned {len(ids)} id lists for {len(images)} images")
                for j, (digest, path) in enumerate(chunk):
                    self._write(digest, ids[2 * j], ids[2 * j + 1], path)
                    encoded += 1
                    self.stats["encoded"] += 1
                bar.update(len(chunk))
        return encoded
