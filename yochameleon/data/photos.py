"""Load and sanitise concept photos: bad files are skipped and counted, odd formats are converted.

Skipped, each with a logged warning and a count per reason (:data:`SKIP_REASONS`): files that are
not images, 0-byte, unreadable or truncated files, decompression bombs, exact duplicates (the same
decoded pixels) and symlinks that leave the concept folder.

Converted to 8-bit RGB: CMYK, palette (with or without transparency), grey, LA/RGBA and
premultiplied alpha (composited on white), 16-bit and 32-bit integer and float images (scaled, not
clipped), after applying the EXIF orientation. Tiny and huge images are kept at their size (the
backend resizes); the pixel limit that marks a decompression bomb is checked before decoding.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from yochameleon.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Above any camera photo (a 8000 x 10000 sensor) but far below what exhausts memory. Checked from the
# header before decoding, so a bomb costs nothing. Kept below PIL's own global limit on purpose: we
# never change PIL's global setting.
MAX_PIXELS = 80_000_000
# Smaller than this on either side is kept but reported: the backend will upscale it a lot.
TINY_SIDE = 32

SKIP_NOT_IMAGE = "not an image file"
SKIP_EMPTY = "empty file"
SKIP_UNREADABLE = "not a readable image"
SKIP_BOMB = "decompression bomb"
SKIP_DUPLICATE = "duplicate photo"
SKIP_SYMLINK = "symlink outside the concept folder"
SKIP_BROKEN_LINK = "broken symlink"
SKIP_REASONS = (
    SKIP_NOT_IMAGE,
    SKIP_EMPTY,
    SKIP_UNREADABLE,
    SKIP_BOMB,
    SKIP_DUPLICATE,
    SKIP_SYMLINK,
    SKIP_BROKEN_LINK,
)


class PhotoError(DataError):
    """One image cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Photo:
    """A usable photo.

    Args:
        path: where it is (inside the photo folder; symlinks inside the concept folder are kept).
        sha256: hash of the file's bytes (what caches and data directories are keyed by).
        size: ``(width, height)`` after EXIF orientation.
    """

    path: Path
    sha256: str
    size: tuple[int, int]


@dataclass
class PhotoReport:
    """Usable photos plus what was skipped and why.

    Attributes:
        photos: the usable photos, in file-name order.
        skipped: count per skip reason.
        details: one ``"file: reason"`` line per skipped file.
        notes: remarks on kept photos (tiny images).
    """

    photos: list[Photo] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        """How many files were skipped in all."""
        return sum(self.skipped.values())

    def skip(self, path: Path, reason: str) -> None:
        """Record that ``path`` was skipped for ``reason`` and warn about it."""
        self.skipped[reason] += 1
        self.details.append(f"{path.name}: {reason}")
        logger.warning("skipping photo %s: %s", path, reason)

    def summary(self) -> str:
        """One line: usable count and the skip counts per reason."""
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{len(self.photos)} usable photos" + (f"; skipped {parts}" if parts else "")


