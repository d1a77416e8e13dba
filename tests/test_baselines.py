"""Every method end to end on the tiny model behind one interface; MyVLM's head and identity."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from yochameleon.baselines import ConceptData, build_method, method_names
from yochameleon.baselines.encoded import ENCODER_METHODS
from yochameleon.baselines.myvlm import LinearProbeHead
from yochameleon.baselines.prompting import definition
from yochameleon.data.config import DataConfig
from yochameleon.errors import ConfigError, DataError
from yochameleon.eval.harness import TestSet, evaluate
from yochameleon.retrieval import TestEmbedder

TRAIN = {
    "optim": {"epochs": 1, "lr": 3e-2, "batch_size": 4},
    "concept": {"n_g": 4, "n_u": 4},
    # The data the setup prepares; training refuses a folder prepared with other settings.
    "data": {"n_recognition": 8, "n_hard_negatives": 4, "n_easy_negatives": 4, "n_soft_positives": 6},
    "logging": {"loggers": []},
    "model": {"device": "cpu"},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from yochameleon.config import from_dict
    from yochameleon.data.pipeline import prepare_concept
    from yochameleon.demo import make_concept_folder, make_pool
    from yochameleon.retrieval import build_index

    root = tmp_path_factory.mktemp("baselines")
    concept = make_concept_folder(root)
    pool = make_pool(root, per_photo=1)
    build_index(pool, root / "index", TestEmbedder(), progress=False)
    data_cfg = from_dict(DataConfig, {**TRAIN["data"], "index_dir": str(root / "index")})
    prepare_concept(concept, root / "data", data_cfg, n_g=TRAIN["concept"]["n_g"])
    test = root / "test"
    photos = sorted((concept / "photos").glob("*.png"))
    for sub, files in (("positives", photos[:2]), ("negatives_easy", sorted(pool.glob("*.png"))[:2])):
        (test / sub).mkdir(parents=True)
        for f in files:
            (test / sub / f.name).write_bytes(f.read_bytes())
    (test / "vqa.json").write_text(
        json.dumps(
            [
                {
                    "image": f"positives/{photos[0].name}",
                    "question": "What is <sks>?",
                    "options": ["a cat", "a dog"],
                    "answer": "a cat",
                }
            ]
        )
    )
    (test / "text_qa.json").write_text(
        json.dumps(
            [{"question": "Is <sks> a cat or a dog?", "options": {"A": "cat", "B": "dog"}, "answer": "A"}]
        )
    )
    data = ConceptData(
        "sks",
        concept,
        photos,
        "<sks> is a tabby cat.",
        "<sks> is a tabby cat with a white tail tip.",
        root / "data",
        root / "index",
    )
    return root, data, TestSet.load(test)


@pytest.fixture(scope="module")
def encoder_file(tiny_dir, tmp_path_factory):
    """An (untrained) encoder on the tiny model with TRAIN's token layout."""
    from data_helpers import untrained_encoder

    from yochameleon.backends import load_backend

    path = tmp_path_factory.mktemp("encoder") / "encoder"
    return untrained_encoder(load_backend(tiny_dir), path, TRAIN["concept"]["n_g"], TRAIN["concept"]["n_u"])


@pytest.mark.parametrize("name", method_names())
def test_every_method_runs_end_to_end(backend, setup, name, tmp_path, encoder_file):
    root, data, test = setup
    options = {"train": TRAIN} if name.startswith(("yochameleon", "yollava")) else {}
    if name in ENCODER_METHODS:
        options["encoder"] = encoder_file
    if name == "myvlm":
        options = {"steps": 5, "embedder": "test"}  # the index's embedder is the test one: asked by name
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    method = build_method(name, backend, **options)
    assert method.name == name
    method.fit(data, tmp_path)
    result = evaluate(
        method, test, "sks", seed=0, real_photos=data.photos, embedder=TestEmbedder(), n_images=1
    )
    assert result.method == name and result.recognition_weighted is not None and result.text_qa is not None
    assert result.clip_i is not None and -1 <= result.clip_i <= 1
    method.close()
    after = backend.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    tokens = method.prompt_tokens()
    if name == "none":
        assert tokens == 0
    elif name == "image_prompt":
        assert tokens > backend.image_seq_len


