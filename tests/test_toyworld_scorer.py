"""Tests for the toy-world attribute/mark scorer."""

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from yochameleon.errors import YoChameleonError
from yochameleon.eval.toyworld.scorer import (
    _CELL_VALUES,
    FACTOR_VALUES,
    FACTORS,
    Scorer,
    ScorerConfig,
    ScorerError,
    evaluate_scorer,
    train_scorer,
)
from yochameleon.eval.toyworld.world import MARK_COLOURS, Identity, Mark, ToyWorld, WorldConfig

REDUCED = ScorerConfig(batch_size=48, width=12, hidden=128)


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(0, WorldConfig(n_pretrain=0))


@pytest.fixture(scope="module")
def reduced(world):
    threads = torch.get_num_threads()
    start = time.perf_counter()
    # One thread is much faster than two on a busy 2-core machine.
    scorer = train_scorer(seed=0, steps=150, config=REDUCED, world=world, progress=False, num_threads=1)
    assert torch.get_num_threads() == threads  # restored
    return scorer, time.perf_counter() - start


@pytest.fixture(scope="module")
def heldout_photos(world):
    rng = np.random.default_rng(11)
    identities = [i for i in world.splits["heldout"] for _ in range(4)]
    return [world.render(i, rng, distractors=int(rng.integers(0, 3))) for i in identities], identities


def test_reduced_scorer_learns_quickly(reduced, heldout_photos):
    scorer, _ = reduced
    photos, identities = heldout_photos
    per_image = [
        {"shape": i.shape, "colour": i.colour, "pattern": i.pattern, "size": i.size} for i in identities
    ]
    accuracy = scorer.attribute_accuracy(photos, per_image)
    colour = scorer.attribute_accuracy(photos, [{"colour": i.colour} for i in identities])
    size = scorer.attribute_accuracy(photos, [{"size": i.size} for i in identities])
    # Chance: 1/5 shape, 1/8 colour, 1/3 pattern, 1/2 size (mean about 0.29).
    assert accuracy > 0.5 and colour > 0.6 and size > 0.6
    assert scorer.meta["steps"] == 150 and scorer.meta["seed"] == 0


def test_predict_shapes_and_identities(reduced, heldout_photos):
    scorer, _ = reduced
    photos, _ = heldout_photos
    preds = scorer.predict(photos[:5])
    assert len(preds) == 5
    assert set(preds[0]) == {"shape", "colour", "pattern", "size", "marks", "mark_colours"}
    assert all(isinstance(cell, tuple) and len(cell) == 2 for p in preds for cell in p["marks"])
    for p in preds:  # the set of the cells' colours, in the palette's order
        assert p["mark_colours"] == tuple(c for c in MARK_COLOURS if c in set(p["marks"].values()))
    # Arrays and (resized) larger images give the same answers as PIL photos.
    arrays = np.stack([np.asarray(p) for p in photos[:5]])
    assert scorer.predict(arrays) == preds
    big = [p.resize((64, 64), Image.NEAREST) for p in photos[:5]]
    assert [p["colour"] for p in scorer.predict(big)] == [p["colour"] for p in preds]
    assert scorer.predict([]) == []
    # Reading at boxes located in other photos: the same photos give the same answers; shifted
    # photos read at the unshifted boxes miss the object, so the answers change.
    assert scorer.predict(photos[:5], boxes_from=photos[:5]) == preds
    shifted = [Image.fromarray(np.roll(np.asarray(p), 12, axis=1)) for p in photos[:5]]
    assert scorer.predict(shifted) != scorer.predict(shifted, boxes_from=photos[:5])
    with pytest.raises(ScorerError, match="boxes_from"):
        scorer.predict(photos[:5], boxes_from=photos[:4])


def test_identity_correct_requires_every_head(reduced, heldout_photos):
    scorer, _ = reduced
    photos, _ = heldout_photos
    # The first photo on which the reduced scorer reads 1-2 marks of distinct colours.
    read = [
        (photo, pred)
        for photo, pred in zip(photos, scorer.predict(photos))
        if 1 <= len(pred["marks"]) <= 2 and len(pred["mark_colours"]) == len(pred["marks"])
    ]
    if not read:
        pytest.skip("the reduced scorer read no photo as 1-2 marks of distinct colours")
    photo, pred = read[0]
    marks = tuple(Mark(r, c, colour) for (r, c), colour in pred["marks"].items())
    exact = Identity(pred["shape"], pred["colour"], pred["pattern"], pred["size"], marks)
    assert scorer.identity_correct([photo], exact) == [True]
    assert scorer.predict_identities([photo]) == [exact]
    other_colour = "blue" if exact.colour != "blue" else "red"
    wrong = Identity(exact.shape, other_colour, exact.pattern, exact.size, exact.marks)
    assert scorer.identity_correct([photo], wrong) == [False]
    # Marks read in other cells with the same colours still show the identity (cells do not count) ...
    moved = Identity(*exact.base, tuple(Mark(9 - m.row, 9 - m.col, m.colour) for m in exact.marks))
    assert scorer.identity_correct([photo], moved) == [True]
    # ... but another set of mark colours does not.
    unused = next(c for c in MARK_COLOURS if c not in exact.mark_colours)
    recoloured = Identity(*exact.base, (Mark(marks[0].row, marks[0].col, unused), *marks[1:]))
    assert scorer.identity_correct([photo], recoloured) == [False]


