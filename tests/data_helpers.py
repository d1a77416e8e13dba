"""Image and folder helpers for the concept-data tests (generated images and ``skimage.data`` photos)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    """A seeded random RGB image converted to ``mode`` (distinct seeds give distinct pixels)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def save_noise(path: Path, seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Path:
    """Save :func:`noise_image` to ``path`` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(seed, size, mode).save(path)
    return path


def skimage_photo(name: str) -> Image.Image:
    """A photo that ships with scikit-image (``astronaut``, ``chelsea``, ``coffee``, ``rocket``…)."""
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width x height`` pixels but holds almost no data (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )
    return path


def make_concept(
    root: Path,
    n_photos: int = 4,
    yaml_text: str | None = None,
    qa_lines: list | None = None,
    size: tuple[int, int] = (64, 64),
    seed0: int = 0,
) -> Path:
    """A concept folder with ``n_photos`` noise photos, optional ``concept.yaml`` and ``qa.jsonl``."""
    for i in range(n_photos):
        save_noise(root / "photos" / f"p{i}.png", seed0 + i, size)
    if yaml_text is not None:
        (root / "concept.yaml").write_text(yaml_text, encoding="utf-8")
    if qa_lines is not None:
        (root / "qa.jsonl").write_text(
            "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in qa_lines),
            encoding="utf-8",
        )
    return root


def pool(folder: Path, n: int, seed0: int, size: tuple[int, int] = (16, 16)) -> list[Path]:
    """``n`` distinct small images in ``folder`` (a stand-in for retrieved pool images)."""
    return [save_noise(folder / f"img{seed0 + i}.png", seed0 + i, size) for i in range(n)]


def spec_bins(count: int, n_g: int) -> list[int]:
    """Token counts of ``count`` soft positives in ascending-similarity order (spec §4.2, written out)."""
    k = n_g - 1
    q, r = divmod(count, k)
    out = []
    for i in range(k):
        out += [i + 1] * (q + (1 if i < r else 0))
    return out


def untrained_encoder(
    backend, path: Path, n_g: int, n_u: int, training_identities=(), self_prompting=True
) -> Path:
    """An encoder file for ``backend`` with its initial weights (it writes the ``init=base`` rows): enough
    for code that only needs a valid encoder of some layout. ``training_identities`` go into its sidecar.
    """
    from yochameleon.concept import ConceptSpec, attach, concept_rows, detach
    from yochameleon.config import to_dict
    from yochameleon.encoder import ConceptEncoder, EncoderConfig, EncoderFileMeta, save_encoder

    spec = ConceptSpec("encoder-helper", n_g, n_u)
    attach(backend, spec)
    rows = concept_rows(backend, spec.name)
    detach(backend, spec.name)
    config = EncoderConfig(d_model=32, layers=1, heads=4)
    encoder = ConceptEncoder(backend.hidden_size, backend.hidden_size, spec.n_tokens, config, base_rows=rows)
    meta = EncoderFileMeta(
        n_g=n_g,
        n_u=n_u,
        shared=False,
        architecture=to_dict(config),
        feature_dim=backend.hidden_size,
        hidden_size=backend.hidden_size,
        base_model=str(backend.name_or_path),
        base_family=backend.family,
        base_fingerprint=backend.fingerprint(),
        training_identities=list(training_identities),
        training_config={"method": {"self_prompting": self_prompting}},
    )
    return save_encoder(encoder, meta, path)[0]
