"""A content-addressed cache of VQ token ids: every image is encoded once, with its flipped version.

Entries are keyed by the image file's content hash, the backend's fingerprint and its preprocessing
id, and stored as small ``.npy`` files written atomically (temporary name + rename), so an
interrupted run keeps what it finished and the next run resumes. The cache is shared across runs and
concepts: put it wherever you like (``TokenCache(root, ...)``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from yochameleon.data.photos import load_rgb


class TokenCache:
    """VQ ids per (image content, flip) for one backend and preprocessing."""

    def __init__(self, root: str | Path, backend_fingerprint: str, preprocess_id: str) -> None:
        key = hashlib.sha256(f"{backend_fingerprint}|{preprocess_id}".encode()).hexdigest()[:16]
        self.root = Path(root) / key
        self.root.mkdir(parents=True, exist_ok=True)
        self.stats = {"hits": 0, "misses": 0, "encoded": 0}
        self._hashes: dict[Path, str] = {}

    def _hash(self, path: Path) -> str:
        p = Path(path)
        if p not in self._hashes:
            self._hashes[p] = hashlib.sha256(p.read_bytes()).hexdigest()
        return self._hashes[p]

    def _entry(self, path: Path, flip: bool) -> Path:
        h = self._hash(path)
        return self.root / h[:2] / f"{h}{'-flip' if flip else ''}.npy"

    def get(self, image_path: str | Path, flip: bool = False) -> np.ndarray | None:
        """Cached ids of an image (or its mirror image), or ``None``."""
        entry = self._entry(Path(image_path), flip)
        if entry.is_file():
            self.stats["hits"] += 1
            return np.load(entry)
        self.stats["misses"] += 1
        return None

    def ensure(self, image_paths: list[str | Path], encode_fn: Callable[[list[Image.Image]], list[list[int]]],
               batch_size: int = 8, progress: bool = True) -> int:
        """Encode every image (and its flip) not cached yet. Returns how many images were encoded."""
        from tqdm.auto import tqdm

        todo = []
        for p in image_paths:
            for flip in (False, True):
                if not self._entry(Path(p), flip).is_file():
                    todo.append((Path(p), flip))
        encoded = 0
        bar = tqdm(total=len(todo), desc="VQ-encode", disable=not progress or not todo, leave=False)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = []
            for path, flip in chunk:
                im = load_rgb(path)
                images.append(ImageOps.mirror(im) if flip else im)
            for (path, flip), ids in zip(chunk, encode_fn(images), strict=True):
                entry = self._entry(path, flip)
                entry.parent.mkdir(parents=True, exist_ok=True)
                tmp = entry.with_suffix(f".{os.getpid()}.tmp")
                with tmp.open("wb") as fh:
                    np.save(fh, np.asarray(ids, dtype=np.int32))
                tmp.replace(entry)
                encoded += 1
            bar.update(len(chunk))
        bar.close()
        self.stats["encoded"] += encoded
        return encoded
