"""Our Chameleon VQGAN decoder: Anole checkpoint layout, decoding, safetensors I/O, bad input, learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

from yochameleon.backends.chameleon_vq import (
    DECODER_PREFIX,
    DECODER_SHARD,
    POST_QUANT_CONV_PREFIX,
    ChameleonVQDecoder,
    attach_vq_decoder,
    decode_codes,
    expected_decoder_shapes,
    load_vq_decoder_state,
    load_vq_post_quant_conv_state,
    reconstruct,
    save_vq_decoder_state,
)
from yochameleon.errors import BackendError, ConfigError

FIXTURE = Path(__file__).parent / "assets" / "anole_vqmodel_keys.json"
TINY = dict(
    base_channels=32,
    channel_multiplier=[1, 2, 4],
    embed_dim=16,
    num_embeddings=64,
    resolution=32,
    latent_channels=16,
    num_res_blocks=1,
)


@pytest.fixture(scope="module")
def anole() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture
def one_thread():
    # Tiny convs on a shared 2-core box: two OpenMP threads under contention are ~30x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_pair(seed: int = 0, **overrides) -> tuple[ChameleonVQVAE, ChameleonVQDecoder]:
    torch.manual_seed(seed)
    config = ChameleonVQVAEConfig(**{**TINY, **overrides})
    return ChameleonVQVAE(config).eval(), ChameleonVQDecoder(config).eval()


def smooth_images(n: int, size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack(
        [torch.stack([torch.sin(3 * xx + i), torch.cos(2 * yy - i), xx * yy * (i % 3 - 1)]) for i in range(n)]
    ).clamp(-1, 1)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------------------- layout


def test_decoder_matches_anole_checkpoint_layout_on_meta(anole):
    config = ChameleonVQVAEConfig(**anole["config"])
    with torch.device("meta"):
        decoder = ChameleonVQDecoder(config)
        upstream = ChameleonVQVAE(config)
    assert all(p.is_meta for p in decoder.parameters())  # nothing was allocated for the 7B-size decoder
    fixture = {name: tuple(shape) for name, shape in anole["state_dict_shapes"].items()}

    ours = {DECODER_PREFIX + name: tuple(t.shape) for name, t in decoder.state_dict().items()}
    fixture_decoder = {name: shape for name, shape in fixture.items() if name.startswith(DECODER_PREFIX)}
    assert ours == fixture_decoder
    assert len(ours) == 164

    # The rest of model.vqmodel.* (encoder, quantize, quant_conv, post_quant_conv) is upstream's, and
    # must line up with the fixture too: proves the fixture and our reading of the config agree.
    theirs = {"model.vqmodel." + name: tuple(t.shape) for name, t in upstream.state_dict().items()}
    assert theirs == {name: shape for name, shape in fixture.items() if not name.startswith(DECODER_PREFIX)}
    assert theirs[POST_QUANT_CONV_PREFIX + "weight"] == (256, 256, 1, 1)
    assert expected_decoder_shapes(config) == {
        n[len(DECODER_PREFIX) :]: s for n, s in fixture_decoder.items()
    }


def test_attention_levels_mirror_upstream_encoder():
    # With attn_resolutions set, the decoder has attention exactly on the levels where the encoder does.
    config = ChameleonVQVAEConfig(**{**TINY, "attn_resolutions": [16]})
    with torch.device("meta"):
        decoder = ChameleonVQDecoder(config)
        upstream = ChameleonVQVAE(config)
    enc_levels = {i for i, stage in enumerate(upstream.encoder.down) if len(stage.attn)}
    dec_levels = {i for i, stage in enumerate(decoder.up) if len(stage.attn)}
    assert enc_levels == dec_levels == {1}
    assert len(decoder.up[1].attn) == len(decoder.up[1].block) == TINY["num_res_blocks"] + 1

    without = ChameleonVQDecoder(ChameleonVQVAEConfig(**{**TINY, "attn_type": "none"}))
    assert not any(".attn" in name for name in without.state_dict())


@pytest.mark.parametrize(
    "override, message",
    [
        ({"base_channels": 48}, "multiples of 32"),
        ({"resolution": 30}, "not divisible"),
        ({"attn_type": "linear"}, "attn_type"),
        ({"channel_multiplier": []}, "non-empty"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
    ],
)
def test_invalid_config_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        ChameleonVQDecoder({**ChameleonVQVAEConfig(**TINY).to_dict(), **override})


def test_config_missing_field_is_refused():
    fields = ChameleonVQVAEConfig(**TINY).to_dict()
    del fields["latent_channels"]
    with pytest.raises(ConfigError, match="latent_channels"):
        ChameleonVQDecoder(fields)


# ---------------------------------------------------------------------------------------------- decode


def test_decode_codes_gives_configured_image_size(one_thread):
    vq, decoder = tiny_pair()
    codes = torch.randint(0, TINY["num_embeddings"], (2, 8 * 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        images = decode_codes(vq, decoder, codes)
        raw = decode_codes(vq, decoder, codes, clamp=False)
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, raw.clamp(-1, 1))
    assert not torch.allclose(images[0], images[1])  # different codes, different pictures
    assert images[0].std() > 0


def test_decode_codes_agrees_with_quantizer_layout(one_thread):
    # Codes read back from upstream's quantizer decode to exactly what the autoencoder pass produced:
    # the row-major grid layout and the codebook lookup match upstream's.
    vq, decoder = tiny_pair(seed=3)
    with torch.no_grad():
        out = reconstruct(vq, decoder, smooth_images(2))
        again = decode_codes(vq, decoder, out.codes, clamp=False)
        tokens = vq.encode(smooth_images(2)).image_tokens
    assert out.codes.shape == (2, 64)
    assert torch.equal(out.codes.flatten(), tokens.flatten())
    torch.testing.assert_close(again, out.pixels, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.zeros(2, 64), "integer"),
        (torch.zeros(64, dtype=torch.long), "shape"),
        (torch.zeros(2, 60, dtype=torch.long), "square"),
        (torch.full((1, 64), 64, dtype=torch.long), r"\[0, 64\)"),
        (torch.full((1, 64), -1, dtype=torch.long), r"\[0, 64\)"),
        (torch.zeros(0, 64, dtype=torch.long), "shape"),
    ],
)
def test_decode_codes_rejects_bad_codes(codes, message):
    vq, decoder = tiny_pair()
    with pytest.raises(BackendError, match=message):
        decode_codes(vq, decoder, codes)


def test_mismatched_vqmodel_and_decoder_are_refused():
    vq, _ = tiny_pair()
    other = ChameleonVQDecoder(ChameleonVQVAEConfig(**{**TINY, "latent_channels": 32}))
    with pytest.raises(BackendError, match="post_quant_conv"):
        decode_codes(vq, other, torch.zeros(1, 64, dtype=torch.long))
    with pytest.raises(BackendError, match="post_quant_conv"):
        reconstruct(vq, other, smooth_images(1))


@pytest.mark.parametrize(
    "pixels, message",
    [
        (torch.zeros(3, 32, 32), "float tensor"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.long), "float tensor"),
        (torch.zeros(1, 1, 32, 32), "channels"),
        (torch.zeros(1, 3, 30, 32), "multiple of 4"),
    ],
)
def test_reconstruct_rejects_bad_pixels(pixels, message):
    vq, decoder = tiny_pair()
    with pytest.raises(BackendError, match=message):
        reconstruct(vq, decoder, pixels)


def test_reconstruct_trains_a_toy_vq_autoencoder(one_thread):
    vq, decoder = tiny_pair(seed=0)
    vq.train()
    decoder.train()
    images = smooth_images(4)
    params = list(vq.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for _ in range(30):
        out = reconstruct(vq, decoder, images)
        mse = F.mse_loss(out.pixels, images)
        optimizer.zero_grad()
        (mse + out.embedding_loss).backward()
        if not losses:  # straight-through: the encoder gets gradient from the pixel loss
            assert vq.encoder.conv_in.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(mse.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------- I/O


def test_save_load_round_trip_single_file(tmp_path):
    _, decoder = tiny_pair()
    path = save_vq_decoder_state(decoder, tmp_path / "decoder.safetensors")
    assert path == tmp_path / "decoder.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        assert all(name.startswith(DECODER_PREFIX) for name in handle.keys())
    loaded = load_vq_decoder_state(path, ChameleonVQVAEConfig(**TINY))
    assert_same_state(loaded, decoder.state_dict())
    fresh = ChameleonVQDecoder(ChameleonVQVAEConfig(**TINY))
    fresh.load_state_dict(loaded)  # strict: names line up with the module
    assert_same_state(fresh.state_dict(), decoder.state_dict())


def test_save_merges_into_model_safetensors_keeping_other_tensors(tmp_path):
    vq, decoder = tiny_pair()
    other = {"model.embed_tokens.weight": torch.randn(10, 4), "lm_head.weight": torch.randn(10, 4)}
    save_file(other, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    decoder = decoder.to(torch.bfloat16)
    written = save_vq_decoder_state(decoder, tmp_path, post_quant_conv=vq.post_quant_conv)
    assert written == tmp_path / "model.safetensors"
    with safe_open(str(written), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        for name, tensor in other.items():
            assert torch.equal(handle.get_tensor(name), tensor)
    loaded = load_vq_decoder_state(tmp_path)
    assert_same_state(loaded, decoder.state_dict())
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    assert_same_state(load_vq_post_quant_conv_state(tmp_path, vq.config), vq.post_quant_conv.state_dict())


def test_save_load_round_trip_through_sharded_index(tmp_path):
    _, decoder = tiny_pair()
    # A sharded checkpoint where shard 2 already holds stale decoder tensors (as in a real Anole dump).
    stale = {DECODER_PREFIX + name: torch.zeros_like(t) for name, t in decoder.state_dict().items()}
    shards = {
        "model-00001-of-00002.safetensors": {"model.norm.weight": torch.randn(8)},
        "model-00002-of-00002.safetensors": {"lm_head.weight": torch.randn(5, 8), **stale},
    }
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, str(tmp_path / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    stale_stripped = {name[len(DECODER_PREFIX) :]: t for name, t in stale.items()}
    assert_same_state(load_vq_decoder_state(tmp_path), stale_stripped)  # read via the index

    written = save_vq_decoder_state(decoder, tmp_path)
    assert written == tmp_path / DECODER_SHARD
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.norm.weight"] == "model-00001-of-00002.safetensors"
    assert {index["weight_map"][name] for name in stale} == {DECODER_SHARD}
    expected_bytes = 8 * 4 + 5 * 8 * 4 + sum(t.numel() * 4 for t in decoder.state_dict().values())
    assert index["metadata"]["total_size"] == expected_bytes
    assert_same_state(load_vq_decoder_state(tmp_path, ChameleonVQVAEConfig(**TINY)), decoder.state_dict())
    # Explicit file lists work too.
    assert_same_state(load_vq_decoder_state([written]), decoder.state_dict())


def test_tiny_chameleon_checkpoint_with_side_decoder_file(tmp_path, one_thread):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(0)
    config = ChameleonConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vq_config=TINY,
        vocabulary_map={"<image>": 5},
    )
    model = ChameleonForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    decoder = ChameleonVQDecoder(model.config.vq_config)
    save_vq_decoder_state(decoder, tmp_path / DECODER_SHARD)

    # Transformers still loads the directory, and the VQ model it loads is the one we saved.
    reloaded = ChameleonForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert_same_state(reloaded.model.vqmodel.state_dict(), model.model.vqmodel.state_dict())

    with torch.no_grad():  # scramble post_quant_conv: attach must restore the checkpoint's
        reloaded.model.vqmodel.post_quant_conv.weight.add_(1.0)
    attached = attach_vq_decoder(reloaded.model.vqmodel, tmp_path)
    assert_same_state(
        reloaded.model.vqmodel.post_quant_conv.state_dict(), model.model.vqmodel.post_quant_conv.state_dict()
    )
    assert_same_state(attached.state_dict(), decoder.state_dict())
    assert not attached.training and not any(p.requires_grad for p in attached.parameters())
    codes = torch.randint(0, TINY["num_embeddings"], (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(
            decode_codes(reloaded.model.vqmodel, attached, codes),
            decode_codes(model.model.vqmodel, decoder, codes),
        )


# ---------------------------------------------------------------------------------------------- bad I/O


def test_load_rejects_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        load_vq_decoder_state(tmp_path / "nope")
    with pytest.raises(BackendError, match="no safetensors"):
        load_vq_decoder_state(tmp_path)
    with pytest.raises(BackendError, match="does not exist"):
        load_vq_decoder_state([tmp_path / "nope.safetensors"])


def test_load_rejects_checkpoint_without_decoder(tmp_path):
    vq, _ = tiny_pair()
    state = {"model.vqmodel." + name: t.contiguous() for name, t in vq.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(BackendError, match="no VQ decoder weights"):
        load_vq_decoder_state(tmp_path)
    with pytest.raises(BackendError, match="no VQ decoder weights"):
        attach_vq_decoder(vq, tmp_path)


def test_load_reports_wrong_shapes_missing_and_unexpected_names(tmp_path):
    _, decoder = tiny_pair()
    state = {DECODER_PREFIX + name: t.clone() for name, t in decoder.state_dict().items()}
    state[DECODER_PREFIX + "conv_out.weight"] = torch.zeros(3, 32, 5, 5)
    del state[DECODER_PREFIX + "norm_out.bias"]
    state[DECODER_PREFIX + "up.9.block.0.conv1.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(BackendError) as caught:
        load_vq_decoder_state(tmp_path / "bad.safetensors", ChameleonVQVAEConfig(**TINY))
    message = str(caught.value)
    assert "conv_out.weight: (3, 32, 5, 5) != expected (3, 32, 3, 3)" in message
    assert "missing 1: norm_out.bias" in message
    assert "unexpected 1: up.9.block.0.conv1.weight" in message
    # A decoder built for another config is refused the same way.
    with pytest.raises(BackendError, match="wrong shape"):
        load_vq_decoder_state(
            tmp_path / "bad.safetensors", ChameleonVQVAEConfig(**{**TINY, "base_channels": 64})
        )


def test_load_rejects_broken_index_and_corrupt_file(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "gone.safetensors"}})
    )
    with pytest.raises(BackendError, match="missing shards"):
        load_vq_decoder_state(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(BackendError, match="not a valid safetensors index"):
        load_vq_decoder_state(tmp_path)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(BackendError, match="cannot read safetensors"):
        load_vq_decoder_state(corrupt)


def test_save_rejects_meta_decoder(tmp_path):
    with torch.device("meta"):
        decoder = ChameleonVQDecoder(ChameleonVQVAEConfig(**TINY))
    with pytest.raises(BackendError, match="meta device"):
        save_vq_decoder_state(decoder, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()
