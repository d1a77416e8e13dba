"""Load and sanitise concept photos: bad files are skipped and counted, odd formats are converted.

Skipped (with a warning and a count per reason): unreadable, truncated, 0-byte and non-image files,
decompression bombs, exact duplicates (same decoded pixels), and symlinks that leave the folder.
Converted: CMYK, palette, alpha (composited on white), 16-bit and float images, EXIF orientation.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from yochameleon.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Far above any photo (a 100-megapixel camera) but well below what exhausts memory.
MAX_PIXELS = 120_000_000


@dataclass
class Photo:
    """A usable photo: its path, file hash and size."""

    path: Path
    sha256: str
    size: tuple[int, int]


@dataclass
class PhotoReport:
    """Usable photos plus what was skipped and why."""

    photos: list[Photo] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped[reason] += 1
        self.details.append(f"{path.name}: {reason}")
        logger.warning("skipping %s: %s", path, reason)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a person would expect."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open one image as RGB, refusing decompression bombs.

    Raises:
        DataError: the file is empty, not an image, truncated or too large.
    """
    p = Path(path)
    if p.stat().st_size == 0:
        raise DataError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_PIXELS
            try:
                with Image.open(p) as im:
                    im.load()
                    return to_rgb(im)
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"not a readable image ({exc})") from exc


def load_photos(folder: str | Path, min_photos: int = 3) -> PhotoReport:
    """Every usable photo in ``folder`` (not recursive), in name order.

    Raises:
        DataError: the folder is missing, or fewer than ``min_photos`` usable photos remain.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"photo folder {root} does not exist")
    report = PhotoReport()
    seen: set[str] = set()
    real_root = root.resolve()
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            report.skip(path, "not an image file")
            continue
        if path.is_symlink() and real_root not in path.resolve().parents:
            report.skip(path, "symlink outside the concept folder")
            continue
        try:
            image = load_rgb(path)
        except DataError as exc:
            report.skip(path, str(exc).split(" (")[0])
            continue
        pixels = hashlib.sha256(image.tobytes() + str(image.size).encode()).hexdigest()
        if pixels in seen:
            report.skip(path, "duplicate photo")
            continue
        seen.add(pixels)
        report.photos.append(Photo(path, hashlib.sha256(path.read_bytes()).hexdigest(), image.size))
    if len(report.photos) < min_photos:
        skipped = "; ".join(report.details) or "nothing was skipped"
        raise DataError(f"{root} has {len(report.photos)} usable photos, at least {min_photos} are needed "
                        f"(skipped: {skipped})")
    return report
