"""The VQ token cache: encode once with the flip, resume after a crash, share across runs and concepts."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from data_helpers import save_noise, skimage_photo
from PIL import Image, ImageOps

from yochameleon.data.token_cache import TokenCache, default_cache_dir
from yochameleon.errors import DataError


def fake_ids(image: Image.Image) -> list[int]:
    """A deterministic stand-in for a VQ encoder: 12 ids from a 2x2 thumbnail (differs under flips)."""
    return [int(v) for v in np.asarray(image.resize((2, 2), Image.NEAREST)).reshape(-1)]


class CountingEncoder:
    """Counts images; raises after ``fail_after`` images to simulate a crash or Ctrl-C."""

    def __init__(self, fail_after: int | None = None):
        self.images = 0
        self.calls: list[int] = []
        self.fail_after = fail_after

    def __call__(self, images):
        self.calls.append(len(images))
        out = []
        for im in images:
            if self.fail_after is not None and self.images >= self.fail_after:
                raise KeyboardInterrupt
            self.images += 1
            out.append(fake_ids(im))
        return out


@pytest.fixture
def images(tmp_path):
    return [save_noise(tmp_path / "img" / f"{i}.png", i, (32, 32)) for i in range(5)]


def test_second_ensure_encodes_nothing(tmp_path, images):
    enc = CountingEncoder()
    cache = TokenCache(tmp_path / "cache", "model-A", "512px")
    assert cache.ensure(images, enc, batch_size=4, progress=False) == 5
    assert enc.images == 10 and max(enc.calls) <= 4  # every image with its flip, batches respected
    assert cache.stats == {"hits": 0, "misses": 0, "encoded": 5}
    again = CountingEncoder()
    fresh = TokenCache(tmp_path / "cache", "model-A", "512px")  # a new run
    assert fresh.ensure(images, again, progress=False) == 0 and again.images == 0
    assert fresh.stats["hits"] == 5 and fresh.stats["encoded"] == 0
    for p in images:
        im = Image.open(p).convert("RGB")
        plain, flipped = fresh.get(p), fresh.get(p, flip=True)
        assert plain.dtype == np.int32 and plain.tolist() == fake_ids(im)
        assert flipped.tolist() == fake_ids(ImageOps.mirror(im)) != plain.tolist()


def test_crash_midway_keeps_finished_entries(tmp_path, images):
    cache = TokenCache(tmp_path / "cache", "model-A", "512px")
    crashing = CountingEncoder(fail_after=4)  # dies inside the third batch of one image + flip
    with pytest.raises(KeyboardInterrupt):
        cache.ensure(images, crashing, batch_size=2, progress=False)
    assert cache.stats["encoded"] == 2
    resumed = TokenCache(tmp_path / "cache", "model-A", "512px")
    assert sum(resumed.get(p) is not None for p in images) == 2
    enc = CountingEncoder()
    assert resumed.ensure(images, enc, batch_size=2, progress=False) == 3 and enc.images == 6
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_keyed_by_content_backend_and_preprocessing(tmp_path, images):
    TokenCache(tmp_path / "cache", "model-A", "512px").ensure(images, CountingEncoder(), progress=False)
    # The same bytes elsewhere (another concept's data directory) hit the cache.
    other_concept = tmp_path / "other" / "x.png"
    other_concept.parent.mkdir()
    shutil.copy(images[0], other_concept)
    enc = CountingEncoder()
    assert TokenCache(tmp_path / "cache", "model-A", "512px").ensure([other_concept, images[1]], enc) == 0
    # Another backend or preprocessing is another cache.
    for fp, pre in (("model-B", "512px"), ("model-A", "256px")):
        enc = CountingEncoder()
        assert TokenCache(tmp_path / "cache", fp, pre).ensure(images[:2], enc, progress=False) == 2
        assert enc.images == 4
    # Changed content is encoded again.
    save_noise(images[0], 99, (32, 32))
    cache = TokenCache(tmp_path / "cache", "model-A", "512px")
    assert cache.get(images[0]) is None and cache.stats["misses"] == 1
    assert cache.ensure(images, CountingEncoder(), progress=False) == 1


def test_duplicates_in_one_call_are_encoded_once(tmp_path, images):
    enc = CountingEncoder()
    dup = tmp_path / "dup.png"
    shutil.copy(images[0], dup)
    cache = TokenCache(tmp_path / "cache", "m", "p")
    assert cache.ensure([images[0], images[0], dup], enc, progress=False) == 1 and enc.images == 2


def test_damaged_entry_is_encoded_again(tmp_path, images):
    cache = TokenCache(tmp_path / "cache", "m", "p")
    cache.ensure(images[:1], CountingEncoder(), progress=False)
    entry = next((tmp_path / "cache").rglob("*.npy"))
    entry.write_bytes(b"garbage")
    fresh = TokenCache(tmp_path / "cache", "m", "p")
    assert fresh.get(images[0]) is None
    assert fresh.ensure(images[:1], CountingEncoder(), progress=False) == 1
    assert fresh.get(images[0]) is not None


def test_real_photo_and_bad_encoders(tmp_path):
    photo = tmp_path / "coffee.jpg"
    skimage_photo("coffee").save(photo)
    cache = TokenCache(tmp_path / "cache", "m", "p")
    with pytest.raises(DataError, match="returned 1 id lists for 2 images"):
        cache.ensure([photo], lambda ims: [[1, 2]], progress=False)
    with pytest.raises(DataError, match="two equal non-empty"):
        cache.ensure([photo], lambda ims: [[1, 2], [1]], progress=False)
    with pytest.raises(DataError, match="non-integer"):
        cache.ensure([photo], lambda ims: [[0.5], [0.5]], progress=False)
    assert cache.stats["encoded"] == 0 and cache.get(photo) is None
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    with pytest.raises(DataError, match="cannot encode .*bad.png"):
        cache.ensure([bad], CountingEncoder(), progress=False)
    with pytest.raises(DataError, match="batch_size"):
        cache.ensure([photo], CountingEncoder(), batch_size=0)
    with pytest.raises(DataError, match="fingerprint"):
        TokenCache(tmp_path / "cache", "", "p")
    with pytest.raises(DataError, match="cannot be read"):
        cache.get(tmp_path / "missing.png")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("YOCHAMELEON_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "token_cache"
