"""Photo loading and sanitising: bad files, odd modes, EXIF, duplicates, symlinks, bombs, skimage photos."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from data_helpers import noise_image, png_header_only, save_noise, skimage_photo
from PIL import Image

import yochameleon.data.photos as ph
from yochameleon.data.photos import PhotoError, load_photos, load_rgb, to_rgb
from yochameleon.errors import DataError


def test_bad_files_are_skipped_counted_and_warned(tmp_path, caplog):
    d = tmp_path / "concept" / "photos"
    for i in range(3):
        save_noise(d / f"ok{i}.png", i)
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("hello")
    (d / "fake.jpg").write_text("not a jpeg at all")
    good = (d / "ok0.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    jpeg = tmp_path / "x.jpg"
    noise_image(7, (64, 64)).save(jpeg, quality=90)
    (d / "truncated.jpg").write_bytes(jpeg.read_bytes()[:300])
    (d / "zz_same_bytes.png").write_bytes(good)
    noise_image(1).save(d / "zz_same_pixels.bmp")  # ok1.png's pixels in another format
    os.symlink(save_noise(tmp_path / "outside.png", 9), d / "link_out.png")
    os.symlink(d.parent / "gone.png", d / "link_broken.png")
    (d / ".DS_Store").write_bytes(b"\0\1")
    with caplog.at_level(logging.WARNING, logger="yochameleon.data.photos"):
        report = load_photos(d, root=d.parent)
    assert [p.path.name for p in report.photos] == ["ok0.png", "ok1.png", "ok2.png"]
    assert dict(report.skipped) == {
        "empty file": 1,
        "not an image file": 1,
        "not a readable image": 3,  # fake.jpg, truncated.png, truncated.jpg
        "duplicate photo": 2,
        "symlink outside the concept folder": 1,
        "broken symlink": 1,
    }
    assert report.n_skipped == 9
    assert len([r for r in caplog.records if "skipping photo" in r.message]) == 9
    assert "truncated.jpg: not a readable image" in report.details
    assert report.summary().startswith("3 usable photos; skipped")


def test_photo_fields_hash_the_file_bytes(tmp_path):
    d = tmp_path / "photos"
    paths = [save_noise(d / f"{i}.png", i, (30, 20)) for i in range(3)]
    report = load_photos(d)
    import hashlib

    assert [p.sha256 for p in report.photos] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert all(p.size == (30, 20) for p in report.photos)


def test_symlink_inside_the_concept_folder_is_followed(tmp_path):
    root = tmp_path / "concept"
    d = root / "photos"
    for i in range(2):
        save_noise(d / f"{i}.png", i)
    save_noise(root / "extra" / "x.png", 5)
    os.symlink(root / "extra" / "x.png", d / "link_in.png")
    report = load_photos(d, min_photos=3, root=root)
    assert [p.path.name for p in report.photos] == ["0.png", "1.png", "link_in.png"]
    # Bounded by the photo folder itself, the same link leaves it and is skipped.
    with pytest.raises(DataError, match="symlink outside"):
        load_photos(d, min_photos=3)


def test_too_few_photos_names_every_skip(tmp_path):
    d = tmp_path / "photos"
    save_noise(d / "a.png", 0)
    (d / "b.png").write_bytes(b"")
    (d / "c.gif").write_text("GIF89a?")
    with pytest.raises(
        DataError, match=r"1 usable photos, at least 3.*b.png: empty file; c.gif: not a readable"
    ):
        load_photos(d)
    with pytest.raises(DataError, match="does not exist"):
        load_photos(tmp_path / "missing")
    with pytest.raises(DataError, match="min_photos"):
        load_photos(d, min_photos=0)


def test_decompression_bombs_are_refused_three_ways(tmp_path, monkeypatch):
    limit_before = Image.MAX_IMAGE_PIXELS
    # 1. Our own limit, checked from the header before decoding.
    with pytest.raises(PhotoError, match="decompression bomb") as info:
        load_rgb(png_header_only(tmp_path / "ours.png", 9000, 9500))  # 85.5 MP > MAX_PIXELS, < PIL's limit
    assert info.value.reason == "decompression bomb"
    # 2. PIL's error (more than twice its limit) at open time.
    with pytest.raises(PhotoError, match="decompression bomb"):
        load_rgb(png_header_only(tmp_path / "pil_error.png", 30000, 30000))
    # 3. PIL's warning (between its limit and twice it) counts too, even if our limit is higher.
    monkeypatch.setattr(ph, "MAX_PIXELS", 10**12)
    with pytest.raises(PhotoError, match="decompression bomb"):
        load_rgb(png_header_only(tmp_path / "pil_warning.png", 10000, 10000))
    assert Image.MAX_IMAGE_PIXELS == limit_before  # never changed globally
    d = tmp_path / "photos"
    for i in range(3):
        save_noise(d / f"{i}.png", i)
    png_header_only(d / "bomb.png", 30000, 30000)
    assert load_photos(d).skipped["decompression bomb"] == 1


def test_local_limit_applies(tmp_path, monkeypatch):
    p = save_noise(tmp_path / "big.png", 0, (200, 200))
    assert load_rgb(p).size == (200, 200)
    monkeypatch.setattr(ph, "MAX_PIXELS", 10_000)
    with pytest.raises(DataError, match="decompression bomb"):
        load_rgb(p)


def test_cmyk_palette_grey_and_bilevel_become_rgb(tmp_path):
    src = noise_image(3, (32, 24))
    ref = np.asarray(src).astype(int)
    src.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    cmyk = np.asarray(load_rgb(tmp_path / "cmyk.jpg")).astype(int)
    assert abs(cmyk - ref).mean() < 12  # close to the original colours, not inverted
    src.convert("CMYK").save(tmp_path / "cmyk.tif")
    assert np.array_equal(
        np.asarray(load_rgb(tmp_path / "cmyk.tif")), np.asarray(src.convert("CMYK").convert("RGB"))
    )
    pal = src.quantize(16)
    pal.save(tmp_path / "p.png")
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "p.png")), np.asarray(pal.convert("RGB")))
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    assert load_rgb(tmp_path / "l.png").getpixel((0, 0)) == (77, 77, 77)
    Image.new("1", (4, 4), 1).save(tmp_path / "b.png")
    assert load_rgb(tmp_path / "b.png").getpixel((0, 0)) == (255, 255, 255)


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 0))
    rgba.putpixel((1, 1), (200, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    rgba.save(tmp_path / "a.png")
    im = load_rgb(tmp_path / "a.png")
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not the hidden red
    assert im.getpixel((1, 1)) == (200, 0, 0)
    assert all(abs(c - 127) <= 1 for c in im.getpixel((2, 2)))  # half black over white
    la = Image.new("LA", (2, 2), (0, 0))
    la.save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pt.png", transparency=0)
    assert load_rgb(tmp_path / "pt.png").getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped_or_stretched(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    arr[0, 0], arr[0, 1] = 0, 65535
    Image.fromarray(arr).save(tmp_path / "g16.png")
    reopened = Image.open(tmp_path / "g16.png")
    assert reopened.mode in ("I;16", "I")  # a real 16-bit file
    out = np.asarray(load_rgb(tmp_path / "g16.png"))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255 and out[4, 4, 0] == 128
    # A dark 16-bit image stays dark (a min-max stretch would turn it white).
    dark = np.full((4, 4), 1000, dtype=np.uint16)
    dark[0, 0] = 2000
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert np.asarray(load_rgb(tmp_path / "dark.png")).max() == round(2000 * 255 / 65535)
    flt = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), "F")
    assert to_rgb(flt).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = load_rgb(tmp_path / "o.jpg")
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 2)), out.getpixel((10, 37))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_tiny_and_huge_images_are_kept(tmp_path, caplog):
    d = tmp_path / "photos"
    save_noise(d / "tiny.png", 0, (3, 2))
    huge = Image.new("RGB", (7000, 5000), (10, 120, 30))
    huge.paste(noise_image(1, (50, 50)), (0, 0))
    huge.save(d / "huge.jpg", quality=80)
    save_noise(d / "normal.png", 2, (100, 80))
    with caplog.at_level(logging.WARNING, logger="yochameleon.data.photos"):
        report = load_photos(d)
    sizes = {p.path.name: p.size for p in report.photos}
    assert sizes == {"huge.jpg": (7000, 5000), "normal.png": (100, 80), "tiny.png": (3, 2)}
    assert report.notes == ["tiny.png: tiny (3x2), kept"] and "tiny" in caplog.text
    assert load_rgb(d / "tiny.png").mode == "RGB"


def test_skimage_photos_in_many_formats(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    skimage_photo("astronaut").save(d / "astronaut.jpg", quality=90)
    chelsea = skimage_photo("chelsea")
    chelsea.save(d / "chelsea.png")
    skimage_photo("cat").save(d / "cat.bmp")  # skimage's "cat" is Chelsea again: a duplicate
    skimage_photo("coffee").convert("CMYK").save(d / "coffee_cmyk.jpg", quality=95)
    rocket = skimage_photo("rocket").convert("RGBA")
    rocket.putalpha(200)
    rocket.save(d / "rocket_alpha.png")
    skimage_photo("immunohistochemistry").save(d / "ihc.webp", lossless=True)
    report = load_photos(d)
    sizes = {p.path.name: p.size for p in report.photos}
    assert sizes == {
        "astronaut.jpg": (512, 512),
        "cat.bmp": (451, 300),
        "coffee_cmyk.jpg": (600, 400),
        "ihc.webp": (512, 512),
        "rocket_alpha.png": (640, 427),
    }
    assert report.skipped == {"duplicate photo": 1} and report.details == ["chelsea.png: duplicate photo"]
    for p in report.photos:
        assert load_rgb(p.path).mode == "RGB"
    # Alpha over white: every pixel is at least as bright as the opaque photo scaled by 200/255.
    out = np.asarray(load_rgb(d / "rocket_alpha.png")).astype(int)
    assert (out >= 255 - 200 - 1).all()
    assert np.array_equal(np.asarray(load_rgb(d / "chelsea.png")), np.asarray(chelsea))
