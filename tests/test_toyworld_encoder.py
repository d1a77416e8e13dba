"""The toy-world concept encoder: it trains on pretraining identities only (no development or held-out
identity reaches its data or its sidecar), on the benchmark pool less their own photos; the concepts it
encodes load on the toy base like trained ones and are refused on another base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yochameleon.eval.toyworld import ToyWorld
from yochameleon.eval.toyworld.bench import BenchConfig, BenchError, prepare_pool
from yochameleon.eval.toyworld.cli import register
from yochameleon.eval.toyworld.encoder import (
    ToyEncoderConfig,
    copy_pool,
    encoder_identities,
    encoder_pool,
    train_toy_encoder,
)

TOY_BASE = Path(BenchConfig().artifacts) / "base"


@pytest.fixture(scope="module")
def world():
    return ToyWorld(0)


def _keys(identities) -> set[str]:
    return {i.key for i in identities}


# ---- leakage -----------------------------------------------------------------------------------------
def test_encoder_identities_are_pretraining_identities_only(world):
    tested = _keys(world.splits["dev"]) | _keys(world.splits["heldout"])
    pretrain = _keys(world.splits["pretrain"])
    for n, seed in ((200, 0), (64, 3)):
        chosen = encoder_identities(n, seed, world)
        assert len(_keys(chosen)) == n and _keys(chosen) <= pretrain and not _keys(chosen) & tested
    # Every pretraining identity at most; a larger n extends the same list.
    assert _keys(encoder_identities(len(pretrain), 0, world)) == pretrain
    assert encoder_identities(64, 0, world) == encoder_identities(200, 0, world)[:64]
    with pytest.raises(BenchError, match="pretraining identities"):
        encoder_identities(len(pretrain) + 1, 0, world)


def test_tiny_run_trains_on_pretraining_identities_and_its_sidecar_says_so(tiny_dir, tmp_path, world):
    """The command's whole path (folders, recipe, train_encoder, sidecar check) on the tiny model."""
    from yochameleon.backends import load_backend
    from yochameleon.encoder import read_encoder_file

    config = ToyEncoderConfig(
        out=str(tmp_path / "enc"),
        n_identities=2,
        steps=2,
        overrides=(
            "concept.n_g=4",
            "encoder.d_model=32",
            "encoder.layers=1",
            "data.n_recognition=4",
            "data.n_hard_negatives=0",
            "data.n_easy_negatives=0",
            "data.n_soft_positives=2",
            "optim.grad_accum=2",
            "logging.progress=false",
        ),
    )
    result = train_toy_encoder(config, backend=load_backend(tiny_dir), progress=False, use_pool=False)
    assert result.steps == 2
    meta, _ = read_encoder_file(result.encoder_file)
    names = [i["name"] for i in meta.training_identities]
    assert names == [i.name for i in encoder_identities(2, 0, world)]
    pretrain = {i.name for i in world.splits["pretrain"]}
    tested = {i.name for split in ("dev", "heldout") for i in world.splits[split]}
    assert set(names) <= pretrain and not set(names) & tested
    # Every photo it saw is one of those identities' concept photos.
    for entry in meta.training_identities:
        assert Path(entry["concept_dir"]).parent == tmp_path / "enc" / "concepts"
        assert len(entry["photo_sha256"]) == 4
    recipe = (tmp_path / "enc" / "encoder-recipe.yaml").read_text()
    assert "max_steps: 2" in recipe and "index_dir: null" in recipe
    record = json.loads((tmp_path / "enc" / "identities.json").read_text())
    assert record["split"] == "pretrain" and len(record["identities"]) == 2


# ---- the pool less the training identities' photos ---------------------------------------------------
def test_encoder_pool_leaves_out_the_training_identities_own_photos(world, tmp_path):
    from yochameleon.retrieval import TestEmbedder, load_index

    work, size = tmp_path / "bench_work", 80
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"test embedder")
    prepare_pool(world, TestEmbedder(), weights, work, size, 1, progress=False)
    # A benchmark work folder is copied, never changed; the copy's index points at the copy's pool.
    source_meta = (work / "index" / "meta.json").read_text()
    enc = tmp_path / "enc"
    assert copy_pool(work, enc) and not copy_pool(work, enc)
    assert (work / "index" / "meta.json").read_text() == source_meta
    assert load_index(enc / "index").pool_root == (enc / "pool").resolve()

    items = world.pool_images(size, seed=1)
    shown = [it.identity for it in items if it.identity is not None]
    training = [shown[0], shown[1]]
    theirs = {f"{i:03d}.png" for i, it in enumerate(items) if it.identity in training}
    index_dir, dropped = encoder_pool(world, training, enc, size, 1, TestEmbedder())
    index = load_index(index_dir)
    assert dropped == len(theirs) >= 2 and len(index) == size - dropped
    assert not {e.path for e in index.entries} & theirs
    # Nothing was embedded again: the store holds just the copied chunks.
    chunks = sorted(p.name for p in (enc / "index" / "vectors").iterdir())
    assert sorted(p.name for p in (index_dir / "vectors").iterdir()) == chunks
    assert encoder_pool(world, training, enc, size, 1, TestEmbedder()) == (index_dir, dropped)  # reused
    # A pool that is not this seed's is refused.
    (enc / "encoder_pool.json").unlink()
    victim = sorted(theirs)[0]
    (enc / "pool" / victim).write_bytes(
        (enc / "pool" / ("000.png" if victim != "000.png" else "001.png")).read_bytes()
    )
    with pytest.raises(BenchError, match="is not photo"):
        encoder_pool(world, training, enc, size, 1, TestEmbedder())


# ---- encoded toy concepts load like trained ones -----------------------------------------------------
def test_encoded_toy_concept_loads_on_the_toy_base_and_is_refused_on_another(world, tiny_dir, tmp_path):
    from data_helpers import untrained_encoder

    from yochameleon.backends import load_backend
    from yochameleon.concept import get_bank, load_concept, read_concept_file
    from yochameleon.encoder import encode_folder
    from yochameleon.errors import IncompatibleBaseModelError

    toy = load_backend(TOY_BASE)
    encoder = untrained_encoder(toy, tmp_path / "encoder", n_g=16, n_u=4)
    identity = world.splits["dev"][0]
    folder = world.write_concept_folder(identity, tmp_path / identity.name)
    path = encode_folder(encoder, toy, folder, tmp_path / "encoded")
    meta, _ = read_concept_file(path)
    assert meta.name == identity.name and meta.training_config["init"] == "encoder"
    assert not (get_bank(toy) and get_bank(toy).concepts)  # encode leaves the base as it was
    fresh = load_backend(TOY_BASE)
    tokens = load_concept(fresh, path)
    assert tokens.spec.n_tokens == 1 + 16 + 4 and tokens.spec.name in get_bank(fresh).concepts
    with pytest.raises(IncompatibleBaseModelError):
        load_concept(load_backend(tiny_dir), path)


def test_cli_parses_encoder_options():
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["toyworld", "encoder", "--out", "o", "--identities", "64", "--steps", "300", "--pool-from", "w"]
    )
    assert (args.out, args.identities, args.steps, args.pool_from, args.threads) == ("o", 64, 300, "w", 1)
    with pytest.raises(SystemExit):
        parser.parse_args(["toyworld", "encoder"])  # --out is required