def _fake_reads(identities, grid=4):
    """What ``Scorer._logits`` returns when the scorer reads exactly ``identities`` (marks at their cells)."""
    reads = {f: np.array([FACTOR_VALUES[f].index(getattr(i, f)) for i in identities]) for f in FACTORS}
    cells = np.zeros((len(identities), grid * grid), dtype=np.int64)
    for n, identity in enumerate(identities):
        for mark in identity.marks:
            cells[n, mark.row * grid + mark.col] = _CELL_VALUES.index(mark.colour)
    reads["cells"] = cells
    return reads


def _reading(monkeypatch, identities) -> Scorer:
    """A scorer (no network) that reads ``identities`` from any images, one per image."""
    scorer = Scorer(ScorerConfig())
    reads = _fake_reads(identities)
    monkeypatch.setattr(scorer, "_logits", lambda images, chunk=512, boxes_from=None: reads)
    return scorer


def test_identity_correct_compares_signatures_not_cells(monkeypatch, world):
    rng = np.random.default_rng(0)
    for concept in world.splits["heldout"][:10]:
        cells = world.valid_cells(concept.shape)
        free = [c for c in cells if c not in concept.mark_map]
        moved = Identity(*concept.base, tuple(Mark(*c, m.colour) for c, m in zip(free, concept.marks)))
        twins = [world.twin(concept, rng) for _ in range(6)]
        shown = [concept, moved, *twins]
        scorer = _reading(monkeypatch, shown)
        images = [None] * len(shown)  # never looked at: the reads are fixed
        assert moved != concept and moved.signature == concept.signature
        # The concept's own photo and a photo whose marks sit in other cells with the same colours are
        # right; every twin (another set of mark colours) is wrong.
        assert scorer.identity_correct(images, concept) == [True, True] + [False] * len(twins)
        preds = scorer.predict(images)
        assert [p["mark_colours"] for p in preds] == [i.mark_colours for i in shown]
        assert scorer.predict_identities(images) == shown


def test_predict_identities_refuses_marks_that_are_no_identity(monkeypatch):
    base = ("square", "red", "solid", "small")
    one = Identity(*base, (Mark(0, 0, "cyan"),))
    three = [Mark(0, 0, "cyan"), Mark(1, 1, "black"), Mark(2, 2, "white")]
    scorer = Scorer(ScorerConfig())
    reads = _fake_reads([one, one, one])
    reads["cells"][1, 5] = _CELL_VALUES.index("cyan")  # a second cyan mark
    for mark in three:
        reads["cells"][2, mark.row * 4 + mark.col] = _CELL_VALUES.index(mark.colour)  # three marks
    monkeypatch.setattr(scorer, "_logits", lambda images, chunk=512, boxes_from=None: reads)
    assert scorer.predict_identities([None] * 3) == [one, None, None]
    # Three colours are not the concept's set of one colour.
    assert scorer.identity_correct([None] * 3, one)[2] is False


def test_attribute_accuracy_compares_mark_colours_as_a_set(monkeypatch):
    shown = Identity("circle", "green", "stripes", "large", (Mark(1, 1, "magenta"), Mark(2, 2, "black")))
    scorer = _reading(monkeypatch, [shown])
    assert scorer.attribute_accuracy([None], {"marks": ["magenta", "black"]}) == 1.0
    assert scorer.attribute_accuracy([None], {"marks": ("black", "magenta")}) == 1.0
    assert scorer.attribute_accuracy([None], {"marks": ["black"]}) == 0.0  # a missing colour is wrong
    assert scorer.attribute_accuracy([None], {"marks": ["black", "magenta", "cyan"]}) == 0.0
    assert scorer.attribute_accuracy([None], {"shape": "circle", "marks": ["cyan", "black"]}) == 0.5
    with pytest.raises(ScorerError, match="unknown mark colours"):
        scorer.attribute_accuracy([None], {"marks": ["red"]})


def test_save_load_round_trip(tmp_path, reduced, heldout_photos):
    scorer, _ = reduced
    photos, _ = heldout_photos
    weights, meta = scorer.save(tmp_path / "scorer")
    assert weights.name == "scorer.safetensors" and meta.name == "scorer.json"
    loaded = Scorer.load(tmp_path / "scorer.safetensors")
    assert loaded.config == scorer.config and loaded.meta == scorer.meta
    assert loaded.predict(photos) == scorer.predict(photos)


