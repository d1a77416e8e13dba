"""The concept encoder on the tiny model: shapes, training on several identities, resume, the lock,
``encode`` to a concept file that loads like a trained one, ``concept.init_from`` warm starts, errors."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from yochameleon.backends import load_backend
from yochameleon.cli import main
from yochameleon.concept import ConceptSpec, attach, concept_rows, get_bank, load_concept, read_concept_file
from yochameleon.config import from_dict, load_config
from yochameleon.encoder import (
    ConceptEncoder,
    EncoderConfig,
    encode_concept,
    encode_folder,
    load_encoder,
    read_encoder_file,
)
from yochameleon.errors import ConceptError, ConfigError, DataError, IncompatibleBaseModelError, TrainingError
from yochameleon.infer import PersonalizedModel
from yochameleon.train.checkpoint import RunLock
from yochameleon.train.config import TrainConfig
from yochameleon.train.encoder import EncoderTrainConfig, EncoderTrainer, train_encoder
from yochameleon.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-encoder.yaml"
# Four training identities (views of four scikit-image photos) and one held out for encoding.
SOURCES = {"astro": "astronaut", "kitty": "chelsea", "cup": "coffee", "rocket": "rocket"}
HELD_OUT = ("moon", "camera")


def _identity(root: Path, name: str, photo: str, seed: int, n: int = 4) -> Path:
    from yochameleon.demo import _skimage, _views

    folder = root / name
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    for i, view in enumerate(_views(_skimage(photo), n, seed)):
        view.save(folder / "photos" / f"p{i}.png")
    qa = {"question": "What is <sks>?", "answer": f"<sks> is a {photo}."}
    (folder / "qa.jsonl").write_text(json.dumps(qa) + "\n")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Identity folders, their prepared data folders, a retrieval index, and a held-out folder."""
    from yochameleon.demo import make_pool
    from yochameleon.retrieval import TestEmbedder, build_index

    root = tmp_path_factory.mktemp("encoder-world")
    folders = {n: _identity(root / "ids", n, p, seed=i) for i, (n, p) in enumerate(SOURCES.items())}
    build_index(make_pool(root, per_photo=1), root / "index", TestEmbedder(), progress=False)
    held_out = _identity(root, HELD_OUT[0], HELD_OUT[1], seed=9)
    return {"root": root, "folders": folders, "index": root / "index", "held_out": held_out}


def _overrides(tiny_dir, world, out: Path, *extra: str) -> list[str]:
    identities = ", ".join(
        f"{{concept_dir: '{f}', data_dir: '{world['root'] / 'data' / n}'}}"
        for n, f in world["folders"].items()
    )
    return [
        f"output_dir={out}",
        f"model.name_or_path={tiny_dir}",
        f"identities=[{identities}]",
        "identities_file=null",
        f"data.index_dir={world['index']}",
        "logging.progress=false",
        *extra,
    ]


def _config(tiny_dir, world, out: Path, *extra: str) -> EncoderTrainConfig:
    return load_config(EncoderTrainConfig, RECIPE, _overrides(tiny_dir, world, out, *extra))