def test_oracle_text_prompt_reads_the_oracle_description_and_refuses_a_concept_without_one(
    backend, setup, tmp_path
):
    _, data, _ = setup
    plain, oracle = build_method("text_prompt", backend), build_method("text_prompt_oracle", backend)
    plain.fit(data, tmp_path)
    oracle.fit(data, tmp_path)
    text = backend.decode_text(oracle.prompt("Is <sks> here?").ids)
    assert "white tail tip" in text and "white tail tip" not in backend.decode_text(
        plain.prompt("Is <sks> here?").ids
    )
    assert oracle.prompt_tokens() > plain.prompt_tokens()
    # A description that does not name <sks> becomes the definition of the name the question uses.
    bare = replace(
        data, description="a small red fox", oracle_description="a small red fox with a white tail tip"
    )
    for method in (plain, oracle):
        method.fit(bare, tmp_path)
        text = backend.decode_text(method.prompt("Is <sks> here?").ids)
        assert text.startswith("sks is a small red fox") and text.endswith(". Is sks here?")
    assert (
        definition("<sks> is a fox.", "x") == "sks is a fox." and definition("", "a toy") == "sks is a toy."
    )
    with pytest.raises(ConfigError, match="oracle description"):
        build_method("text_prompt_oracle", backend).fit(replace(data, oracle_description=""), tmp_path)


def test_warm_steps_are_a_fifth_of_the_recipe_s_rounded_up():
    from yochameleon.baselines.encoded import warm_steps

    assert [warm_steps(n) for n in (0, 1, 5, 6, 10, 11, 300)] == [1, 1, 1, 2, 2, 3, 60]


def test_encoder_methods_need_an_encoder(backend):
    for name in ENCODER_METHODS:
        with pytest.raises(ConfigError, match="needs a concept encoder"):
            build_method(name, backend, train=TRAIN)


def test_zeroshot_scores_the_file_the_encoder_writes_and_trains_nothing(
    backend, setup, encoder_file, tmp_path
):
    from yochameleon.concept import get_bank, read_concept_file
    from yochameleon.encoder import encode_concept

    _, data, test = setup
    method = build_method("yochameleon_zeroshot", backend, encoder=encoder_file)
    method.fit(data, tmp_path)
    meta, rows = read_concept_file(method.concept_file)
    assert meta.training_config["init"] == "encoder" and meta.spec.n_tokens == 1 + 4 + 4
    assert method.prompt_tokens() == 1 + 4 + 4 and method.self_prompting
    assert not list(tmp_path.rglob("run.json"))  # no training run
    from PIL import Image

    image = Image.open(test.recognition[0][0]).convert("RGB")
    direct = method.model.yes_no_logprobs(f"Is <{method.tokens.spec.name}> in this photo?", image)
    assert method.yes_no("Is <sks> in this photo?", image) == direct
    method.close()
    # The scored rows are the encoder's rows for the concept's photos.
    again = encode_concept(encoder_file, backend, data.photos, "again", tmp_path / "again")
    assert all(torch.equal(rows[k], read_concept_file(again)[1][k]) for k in rows)
    assert not (get_bank(backend) and get_bank(backend).concepts)


def test_warmstart_trains_a_fifth_of_yochameleon_s_steps_from_the_encoded_rows(
    backend, setup, encoder_file, tmp_path
):
    from yochameleon.concept import read_concept_file

    _, data, _ = setup
    train = {**TRAIN, "optim": {**TRAIN["optim"], "epochs": 3}}
    full = build_method("yochameleon", backend, train=train)
    full.fit(data, tmp_path)
    full.close()
    warm = build_method("yochameleon_warmstart", backend, encoder=encoder_file, train=train)
    warm.fit(data, tmp_path)
    warm.close()
    # A fifth, rounded up, of what the same recipe runs on the same data.
    assert warm.recipe_steps == full.steps > 5 and warm.steps == -(-full.steps // 5)
    run = json.loads((tmp_path / "yochameleon_warmstart" / "run.json").read_text())["config"]
    assert run["optim"]["max_steps"] == warm.steps and run["optim"]["epochs"] == 3
    assert run["concept"]["init_from"] == str(warm.encoded_file) and run["concept"]["init"] == "file"
    assert read_concept_file(warm.encoded_file)[0].training_config["init"] == "encoder"
    trained = read_concept_file(warm.concept_file)[0].training_config
    assert trained["concept"]["init_from"] == str(warm.encoded_file)


def test_warmstart_refuses_an_encoder_of_another_layout(backend, setup, tmp_path):
    from data_helpers import untrained_encoder

    _, data, _ = setup
    other = untrained_encoder(backend, tmp_path / "enc", n_g=2, n_u=4)
    with pytest.raises(ConfigError, match="n_g"):
        build_method("yochameleon_warmstart", backend, encoder=other, train=TRAIN).fit(data, tmp_path)


def test_unknown_method_and_bad_test_dirs(backend, tmp_path):
    with pytest.raises(ConfigError, match="unknown method"):
        build_method("gpt5", backend)
    with pytest.raises(DataError, match="does not exist"):
        TestSet.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        TestSet.load(tmp_path / "empty")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "vqa.json").write_text(
        json.dumps([{"image": "positives/ghost.png", "question": "q", "options": ["a", "b"], "answer": "a"}])
    )
    with pytest.raises(DataError, match="ghost.png"):
        TestSet.load(tmp_path / "t")


