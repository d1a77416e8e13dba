"""Embedders: the deterministic test embedder, the real OpenCLIP path (tiny random model), image loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from yochameleon.errors import ConfigError, DataError
from yochameleon.retrieval import (
    Embedder,
    OpenClipEmbedder,
    TestEmbedder,
    build_embedder,
    build_index,
    embedder_from_identity,
    identities_match,
    load_image_rgb,
)

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _pattern(seed: int, size: int = 48) -> Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "yochameleon-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="module")
def tiny_clip(tiny_config: Path) -> OpenClipEmbedder:
    return OpenClipEmbedder(model_config=tiny_config, random_weights=True, batch_size=3)


# --------------------------------------------------------------------------- test embedder
def test_test_embedder_is_deterministic_normalized_and_content_based():
    images = [_pattern(i) for i in range(6)]
    first = TestEmbedder(dim=64, seed=0).embed_images(images, progress=False)
    second = TestEmbedder(dim=64, seed=0).embed_images(images, progress=False)
    assert first.shape == (6, 64) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(first, second)
    assert isinstance(TestEmbedder(), Embedder)

    # A slightly noisy copy stays much closer than a different image.
    noisy = np.asarray(images[0]).astype(int) + np.random.default_rng(1).integers(-8, 9, (48, 48, 3))
    noisy_vec = TestEmbedder(dim=64).embed_images([Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))])
    assert float(noisy_vec[0] @ first[0]) > 0.95
    assert float(noisy_vec[0] @ first[0]) > max(float(noisy_vec[0] @ v) for v in first[1:])

    other_seed = TestEmbedder(dim=64, seed=1)
    assert not identities_match(other_seed.identity, TestEmbedder(dim=64).identity)
    assert not np.allclose(other_seed.embed_images(images, progress=False), first)


def test_test_embedder_texts_and_paths(tmp_path: Path):
    embedder = TestEmbedder(dim=32)
    texts = embedder.embed_texts(["a red dog", "A red DOG", "a blue car"], progress=False)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(texts[0], texts[1])
    assert float(texts[0] @ texts[2]) < 0.99
    _pattern(3).save(tmp_path / "x.png")
    np.testing.assert_allclose(
        embedder.embed_images([tmp_path / "x.png"], progress=False),
        embedder.embed_images([str(tmp_path / "x.png")], progress=False),
    )
    assert embedder.embed_images([], progress=False).shape == (0, 32)
    with pytest.raises(ConfigError, match="dim"):
        TestEmbedder(dim=0)


# --------------------------------------------------------------------------- image loading
def test_load_image_rgb_converts_awkward_modes(tmp_path: Path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    assert load_image_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)

    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert load_image_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)  # onto white, not black

    wide = np.linspace(0, 60000, 64, dtype=np.uint16).reshape(8, 8)
    sixteen = (
        Image.fromarray(wide).convert("I;16")
        if Image.fromarray(wide).mode != "I;16"
        else Image.fromarray(wide)
    )
    sixteen.save(tmp_path / "deep.png")
    rgb = np.asarray(load_image_rgb(tmp_path / "deep.png"))
    assert rgb.dtype == np.uint8 and rgb.min() == 0 and rgb.max() == 255  # rescaled, not clipped
    assert len(np.unique(rgb[..., 0])) > 32

    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert load_image_rgb(palette).mode == "RGB"


def test_load_image_rgb_rejects_unreadable_files(tmp_path: Path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    for name in ("zero.png", "text.png", "missing.png"):
        with pytest.raises(DataError, match="cannot read image"):
            load_image_rgb(tmp_path / name)


def test_decompression_bomb_is_a_data_error(tmp_path: Path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 px > 2 * limit -> PIL refuses
    with pytest.raises(DataError, match="cannot read image"):
        load_image_rgb(tmp_path / "big.png")


# --------------------------------------------------------------------------- OpenCLIP (real code path)
def test_open_clip_random_tiny_model_embeds_images_and_texts(tiny_clip: OpenClipEmbedder, tiny_config: Path):
    assert tiny_clip.dim == 32 and tiny_clip.model_name == "yochameleon-tiny-clip"
    images = [_pattern(i) for i in range(5)]  # 5 images, batch 3: two batches
    vectors = tiny_clip.embed_images(images, progress=False)
    assert vectors.shape == (5, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # Batching does not change results.
    np.testing.assert_allclose(tiny_clip.embed_images(images[3:], progress=False), vectors[3:], atol=1e-5)
    texts = tiny_clip.embed_texts(["a photo of a dog", "a cat"], progress=False)
    assert texts.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)

    identity = tiny_clip.identity
    json.dumps(identity)  # serialisable
    assert identity["random_weights"] is True and identity["model_config_sha256"]
    # Same seed -> same random model and identity; another seed -> another embedding space.
    same = OpenClipEmbedder(model_config=tiny_config, random_weights=True)
    np.testing.assert_allclose(same.embed_images(images, progress=False), vectors, atol=1e-6)
    assert identities_match(same.identity, identity)
    other = OpenClipEmbedder(model_config=tiny_config, random_weights=True, seed=1)
    assert not identities_match(other.identity, identity)
    assert not np.allclose(other.embed_images(images, progress=False), vectors, atol=1e-3)


def test_open_clip_weights_file_reproduces_the_saved_model(tiny_clip, tiny_config, tmp_path):
    import torch

    weights = tmp_path / "tiny.pt"
    torch.save(tiny_clip._net.state_dict(), weights)
    loaded = OpenClipEmbedder(
        model="yochameleon-tiny-clip", model_config=tiny_config, weights=weights, seed=99
    )
    images = [_pattern(i) for i in range(3)]
    np.testing.assert_array_equal(
        loaded.embed_images(images, progress=False), tiny_clip.embed_images(images, progress=False)
    )
    assert loaded.identity["weights_sha256"] and not identities_match(loaded.identity, tiny_clip.identity)

    # Identity round trip re-creates an equivalent embedder, and notices a changed weights file.
    again = embedder_from_identity(loaded.identity)
    np.testing.assert_array_equal(again.embed_images(images, progress=False), loaded.embed_images(images))
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in tiny_clip._net.state_dict().items()}
    torch.save(state, weights)
    with pytest.raises(ConfigError, match="does not match the stored identity"):
        embedder_from_identity(loaded.identity)


def test_open_clip_index_end_to_end(tiny_clip, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(6):
        _pattern(i).save(pool / f"{i}.png")
    index = build_index(pool, tmp_path / "idx", tiny_clip, progress=False)
    scores, ids = index.search_with(tiny_clip, images=[pool / "4.png"], k=1)
    assert index.entries[int(ids[0, 0])].path == "4.png" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    recreated = embedder_from_identity(index.identity)
    assert identities_match(recreated.identity, index.identity)


def test_open_clip_refuses_missing_or_conflicting_weight_sources(tiny_config: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="--random-weights"):
        OpenClipEmbedder(model_config=tiny_config)
    with pytest.raises(ConfigError, match="--pretrained TAG"):
        OpenClipEmbedder(model="ViT-B-32")
    with pytest.raises(ConfigError, match="not both"):
        OpenClipEmbedder(model="ViT-B-32", pretrained="openai", weights=tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="cannot be combined"):
        OpenClipEmbedder(model="ViT-B-32", pretrained="openai", random_weights=True)
    with pytest.raises(ConfigError, match="weights file not found"):
        OpenClipEmbedder(model="ViT-B-32", weights=tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="carries its own weights"):
        OpenClipEmbedder(model="hf-hub:org/repo", pretrained="openai")
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        OpenClipEmbedder(model="NoSuchNet-99", random_weights=True)
    with pytest.raises(ConfigError, match="registers model 'yochameleon-tiny-clip'"):
        OpenClipEmbedder(model="ViT-B-32", model_config=tiny_config, random_weights=True)
    with pytest.raises(ConfigError, match="needs a model"):
        OpenClipEmbedder(random_weights=True)
    with pytest.raises(ConfigError, match="batch_size"):
        OpenClipEmbedder(model_config=tiny_config, random_weights=True, batch_size=0)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        OpenClipEmbedder(model_config=bad_json, random_weights=True)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ConfigError, match="lacks open_clip keys"):
        OpenClipEmbedder(model_config=partial, random_weights=True)
    with pytest.raises(ConfigError, match="model config not found"):
        OpenClipEmbedder(model_config=tmp_path / "nope.json", random_weights=True)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot load weights"):
        OpenClipEmbedder(model_config=tiny_config, weights=garbage)


def test_factory_and_identity_dispatch(tiny_config: Path):
    embedder = build_embedder("test", dim=16, seed=None)
    assert isinstance(embedder, TestEmbedder) and embedder.dim == 16
    assert embedder_from_identity(embedder.identity).identity == embedder.identity
    clip = build_embedder("open_clip", model_config=str(tiny_config), random_weights=True, pretrained=None)
    assert isinstance(clip, OpenClipEmbedder)
    with pytest.raises(ConfigError, match="unknown embedder"):
        build_embedder("siglip")
    with pytest.raises(ConfigError, match="bad options"):
        build_embedder("test", colour=True)
    with pytest.raises(ConfigError, match="unknown embedder kind"):
        embedder_from_identity({"kind": "mystery"})


def test_open_clip_warns_of_random_weights_only_when_they_are_random(
    tiny_clip, tiny_config, tmp_path, caplog
):
    import logging

    import torch

    weights = tmp_path / "tiny.pt"
    torch.save(tiny_clip._net.state_dict(), weights)
    warning = "No pretrained weights loaded"
    with caplog.at_level(logging.WARNING):
        OpenClipEmbedder(model_config=tiny_config, weights=weights)
    assert warning not in caplog.text  # a checkpoint was loaded: open_clip's warning was a false alarm
    with caplog.at_level(logging.WARNING):
        OpenClipEmbedder(model_config=tiny_config, random_weights=True)
    assert warning in caplog.text  # really random: the warning stays