@pytest.fixture(scope="module")
def trained(tiny_dir, world, tmp_path_factory):
    """One encoder run of 24 steps: ``(trainer, result, losses before/after, base weights before)``."""
    backend = load_backend(tiny_dir)
    base = {k: v.clone() for k, v in backend.model.state_dict().items()}
    out = tmp_path_factory.mktemp("encoder-run") / "run"
    trainer = EncoderTrainer(_config(tiny_dir, world, out, "optim.max_steps=24"), backend)
    trainer.setup()
    before = trainer.evaluate()
    result = trainer.train()
    after = trainer.evaluate()
    return {"trainer": trainer, "result": result, "before": before, "after": after, "base": base}


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------
def test_encoder_writes_rows_shaped_like_a_trained_concepts_and_starts_at_the_base_rows(backend):
    spec = ConceptSpec("dog", n_g=4, n_u=4)
    attach(backend, spec)
    want = concept_rows(backend, "dog")
    cfg = EncoderConfig(d_model=32, layers=1, heads=4)
    encoder = ConceptEncoder(backend.hidden_size, backend.hidden_size, spec.n_tokens, cfg, base_rows=want)
    photos = torch.randn(2, 3, backend.hidden_size)
    rows = encoder(photos)
    assert set(rows) == {"embed", "head"}
    for key in rows:
        assert rows[key].shape == (2, *want[key].shape) and rows[key].dtype == torch.float32
        # Zero-initialised output layers: an untrained encoder writes the rows init=base starts from.
        assert torch.equal(rows[key][0], want[key])
    # Photos are a set: their order does not change the rows, padding does not either.
    with torch.no_grad():
        for layer in (encoder.out_embed, encoder.out_head):
            layer.weight.normal_()
        a = encoder(photos[:1])["embed"]
        b = encoder(photos[:1, [2, 0, 1]])["embed"]
        padded = torch.cat([photos[:1], torch.randn(1, 2, backend.hidden_size)], dim=1)
        c = encoder(padded, mask=torch.tensor([[True, True, True, False, False]]))["embed"]
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    assert not torch.allclose(a, encoder(photos[1:2])["embed"])


def test_per_token_features_keep_where_a_token_sits_and_photos_stay_a_set(backend):
    spec = ConceptSpec("dog", n_g=2, n_u=2)
    cfg = EncoderConfig(d_model=32, layers=1, heads=4, features="tokens")
    encoder = ConceptEncoder(backend.hidden_size, backend.hidden_size, spec.n_tokens, cfg, feature_tokens=4)
    with torch.no_grad():
        for layer in (encoder.out_embed, encoder.out_head):
            layer.weight.normal_()
    photos = torch.randn(1, 3, 4, backend.hidden_size)
    with torch.no_grad():
        a = encoder(photos)["embed"]
        shuffled_photos = encoder(photos[:, [2, 0, 1]])["embed"]
        # The same vectors at other places of the image grid (a mark in another cell) are another input.
        moved = encoder(photos[:, :, [1, 0, 3, 2]])["embed"]
    assert torch.allclose(a, shuffled_photos, atol=1e-5)
    assert not torch.allclose(a, moved, atol=1e-3)
    with pytest.raises(ConceptError, match="reads 4 feature vectors per photo"):
        encoder(torch.randn(1, 3, backend.hidden_size))


def test_an_encoder_on_per_token_features_trains_saves_and_encodes(tiny_dir, world, tmp_path):
    out = tmp_path / "run"
    config = _config(tiny_dir, world, out, "optim.max_steps=3", "encoder.features=tokens", "save_every=3")
    result = train_encoder(config)
    meta, _ = read_encoder_file(result.encoder_file)
    backend = load_backend(tiny_dir)
    assert meta.feature_tokens == backend.image_seq_len > 1 and meta.architecture["features"] == "tokens"
    encoder, _ = load_encoder(result.encoder_file, backend)
    assert encoder.positions.shape == (backend.image_seq_len, meta.architecture["d_model"])
    path = encode_folder(result.encoder_file, backend, world["held_out"], tmp_path / "encoded")
    assert load_concept(backend, path).spec.n_tokens == meta.spec.n_tokens


@pytest.mark.parametrize(
    "override, match",
    [
        ("encoder.features=pixels", "one of"),
        ("encoder.max_photos=6", "max_photos <= 5"),
        ("encoder.heads=3", "divide"),
        ("concept.n_u=0", None),
        ("identities=[{name: a}]", "need concept_dir"),
    ],
)
def test_encoder_recipe_validates_itself(override, match):
    if match is None:
        assert load_config(EncoderTrainConfig, RECIPE, [override]).concept.n_u == 0
        return
    with pytest.raises(ConfigError, match=match):
        load_config(EncoderTrainConfig, RECIPE, [override])