def test_load_rejects_bad_files(tmp_path, reduced):
    scorer, _ = reduced
    with pytest.raises(ScorerError, match="not found"):
        Scorer.load(tmp_path / "missing")
    _, meta = scorer.save(tmp_path / "s")
    info = json.loads(meta.read_text())
    info["factor_values"]["shape"] = ["blob"]
    meta.write_text(json.dumps(info))
    with pytest.raises(ScorerError, match="vocabulary"):
        Scorer.load(tmp_path / "s")
    info["format_version"] = 99
    meta.write_text(json.dumps(info))
    with pytest.raises(ScorerError, match="format"):
        Scorer.load(tmp_path / "s")
    meta.write_text("{not json")
    with pytest.raises(ScorerError):
        Scorer.load(tmp_path / "s")
    scorer.save(tmp_path / "t")
    info = json.loads((tmp_path / "t.json").read_text())
    info["config"]["width"] = 20
    (tmp_path / "t.json").write_text(json.dumps(info))
    with pytest.raises(ScorerError, match="does not match"):
        Scorer.load(tmp_path / "t")


def test_bad_inputs_raise_scorer_errors(reduced, heldout_photos):
    scorer, _ = reduced
    photos, identities = heldout_photos
    with pytest.raises(ScorerError):
        scorer.predict(["not an image"])
    with pytest.raises(ScorerError):
        scorer.predict(np.zeros((2, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(ScorerError):
        scorer.identity_correct(photos[:1], "toy-123")
    with pytest.raises(ScorerError, match="unknown factor"):
        scorer.attribute_accuracy(photos[:1], {"texture": "smooth"})
    with pytest.raises(ScorerError, match="unknown colour"):
        scorer.attribute_accuracy(photos[:1], {"colour": "cyan"})
    with pytest.raises(ScorerError):
        scorer.attribute_accuracy(photos[:2], [{"colour": "red"}])
    with pytest.raises(ScorerError):
        scorer.attribute_accuracy([], {"colour": "red"})
    with pytest.raises(ScorerError):
        scorer.attribute_accuracy(photos[:1], {})
    assert issubclass(ScorerError, YoChameleonError)


def test_train_scorer_rejects_bad_settings(world):
    with pytest.raises(ScorerError):
        train_scorer(steps=0, world=world)
    with pytest.raises(ScorerError):
        train_scorer(steps=1, world=world, num_threads=0)
    with pytest.raises(ScorerError, match="expects"):
        train_scorer(steps=1, world=ToyWorld(0, WorldConfig(mark_grid=6, n_pretrain=0)))
    with pytest.raises(ScorerError):
        evaluate_scorer(Scorer(ScorerConfig()), world, split="nope")


@pytest.mark.parametrize(
    "kwargs",
    [{"image_size": 30}, {"mark_grid": 1}, {"width": 0}, {"lr": 0.0}, {"crop_size": 10}, {"box_jitter": 0.5}],
)
def test_scorer_config_validates(kwargs):
    with pytest.raises(ScorerError):
        ScorerConfig(**kwargs)


@pytest.mark.slow
def test_full_scorer_meets_the_gates(tmp_path):
    world = ToyWorld(0)
    scorer = train_scorer(seed=0, world=world, progress=False, num_threads=1)
    gates = evaluate_scorer(scorer, world, split="heldout", photos_per_identity=10)
    print("scorer gates:", gates, "train seconds:", scorer.meta["train_seconds"])
    assert gates["identity_acc"] >= 0.95
    assert gates["random_scene_rate"] <= 0.01
    assert gates["twin_rate"] <= 0.05
    scorer.save(tmp_path / "scorer")
    assert (
        Scorer.load(tmp_path / "scorer").predict(world.concept_photos(world.splits["heldout"][0])) is not None
    )


def test_refinement_moves_rough_boxes_towards_the_truth(reduced, world):
    scorer, _ = reduced
    rng = np.random.default_rng(4)
    images, boxes = [], []
    for identity in world.splits["heldout"][:16]:
        image, _, box = world.render_annotated(identity, rng)
        images.append(image)
        boxes.append(box)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    truth = torch.tensor(boxes)
    rough = truth.clone()
    rough[:, 0] += 0.12 * truth[:, 2]  # a box shifted by an eighth of the object
    with torch.no_grad():
        refined = scorer.model.refine(rough, scorer.model.classify(x, rough)["box_delta"])
    assert (refined[:, 0] - truth[:, 0]).abs().mean() < 0.6 * (rough[:, 0] - truth[:, 0]).abs().mean()


def test_text_to_image_gate_counts_images_with_every_factor_right(monkeypatch, world):
    """The gate asks for every requested factor in one image; the per-factor mean is reported apart."""
    from yochameleon.eval.toyworld import gates

    first, second = world.splits["heldout"][:2]
    recoloured = Identity(
        *second.base,
        tuple(Mark(m.row, m.col, "cyan" if m.colour != "cyan" else "black") for m in second.marks),
    )
    scorer = _reading(monkeypatch, [first, recoloured])  # the second image has its marks wrong only
    monkeypatch.setattr(gates, "generate_images", lambda backend, prompts, seed=0: [None] * len(prompts))
    t2i, _ = gates.text_to_image_accuracy(None, scorer, [first, second], per=1)
    assert t2i == {"all": pytest.approx(0.9), "every": 0.5}
    values = gates.gate_values({"all": 1.0, "shape": 1.0}, {"all": 1.0, "marks": 1.0}, t2i, 1.0)
    assert values["text_to_image"] == 0.5
    assert not gates.make_gate("text_to_image", values["text_to_image"]).passed