def _scale_to_uint8(arr: np.ndarray, full_scale: float) -> np.ndarray:
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit grey, scaled by the format's range (not clipped)."""
    arr = np.asarray(image)
    if image.mode == "F":
        # Float images are usually 0..1; anything larger is treated as 0..255 data.
        hi = float(np.nanmax(arr)) if arr.size else 0.0
        arr = np.nan_to_num(arr, nan=0.0)
        return Image.fromarray(_scale_to_uint8(arr, 1.0 if hi <= 1.0 else 255.0), "L")
    hi = int(arr.max()) if arr.size else 0
    # 16-bit data (I;16*, or a 16-bit PNG opened as "I") scales by 65535; 32-bit "I" data holding
    # only 0..255 is 8-bit data in a wide container (a 16-bit photo that dark would be black anyway).
    if image.mode == "I" and hi <= 255:
        full = 255.0
    else:
        full = 65535.0 if hi <= 65535 else float(2**31 - 1)
    return Image.fromarray(_scale_to_uint8(np.clip(arr, 0, None), full), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB the way a person would expect.

    EXIF orientation is applied; transparent areas become white; high-bit-depth images are scaled
    to 0..255 by their format's range.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBa", "La"):  # premultiplied alpha
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode == "1":
        image = image.convert("L")
    try:
        return image.convert("RGB")
    except ValueError as exc:  # e.g. LAB without a conversion path
        raise PhotoError(SKIP_UNREADABLE, f"cannot convert mode {image.mode} to RGB: {exc}") from exc


def check_pixels(image: Image.Image) -> None:
    """Refuse an opened (not yet decoded) image with more than :data:`MAX_PIXELS` pixels.

    Raises:
        PhotoError: the header claims too many pixels (reason :data:`SKIP_BOMB`).
    """
    w, h = image.size
    if w * h > MAX_PIXELS:
        # The count leads, as in the message for PIL's own refusal (which knows no width and height).
        raise PhotoError(SKIP_BOMB, f"{w * h:,} pixels ({w}x{h}) is more than the limit of {MAX_PIXELS:,}")


def open_image(path: str | Path) -> Image.Image:
    """Open an image without decoding it, refusing one over the pixel limit.

    The project's one pixel limit: concept photos, ``ask --image``, held-out and test-set photos and
    the retrieval pool all open their files here. :data:`MAX_PIXELS` is checked first, so every
    over-limit image gets the same message; PIL's own bomb warning (reachable only when the limit is
    raised past PIL's) and error count as bombs too. PIL's global limit is never changed.

    Raises:
        PhotoError: over the limit (reason :data:`SKIP_BOMB`). Other errors of ``Image.open``
            (missing, unidentified files) propagate.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as exc:
            # PIL refuses more than twice its own limit before we see the size; say it as we do.
            claimed = re.search(r"\((\d+) pixels\)", str(exc))
            if claimed and int(claimed.group(1)) > MAX_PIXELS:
                detail = f"{int(claimed.group(1)):,} pixels is more than the limit of {MAX_PIXELS:,}"
                raise PhotoError(SKIP_BOMB, detail) from exc
            raise PhotoError(SKIP_BOMB, str(exc)) from exc
    try:
        check_pixels(image)
        bombs = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
        if bombs:
            raise PhotoError(SKIP_BOMB, str(bombs[0].message))
    except PhotoError:
        image.close()
        raise
    return image


def load_rgb(path: str | Path) -> Image.Image:
    """Open one image as 8-bit RGB, refusing empty files and decompression bombs.

    The pixel limit (:data:`MAX_PIXELS`) is checked from the header before decoding (see
    :func:`open_image`).

    Raises:
        PhotoError: (a :class:`DataError`) the file is empty, not an image, truncated or too large.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise PhotoError(SKIP_UNREADABLE, str(exc)) from exc
    if size == 0:
        raise PhotoError(SKIP_EMPTY)
    try:
        with open_image(p) as im:
            im.load()
            return to_rgb(im)
    except PhotoError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise PhotoError(SKIP_UNREADABLE, str(exc)) from exc


def load_image_file(path: str | Path) -> Image.Image:
    """Open one image a user names directly (``ask --image``, a test set, held-out photos) as RGB.

    The same checks as :func:`load_rgb`; the error is one line that names the file.

    Raises:
        DataError: the file is missing, a directory, empty, not an image, truncated or over the
            pixel limit.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"image {p} does not exist")
    if p.is_dir():
        raise DataError(f"image {p} is a directory, not an image file")
    try:
        return load_rgb(p)
    except PhotoError as exc:
        raise DataError(f"cannot use image {p}: {exc}") from exc


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pixel_sha256(image: Image.Image) -> str:
    """Hash of decoded pixels and size: equal for the same photo saved in two files or formats."""
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def load_photos(folder: str | Path, min_photos: int = 3, root: str | Path | None = None) -> PhotoReport:
    """Every usable photo in ``folder`` (not recursive), in file-name order.

    Args:
        folder: the photo folder.
        min_photos: fewest usable photos accepted.
        root: symlinks must resolve inside this folder (the concept folder); default ``folder``.

    Raises:
        DataError: the folder is missing, or fewer than ``min_photos`` usable photos remain; the
            message lists every skipped file and why.
    """
    if min_photos < 1:
        raise DataError(f"min_photos must be at least 1, got {min_photos}")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"photo folder {folder} does not exist")
    bound = Path(root if root is not None else folder).resolve()
    report = PhotoReport()
    seen: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue  # .DS_Store and friends are not the user's photos
        if path.is_symlink():
            target = path.resolve()
            if not _is_within(target, bound):
                report.skip(path, SKIP_SYMLINK)
                continue
            if not target.exists():
                report.skip(path, SKIP_BROKEN_LINK)
                continue
        if path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            report.skip(path, SKIP_NOT_IMAGE)
            continue
        try:
            image = load_rgb(path)
        except PhotoError as exc:
            report.skip(path, exc.reason)
            continue
        pixels = pixel_sha256(image)
        if pixels in seen:
            report.skip(path, SKIP_DUPLICATE)
            continue
        seen[pixels] = path
        if min(image.size) < TINY_SIDE:
            report.notes.append(f"{path.name}: tiny ({image.size[0]}x{image.size[1]}), kept")
            logger.warning("photo %s is tiny (%dx%d); kept, the backend will upscale it", path, *image.size)
        report.photos.append(Photo(path, file_sha256(path), image.size))
    if len(report.photos) < min_photos:
        skipped = "; ".join(report.details) or "nothing was skipped"
        raise DataError(
            f"{folder} has {len(report.photos)} usable photos, at least {min_photos} are needed "
            f"(skipped: {skipped})"
        )
    return report