def test_identities_come_from_the_recipe_and_a_file(tmp_path, world):
    listing = tmp_path / "ids.txt"
    listing.write_text(
        f"# training identities\n{world['folders']['cup']}\n\n{world['folders']['rocket']}  # r\n"
    )
    cfg = from_dict(
        EncoderTrainConfig,
        {
            "output_dir": str(tmp_path / "r"),
            "identities": [{"concept_dir": str(world["folders"]["astro"]), "name": "a"}],
        },
    )
    cfg.identities_file = str(listing)
    entries = cfg.identity_entries()
    assert [e["name"] for e in entries] == ["a", "cup", "rocket"]
    assert entries[1]["data_dir"] == str(tmp_path / "r" / "data" / "cup")
    cfg.identities.append({"concept_dir": str(world["folders"]["cup"])})
    with pytest.raises(ConfigError, match="two training identities are named 'cup'"):
        cfg.identity_entries()
    with pytest.raises(ConfigError, match="many identities"):
        EncoderTrainConfig().identity_entries()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def test_encoder_training_lowers_the_loss_of_every_identity(trained):
    before, after = trained["before"], trained["after"]
    assert set(before) == {*SOURCES, "mean"}
    assert after["mean"] < before["mean"] - 0.3, (before, after)
    assert all(after[n] < before[n] for n in SOURCES), (before, after)
    losses = trained["result"].losses
    assert len(losses) == 24 and all(map(torch.isfinite, torch.tensor(losses)))
    metrics = [json.loads(x) for x in (trained["result"].run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 25))


def test_evaluate_with_other_identities_photos_measures_what_the_encoder_reads(trained):
    trainer = trained["trainer"]
    own = trainer.evaluate()
    # A full cycle is the identity's own photos again; one step over is another object's rows.
    assert trainer.evaluate(photos_shift=len(SOURCES)) == own
    swapped = trainer.evaluate(photos_shift=1)
    assert set(swapped) == set(own) and any(swapped[n] != own[n] for n in SOURCES)
    recognition = trainer.evaluate(kinds=("recognition",))
    assert set(recognition) == set(own) and recognition != own


def test_encoder_training_keeps_the_base_bit_identical_and_detaches_its_slot(trained):
    backend = trained["trainer"].backend
    assert get_bank(backend) is None  # the slot is gone; the original modules are back
    now = backend.model.state_dict()
    assert set(now) == set(trained["base"])
    for key, value in trained["base"].items():
        assert torch.equal(now[key], value), key


def test_encoder_file_records_base_layout_and_training_identities(trained, tiny_dir, world):
    result = trained["result"]
    assert result.encoder_file == result.run_dir / "encoder.safetensors"
    meta, tensors = read_encoder_file(result.encoder_file)
    backend = trained["trainer"].backend
    assert meta.base_fingerprint == backend.fingerprint() and meta.base_model == str(tiny_dir)
    assert (meta.n_g, meta.n_u, meta.shared, meta.steps) == (4, 4, False, 24)
    assert [i["name"] for i in meta.training_identities] == list(SOURCES)
    assert [i["concept_dir"] for i in meta.training_identities] == [str(f) for f in world["folders"].values()]
    assert all(len(i["photo_sha256"]) == 4 for i in meta.training_identities)
    assert meta.training_config["encoder"]["features"] == "hidden"
    assert all(t.dtype == torch.float32 for t in tensors.values())
    encoder, _ = load_encoder(result.encoder_file, backend)
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in tensors.items())