def test_image_prompt_warns_past_context(backend, setup, tmp_path):
    _, data, _ = setup
    method = build_method("image_prompt", backend, k=40)
    many = ConceptData(data.name, data.concept_dir, data.photos * 10, data.description)
    with pytest.warns(UserWarning, match="context length"):
        method.fit(many, tmp_path)


def test_myvlm_head_separates_synthetic_embeddings():
    rng = np.random.default_rng(0)
    pos = rng.normal(0, 0.1, (8, 16)) + np.eye(16)[0] * 2
    neg = rng.normal(0, 0.1, (40, 16)) - np.eye(16)[0] * 2
    head = LinearProbeHead(16).fit(pos, neg, steps=200)
    new_pos = rng.normal(0, 0.1, (20, 16)) + np.eye(16)[0] * 2
    new_neg = rng.normal(0, 0.1, (20, 16)) - np.eye(16)[0] * 2
    assert head.fires(new_pos).all() and not head.fires(new_neg).any()


def test_myvlm_is_the_base_model_when_the_head_does_not_fire(backend, setup, tmp_path, photos):
    _, data, _ = setup
    myvlm = build_method("myvlm", backend, steps=3, embedder="test")
    none = build_method("none", backend)
    myvlm.fit(data, tmp_path)
    stranger = photos[0]  # the astronaut: not the cat
    for c in myvlm.concepts:  # make the head refuse everything for this check
        torch.nn.init.constant_(c.head.linear.bias, 0.0)
        c.head.threshold = 1.1
    assert myvlm.firing(stranger) == []
    p_m, p_n = myvlm.prompt("<image>Is <sks> here?", stranger), none.prompt("<image>Is <sks> here?", stranger)
    assert p_m.ids == p_n.ids
    ids = torch.tensor([p_m.ids])
    h, _ = backend.hidden_states(ids)
    with_concept = backend.logits(h[0, -1]).detach()
    banned = myvlm._banned()  # its ids never reach an answer
    myvlm.close()
    h, _ = backend.hidden_states(ids)
    keep = torch.ones(backend.vocab_size, dtype=torch.bool)
    keep[banned] = False
    assert torch.equal(with_concept[keep], backend.logits(h[0, -1])[keep])
    assert myvlm.answer("Is <sks> here?") == none.answer("Is <sks> here?")
    # When it fires, one concept token is inserted right after the image span.
    myvlm.fit(data, tmp_path)
    for c in myvlm.concepts:
        c.head.threshold = -1.0
    fired = myvlm.prompt("<image>Is <sks> here?", stranger).ids
    at = fired.index(backend.special.eoi)
    assert fired[at + 1] == myvlm.concepts[0].token_id and len(fired) == len(p_n.ids) + 1
    myvlm.close()


def test_yollava_benchmark_layout(tmp_path):
    from PIL import Image

    for concept in ("bo", "mam"):
        (tmp_path / "ds" / "test" / concept).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(tmp_path / "ds" / "test" / concept / f"{i}.png")
    vqa = tmp_path / "vqa.json"
    vqa.write_text(
        json.dumps(
            {
                "bo": {
                    "./yollava-data/test/bo/1.png": {
                        "question": "What animal is <sks>?",
                        "options": {"A": "Cat", "B": "Dog"},
                        "correct_answer": "B",
                    }
                }
            }
        )
    )
    tqa = tmp_path / "tqa.json"
    tqa.write_text(
        json.dumps(
            {
                "bo": {
                    "0": {
                        "question": "Is sks a dog or a cat?",
                        "option": {"A": "Dog", "B": "Cat"},
                        "correct_answer": "A",
                    }
                }
            }
        )
    )
    test = TestSet.from_yollava(tmp_path / "ds", "bo", vqa, tqa)
    assert [lab for _, lab in test.recognition] == ["pos", "pos", "neg_easy", "neg_easy"]
    assert (
        test.vqa[0]["image"].endswith("bo/1.png")
        and test.text_qa[0]["question"] == "Is <sks> a dog or a cat?"
    )
    from yochameleon.eval.metrics import shuffle_options

    assert shuffle_options(test.text_qa[0], 0)["correct"] == "Dog"
    with pytest.raises(DataError, match="does not exist"):
        TestSet.from_yollava(tmp_path / "ds", "nobody")