def test_resume_through_the_cli_continues_to_the_uninterrupted_encoder(tiny_dir, world, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert (
        main(["encoder", "train", str(RECIPE), *_overrides(tiny_dir, world, straight, "optim.max_steps=6")])
        == 0
    )
    assert "trained 6 steps on 4 identities" in capsys.readouterr().out
    split = tmp_path / "split"
    assert (
        main(["encoder", "train", str(RECIPE), *_overrides(tiny_dir, world, split, "optim.max_steps=3")]) == 0
    )
    # A fresh start over a run is refused; a resume with a larger max_steps extends it.
    assert (
        main(["encoder", "train", str(RECIPE), *_overrides(tiny_dir, world, split, "optim.max_steps=6")]) == 2
    )
    assert "already holds a run" in capsys.readouterr().err
    argv = [
        "encoder",
        "train",
        str(RECIPE),
        *_overrides(tiny_dir, world, split, "optim.max_steps=6"),
        "--resume",
    ]
    assert main(argv) == 0
    assert "trained 6 steps" in capsys.readouterr().out
    state = json.loads((split / "checkpoints" / "step_000006" / "state.json").read_text())
    assert state["step"] == 6 and len(state["losses"]) == 6
    want = load_file(str(straight / "encoder.safetensors"))
    got = load_file(str(split / "encoder.safetensors"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_the_lock_refuses_a_second_concurrent_run(tiny_dir, world, tmp_path):
    out = tmp_path / "locked"
    cfg = _config(tiny_dir, world, out, "optim.max_steps=1")
    backend = load_backend(tiny_dir)
    with RunLock(out):
        with pytest.raises(TrainingError, match="another run is writing"):
            train_encoder(cfg, backend)
    assert get_bank(backend) is None  # a refused run leaves the model as it was
    assert not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------
def test_encode_writes_a_concept_file_that_loads_like_a_trained_one(
    trained, tiny_dir, world, tmp_path, capsys
):
    encoder_file = trained["result"].encoder_file
    start = time.perf_counter()
    argv = ["encode", str(world["held_out"]), "--encoder", str(encoder_file), "--model", str(tiny_dir)]
    assert main([*argv, "--out", str(tmp_path / "encoded"), "--device", "cpu"]) == 0
    assert time.perf_counter() - start < 10
    path = tmp_path / "encoded" / f"{HELD_OUT[0]}.safetensors"
    assert f"concept {HELD_OUT[0]}: {path}" in capsys.readouterr().out
    meta, rows = read_concept_file(path)
    assert (meta.name, meta.n_g, meta.n_u) == (HELD_OUT[0], 4, 4)
    assert meta.training_config["init"] == "encoder" and len(meta.training_config["photos"]) == 4
    # Exactly what the encoder writes for those photos, on the base it was trained on.
    backend = load_backend(tiny_dir)
    again = encode_folder(encoder_file, backend, world["held_out"], tmp_path / "again")
    assert get_bank(backend) is None  # encoding leaves the model as it was
    assert all(torch.equal(load_file(str(again))[k], rows[k]) for k in rows)
    tokens = load_concept(backend, path)
    assert torch.equal(concept_rows(backend, HELD_OUT[0])["head"], rows["head"])
    pm = PersonalizedModel(backend)
    photo = sorted((world["held_out"] / "photos").glob("*.png"))[0]
    assert isinstance(
        pm.ask(f"Is <{tokens.spec.name}> in this photo?", image=str(photo), max_new_tokens=4), str
    )
    other = PersonalizedModel.load(str(tiny_dir), [path], device="cpu")
    assert HELD_OUT[0] in other.concepts


def test_encoded_concepts_are_refused_on_another_base_model(
    trained, other_tiny_dir, tiny_dir, world, tmp_path
):
    encoder_file = trained["result"].encoder_file
    path = encode_concept(
        encoder_file,
        load_backend(tiny_dir),
        [world["held_out"] / "photos" / "p0.png"],
        "one",
        tmp_path / "one",
    )
    other = load_backend(other_tiny_dir)
    with pytest.raises(IncompatibleBaseModelError, match="fingerprint"):
        load_concept(other, path)
    with pytest.raises(IncompatibleBaseModelError, match="train an encoder on this base model"):
        encode_concept(encoder_file, other, [world["held_out"] / "photos" / "p0.png"], "one", tmp_path / "x")


def test_encode_bad_input_fails_clearly(trained, tiny_dir, world, tmp_path, caplog):
    encoder_file = trained["result"].encoder_file
    backend = load_backend(tiny_dir)
    with pytest.raises(DataError, match="no photos"):
        encode_concept(encoder_file, backend, [], "none", tmp_path / "none")
    empty = tmp_path / "empty"
    (empty / "photos").mkdir(parents=True)
    with pytest.raises(DataError):
        encode_folder(encoder_file, backend, empty, tmp_path / "out")
    with pytest.raises(ConceptError, match="does not exist"):
        encode_concept(
            tmp_path / "missing.safetensors", backend, [world["held_out"] / "photos" / "p0.png"], "a"
        )
    concept = encode_concept(
        encoder_file, backend, [world["held_out"] / "photos" / "p0.png"], "a", tmp_path / "a"
    )
    with pytest.raises(ConceptError, match="not a concept-encoder file"):
        encode_concept(concept, backend, [world["held_out"] / "photos" / "p0.png"], "b", tmp_path / "b")
    # Seven photos: five evenly spread ones are used, and a warning says which.
    many = _identity(tmp_path, "many", "camera", seed=3, n=7)
    with caplog.at_level(logging.WARNING, logger="yochameleon.encoder"):
        path = encode_folder(encoder_file, backend, many, tmp_path / "many-out")
    assert "7 photos given" in caplog.text and "using photos [1, 3, 4, 6, 7]" in caplog.text
    meta, _ = read_concept_file(path)
    assert [Path(p).name for p in meta.training_config["photos"]] == [
        "p0.png",
        "p2.png",
        "p3.png",
        "p5.png",
        "p6.png",
    ]
    # The CLI says the same in one line, before loading the model.
    assert (
        main(
            [
                "encode",
                str(empty),
                "--encoder",
                str(encoder_file),
                "--model",
                "nowhere",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "encode",
                str(many),
                "--encoder",
                str(tmp_path / "no"),
                "--model",
                "nowhere",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )


# ----------------------------------------------------------------------------------------------
# Warm start: concept.init_from
# ----------------------------------------------------------------------------------------------
def _qa_records() -> list[dict]:
    return [
        {
            "id": f"qa{i}",
            "task": "understanding",
            "kind": "text_qa",
            "question": "What is <sks>?",
            "answer": "<sks> is a moon.",
            "image": None,
            "flip": False,
        }
        for i in range(2)
    ]


def _warm_config(tmp_path, init_from, **concept) -> TrainConfig:
    return from_dict(
        TrainConfig,
        {
            "output_dir": str(tmp_path / "warm"),
            "model": {"name_or_path": "unused", "dtype": "float32", "device": "cpu"},
            "concept": {"name": "moon", "n_g": 4, "n_u": 4, "init_from": str(init_from), **concept},
            "optim": {"lr": 1e-2, "batch_size": 2, "epochs": 2},
            "logging": {"loggers": [], "progress": False, "sample_images": 0},
        },
    )


def test_init_from_starts_training_from_the_files_rows(trained, tiny_dir, world, tmp_path):
    backend = load_backend(tiny_dir)
    path = encode_folder(trained["result"].encoder_file, backend, world["held_out"], tmp_path / "enc")
    _, rows = read_concept_file(path)
    cfg = _warm_config(tmp_path, path)
    assert cfg.concept.init == "file"  # init_from alone selects it
    trainer = Trainer(cfg, backend=backend)
    trainer.setup(records={"moon": _qa_records()}, image_ids=lambda rec: None)
    start = concept_rows(backend, "moon")
    assert all(torch.equal(start[k], rows[k]) for k in rows)
    result = trainer.train()
    assert result.steps == 2
    assert not torch.equal(concept_rows(backend, "moon")["embed"], rows["embed"])  # and it trains on


def test_init_from_refuses_mismatched_files(trained, tiny_dir, other_tiny_dir, world, tmp_path):
    path = encode_folder(
        trained["result"].encoder_file, load_backend(tiny_dir), world["held_out"], tmp_path / "enc"
    )
    with pytest.raises(ConfigError, match="n_g=4, n_u=4.*this recipe's concepts have n_g=8"):
        _warm_config(tmp_path, path, n_g=8)
    with pytest.raises(ConfigError, match="does not exist"):
        _warm_config(tmp_path, tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="cannot go with init='description'"):
        _warm_config(tmp_path, path, init="description")
    with pytest.raises(ConfigError, match="needs concept.init_from"):
        from_dict(TrainConfig, {"concept": {"init": "file"}})
    trainer = Trainer(_warm_config(tmp_path, path), backend=load_backend(other_tiny_dir))
    with pytest.raises(IncompatibleBaseModelError, match="was trained on"):
        trainer.setup(records={"moon": _qa_records()}, image_ids=lambda rec: None)
