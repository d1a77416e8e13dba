"""Tests for the procedural toy world: identities, rendering, splits, benchmark items, concept folders."""

import json
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from yochameleon.errors import YoChameleonError
from yochameleon.eval.toyworld.world import (
    BACKGROUND_KINDS,
    MARK_COLOURS,
    MARK_SETS,
    N_SIGNATURES,
    OBJECT_COLOURS,
    PATTERN_ADJECTIVES,
    PATTERNS,
    QA_FACTORS,
    SHAPES,
    SIZES,
    Identity,
    Mark,
    ToyWorld,
    ToyWorldError,
    WorldConfig,
    attribute_qa,
    caption,
    concept_photos,
    factor_value,
    factor_values,
    full_caption,
    mark_phrase,
    pool_images,
    render,
    split_identities,
    test_set,
    text_qa,
    twin,
    write_concept_folder,
)

MARK_WORDS = set(MARK_COLOURS) | {"mark", "marks", "marked", "spot", "sticker"}


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(0, WorldConfig(n_pretrain=500))


@pytest.fixture(scope="module")
def concept(world: ToyWorld) -> Identity:
    return world.splits["heldout"][0]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _has_mark_pixels(array: np.ndarray) -> bool:
    palette = np.asarray(list(MARK_COLOURS.values()))
    return bool((np.abs(array[:, :, None, :].astype(int) - palette[None, None]).max(-1) <= 3).any())


# ---- identities ----------------------------------------------------------------------------------------
def test_identity_is_canonical_hashable_and_round_trips():
    a = Identity("circle", "red", "stripes", "large", (Mark(2, 2, "white"), Mark(1, 1, "black")))
    b = Identity("circle", "red", "stripes", "large", (Mark(1, 1, "black"), Mark(2, 2, "white")))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.marks[0] == Mark(1, 1, "black")
    assert Identity.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert a.name.startswith("toy-") and len(a.name) == 12 and a.name == b.name
    assert a.mirrored(4).mark_map == {(1, 2): "black", (2, 1): "white"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": "hexagon"},
        {"colour": "cyan"},  # a mark colour is never an object colour
        {"pattern": "plaid"},
        {"size": "huge"},
        {"marks": ()},
        {"marks": (Mark(0, 1, "white"), Mark(1, 0, "white"), Mark(1, 1, "white"))},
        {"marks": (Mark(1, 1, "white"), Mark(1, 1, "black"))},
        {"shape": "ring"},  # dropped in toy world v2
        {"pattern": "dots"},
        {"size": "medium"},
    ],
)
def test_identity_rejects_bad_fields(kwargs):
    fields = {
        "shape": "circle",
        "colour": "red",
        "pattern": "solid",
        "size": "small",
        "marks": (Mark(1, 1, "white"),),
    }
    fields.update(kwargs)
    with pytest.raises(ToyWorldError):
        Identity(**fields)


def test_identity_refuses_two_marks_of_one_colour():
    with pytest.raises(ToyWorldError, match="two marks share a colour"):
        Identity("circle", "red", "solid", "small", (Mark(1, 1, "cyan"), Mark(2, 2, "cyan")))
    # Two colours on two cells are fine.
    Identity("circle", "red", "solid", "small", (Mark(1, 1, "cyan"), Mark(2, 2, "black")))


def test_mark_colours_and_signature_ignore_cells_and_listing_order():
    a = Identity("square", "blue", "checker", "large", (Mark(0, 0, "magenta"), Mark(3, 3, "black")))
    moved = Identity("square", "blue", "checker", "large", (Mark(2, 1, "black"), Mark(1, 2, "magenta")))
    assert a.mark_colours == moved.mark_colours == ("black", "magenta")  # the palette's order
    assert a.signature == moved.signature == ("square", "blue", "checker", "large", ("black", "magenta"))
    assert a != moved  # identities still differ by where their marks are drawn
    recoloured = Identity("square", "blue", "checker", "large", (Mark(0, 0, "cyan"), Mark(3, 3, "black")))
    assert recoloured.signature != a.signature and recoloured.base == a.base


def test_mark_and_dict_validation():
    with pytest.raises(ToyWorldError):
        Mark(-1, 0, "white")
    with pytest.raises(ToyWorldError):
        Mark(0, 0, "red")
    with pytest.raises(ToyWorldError):
        Identity.from_dict({"shape": "circle"})
    assert issubclass(ToyWorldError, YoChameleonError)


def test_check_identity_rejects_marks_off_the_object(world):
    corner = Identity("circle", "blue", "solid", "large", (Mark(0, 0, "white"),))  # outside the disc
    with pytest.raises(ToyWorldError, match="not on a circle"):
        world.render(corner, np.random.default_rng(0))
    with pytest.raises(ToyWorldError):
        world.check_identity("circle")  # type: ignore[arg-type]
    with pytest.raises(ToyWorldError):
        world.valid_cells("ring")
    assert (0, 0) not in world.valid_cells("circle") and (0, 0) in world.valid_cells("square")


# ---- text ----------------------------------------------------------------------------------------------
def test_user_text_names_factors_but_never_marks(world):
    # The user's description and the concept's text questions leave the marks out; the attribute
    # questions about a photo name them only in the marks question.
    for identity in world.splits["pretrain"][:200] + world.splits["heldout"]:
        text = caption(identity)
        assert (
            text
            == f"a {identity.size} {identity.colour} {PATTERN_ADJECTIVES[identity.pattern]} {identity.shape}"
        )
        pairs = attribute_qa(identity, np.random.default_rng(0))
        items = text_qa(identity, np.random.default_rng(0))
        everything = " ".join([text, *(p.question + " " + p.answer for p in pairs if p.factor != "marks")])
        everything += " ".join(i.question + " " + " ".join(i.options.values()) for i in items)
        assert not _words(everything) & MARK_WORDS
        assert [i.factor for i in items] == ["shape", "colour", "pattern", "size"]


def test_full_caption_names_exactly_the_mark_colours_and_caption_none(world):
    for identity in world.splits["pretrain"][:300] + world.splits["heldout"]:
        plain, full = caption(identity), full_caption(identity)
        assert not _words(plain) & set(MARK_COLOURS) and "mark" not in _words(plain)
        assert full == f"{plain} with {mark_phrase(identity.mark_colours)}"
        assert _words(full) & set(MARK_COLOURS) == set(identity.mark_colours)
        assert _words(full) - _words(plain) <= set(MARK_COLOURS) | {"with", "mark", "and"}


def test_mark_phrase_wording_and_palette_order():
    assert list(MARK_COLOURS) == ["black", "white", "cyan", "magenta"]
    assert mark_phrase(["cyan"]) == "a cyan mark"
    assert mark_phrase(["cyan", "black"]) == "a black mark and a cyan mark"
    assert mark_phrase(("magenta", "white")) == mark_phrase(("white", "magenta"))
    assert mark_phrase(("magenta", "white")) == "a white mark and a magenta mark"
    with pytest.raises(ToyWorldError):
        mark_phrase([])
    with pytest.raises(ToyWorldError):
        mark_phrase(["red"])  # an object colour is not a mark colour
    identity = Identity("diamond", "pink", "stripes", "small", (Mark(0, 1, "magenta"), Mark(3, 2, "black")))
    assert full_caption(identity) == "a small pink striped diamond with a black mark and a magenta mark"
    assert caption(identity) == "a small pink striped diamond"


def test_mark_sets_are_every_one_or_two_colour_phrase():
    assert len(MARK_SETS) == len(set(MARK_SETS)) == 4 + 6  # 4 single colours, 6 pairs
    assert MARK_SETS[:4] == tuple(f"a {c} mark" for c in MARK_COLOURS)
    assert "a black mark and a cyan mark" in MARK_SETS and "a cyan mark and a black mark" not in MARK_SETS
    assert QA_FACTORS == ("shape", "colour", "pattern", "size", "marks")
    assert factor_values("marks") == MARK_SETS and factor_values("size") == SIZES == ("small", "large")
    assert N_SIGNATURES == len(SHAPES) * len(OBJECT_COLOURS) * len(PATTERNS) * len(SIZES) * len(MARK_SETS)
    identity = Identity("cross", "brown", "solid", "large", (Mark(1, 1, "white"), Mark(2, 2, "cyan")))
    assert factor_value(identity, "marks") == "a white mark and a cyan mark"
    assert factor_value(identity, "shape") == "cross"


def test_attribute_qa_answers_are_right():
    identity = Identity("triangle", "green", "checker", "large", (Mark(3, 0, "cyan"),))
    qa = attribute_qa(identity)
    assert [p.factor for p in qa] == list(QA_FACTORS)
    pairs = {p.factor: p for p in qa}
    assert pairs["shape"].value == "triangle" and "triangle" in pairs["shape"].answer
    assert pairs["colour"].value == "green"
    assert pairs["pattern"].value == "checkered"
    assert pairs["size"].value == "large"
    assert pairs["marks"].value == "a cyan mark" and pairs["marks"].answer == "It has a cyan mark."
    assert "mark" in pairs["marks"].question


def test_attribute_qa_marks_answer_names_exactly_the_mark_colours(world):
    rng = np.random.default_rng(0)
    for identity in world.splits["pretrain"][:300]:
        (marks,) = [p for p in attribute_qa(identity, rng) if p.factor == "marks"]
        assert _words(marks.answer) & set(MARK_COLOURS) == set(identity.mark_colours)
        assert marks.answer == f"It has {mark_phrase(identity.mark_colours)}."


def test_text_qa_letters_point_at_the_right_value():
    identity = Identity("cross", "purple", "checker", "small", (Mark(0, 1, "black"),))
    for seed in range(5):
        items = text_qa(identity, np.random.default_rng(seed))
        truth = {"shape": "cross", "colour": "purple", "pattern": "checkered", "size": "small"}
        for item in items:
            assert item.options[item.answer] == truth[item.factor]
            assert len(set(item.options.values())) == len(item.options) >= 2
            assert "<sks>" in item.question
    with pytest.raises(ToyWorldError):
        text_qa(identity, np.random.default_rng(0), n_options=1)


# ---- rendering -----------------------------------------------------------------------------------------
def test_render_is_seeded_and_varies(concept):
    a = np.asarray(render(concept, np.random.default_rng(7), distractors=2))
    b = np.asarray(render(concept, np.random.default_rng(7), distractors=2))
    c = np.asarray(render(concept, np.random.default_rng(8), distractors=2))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_marks_are_drawn_where_the_identity_says(world):
    identity = Identity("square", "orange", "stripes", "large", (Mark(0, 3, "cyan"), Mark(2, 1, "black")))
    image = np.asarray(
        world.render(identity, np.random.default_rng(0), position=(16, 16), scale=1.0, background="plain")
    )
    side = world.config.size_px("large")
    x0 = y0 = 16 - side / 2
    for mark in identity.marks:
        cx = int(x0 + (mark.col + 0.5) * side / 4)
        cy = int(y0 + (mark.row + 0.5) * side / 4)
        assert np.abs(image[cy, cx].astype(int) - MARK_COLOURS[mark.colour]).max() <= 3
    # The other cells carry no mark colour.
    empty = image[int(y0 + 1.5 * side / 4), int(x0 + 2.5 * side / 4)]
    assert not _has_mark_pixels(empty[None, None])


def test_mark_colours_appear_only_on_marks(world):
    rng = np.random.default_rng(1)
    for _ in range(20):
        clutter = world.render_array(None, rng, distractors=4)
        assert not _has_mark_pixels(clutter)


def test_flip_mirrors_the_photo_and_the_marks(world):
    identity = Identity("triangle", "blue", "checker", "large", (Mark(3, 0, "white"),))
    kwargs = {"position": (13.0, 15.0), "scale": 1.0, "background": "plain"}
    flipped = np.asarray(world.render(identity, np.random.default_rng(3), flip=True, **kwargs)).astype(int)
    plain = np.asarray(world.render(identity, np.random.default_rng(3), **kwargs)).astype(int)
    assert np.array_equal(flipped, plain[:, ::-1])
    mirrored = world.render(
        identity.mirrored(4), np.random.default_rng(3), **{**kwargs, "position": (19.0, 15.0)}
    )
    assert np.abs(np.asarray(mirrored).astype(int) - flipped).mean() < 1.0


def test_sizes_stay_apart_and_boxes_are_exact(world):
    rng = np.random.default_rng(2)
    sides = {}
    for size in SIZES:
        identity = Identity("square", "red", "solid", size, (Mark(0, 0, "white"),))
        measured = []
        for _ in range(30):
            _, mask, (cx, cy, side) = world.render_annotated(identity, rng, distractors=2)
            cols = mask.max(axis=0)
            assert abs(cols.sum() - side) < 0.6  # the mask spans the reported box
            assert abs((cols * (np.arange(32) + 0.5)).sum() / cols.sum() - cx) < 0.6
            assert (
                side / 2 - 1e-6 <= cx <= 32 - side / 2 + 1e-6
                and side / 2 - 1e-6 <= cy <= 32 - side / 2 + 1e-6
            )
            measured.append(side)
        sides[size] = (min(measured), max(measured))
    assert SIZES == ("small", "large") and sides["small"][1] < sides["large"][0]


def test_every_background_renders(world, concept):
    rng = np.random.default_rng(0)
    images = [np.asarray(world.render(concept, rng, background=kind)) for kind in BACKGROUND_KINDS]
    assert len({img.tobytes() for img in images}) == len(BACKGROUND_KINDS)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"background": "space"},
        {"scale": 2.0},
        {"position": (50, 3)},
        {"position": "middle"},
        {"distractors": -1},
    ],
)
def test_render_rejects_bad_arguments(world, concept, kwargs):
    with pytest.raises(ToyWorldError):
        world.render(concept, np.random.default_rng(0), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 8},
        {"mark_grid": 1},
        {"supersample": 0},
        {"scale_jitter": 0.3},
        {"n_dev": -1},
        {"n_pretrain": N_SIGNATURES},  # more identities than the world has signatures
    ],
)
def test_world_config_validates(kwargs):
    with pytest.raises(ToyWorldError):
        WorldConfig(**kwargs)


def test_world_rejects_bad_seed():
    with pytest.raises(ToyWorldError):
        ToyWorld(-1)


def test_rendering_is_fast(world, concept):
    import time

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(300):
        world.render_array(concept, rng, distractors=2)
    # Thousands per second on an idle core; a loose bound keeps this stable on a busy machine.
    assert 300 / (time.perf_counter() - start) > 250


def test_48px_world_with_finer_grid():
    world = ToyWorld(0, WorldConfig(image_size=48, mark_grid=6, n_pretrain=10, n_dev=2, n_heldout=2))
    identity = world.splits["heldout"][0]
    assert all(m.row < 6 and m.col < 6 for m in identity.marks)
    assert world.render(identity, np.random.default_rng(0)).size == (48, 48)


# ---- identities across splits ---------------------------------------------------------------------------
def test_attributes_name_the_nameable_factors(concept):
    from yochameleon.eval.toyworld.scorer import FACTORS

    assert tuple(concept.attributes) == FACTORS == ("shape", "colour", "pattern", "size")
    assert tuple(concept.attributes.values()) == concept.base


def test_twins_share_everything_nameable_but_not_marks(world, concept):
    rng = np.random.default_rng(0)
    twins = [twin(concept, rng) for _ in range(50)]
    for other in twins:
        assert other.base == concept.base and other != concept
        assert other.attributes == concept.attributes
        assert caption(other) == caption(concept)
        world.check_identity(other)
    assert len(set(twins)) > 5


def test_twins_always_change_the_set_of_mark_colours(world):
    # Never the same colours moved elsewhere: a twin differs in what its marks look like.
    rng = np.random.default_rng(0)
    identities = world.splits["heldout"] + world.splits["pretrain"][:100]
    assert {len(i.marks) for i in identities} == {1, 2}  # both starting points are covered
    moved = kept = 0
    for identity in identities:
        for _ in range(40):
            other = world.twin(identity, rng)
            assert other.base == identity.base and full_caption(other) != full_caption(identity)
            assert other.mark_colours != identity.mark_colours and other.signature != identity.signature
            assert 1 <= len(other.marks) <= 2 and len(set(other.mark_colours)) == len(other.marks)
            world.check_identity(other)
            cells = {(m.row, m.col) for m in other.marks}
            if cells <= {(m.row, m.col) for m in identity.marks}:
                kept += 1
            else:
                moved += 1
    assert moved > 0 and kept > 0  # marks sometimes move to fresh cells, sometimes stay


def test_every_plain_description_has_at_least_six_possible_twins(world):
    # A user description (no marks) fits len(MARK_SETS) identities: the concept and its possible twins.
    assert len(MARK_SETS) - 1 >= 6
    rng = np.random.default_rng(1)
    for identity in world.splits["heldout"][:8]:
        reached = {world.twin(identity, rng).mark_colours for _ in range(300)}
        assert identity.mark_colours not in reached and len(reached) >= 6
        assert {mark_phrase(c) for c in reached} < set(MARK_SETS)


def test_splits_are_disjoint_deterministic_and_seeded():
    splits = split_identities(0)
    assert {k: len(v) for k, v in splits.items()} == {"pretrain": 2000, "dev": 16, "heldout": 32}
    sets = {k: set(v) for k, v in splits.items()}
    assert all(len(sets[k]) == len(splits[k]) for k in splits)
    assert not sets["pretrain"] & sets["heldout"]
    assert not sets["pretrain"] & sets["dev"]
    assert not sets["dev"] & sets["heldout"]
    assert ToyWorld(0).splits == splits
    assert set(ToyWorld(1).splits["heldout"]) != sets["heldout"]
    # Held-out identities do not depend on how many pretraining identities a world draws.
    assert ToyWorld(0, WorldConfig(n_pretrain=10)).splits["heldout"] == splits["heldout"]


def test_splits_have_unique_signatures_and_protect_dev_and_heldout_ones():
    world = ToyWorld(0)
    splits = world.splits
    signatures = [i.signature for split in splits.values() for i in split]
    assert len(signatures) == len(set(signatures)) == 2048  # unique within and across splits
    protected = {i.signature for i in splits["dev"] + splits["heldout"]}
    assert world.protected == protected and isinstance(world.protected, frozenset)
    assert not {i.signature for i in splits["pretrain"]} & protected
    assert not any(world.is_protected(i) for i in splits["pretrain"])
    # A held-out identity with its marks elsewhere still looks like it: protected.
    concept = splits["heldout"][0]
    cells = [c for c in world.valid_cells(concept.shape) if c not in concept.mark_map]
    moved = Identity(*concept.base, tuple(Mark(*c, m.colour) for c, m in zip(cells, concept.marks)))
    assert moved != concept and world.is_protected(moved)
    rng = np.random.default_rng(5)
    excluded = splits["pretrain"][:50]
    banned = {i.signature for i in excluded}
    for _ in range(3000):
        drawn = world.random_identity(rng, exclude=excluded)
        assert drawn.signature not in protected and drawn.signature not in banned


def test_pool_and_random_scenes_never_show_held_out_identities(world):
    pretrain = set(world.splits["pretrain"])
    heldout = {i.signature for i in world.splits["heldout"] + world.splits["dev"]}
    pool = world.pool_images(400, seed=3)
    shown = {item.identity for item in pool if item.identity is not None}
    assert shown and shown <= pretrain and not {i.signature for i in shown} & heldout
    assert any(item.identity is None for item in pool)
    assert all(item.image.size == (32, 32) for item in pool)
    rng = np.random.default_rng(0)
    for _ in range(500):
        assert world.random_identity(rng).signature not in heldout
        _, identity = world.random_scene(rng)
        assert identity is None or identity.signature not in heldout
    assert len(pool_images(3, 0)) == 3
    with pytest.raises(ToyWorldError):
        world.pool_images(-1, 0)
    with pytest.raises(ToyWorldError):
        world.pool_images(1, 0, clutter_fraction=2.0)


# ---- benchmark items -----------------------------------------------------------------------------------
def test_concept_photos_are_seeded_and_differ_from_test_photos(concept):
    photos = concept_photos(concept, n=4, seed=0)
    assert len(photos) == 4 and all(p.size == (32, 32) for p in photos)
    again = concept_photos(concept, n=4, seed=0)
    assert [p.tobytes() for p in photos] == [p.tobytes() for p in again]
    assert len({p.tobytes() for p in photos}) == 4
    positives = test_set(concept, seed=0).positives
    assert not {p.tobytes() for p in photos} & {p.tobytes() for p in positives}
    with pytest.raises(ToyWorldError):
        concept_photos(concept, n=0)


def test_test_set_contents(world, concept):
    items = world.test_set(concept, seed=1, n_positives=5, n_hard=6, n_easy=7, n_vqa=4)
    assert len(items.positives) == 5 and len(items.hard_negatives) == 6 and len(items.easy_negatives) == 7
    assert all(
        t.base == concept.base and t.mark_colours != concept.mark_colours
        for t in items.hard_negative_identities
    )
    assert concept.signature not in {i.signature for i in items.easy_negative_identities if i is not None}
    assert len(items.vqa) == 4 and {v.kind for v in items.vqa} == {"twin_location", "other_shape"}
    for vqa in items.vqa:
        assert vqa.image.size == (32, 32) and set(vqa.options) == {"A", "B"} and vqa.answer in vqa.options
        assert "<sks>" in vqa.question and vqa.options["A"] != vqa.options["B"]
        if vqa.kind == "other_shape":
            assert vqa.options[vqa.answer] != f"a {concept.shape}"
    assert len(items.text_qa) == 4
    with pytest.raises(ToyWorldError):
        world.test_set(concept, n_hard=-1)


def test_pair_scene_puts_the_concept_where_it_says(world):
    concept = Identity("square", "green", "solid", "large", (Mark(0, 0, "magenta"),))
    other = Identity("square", "green", "solid", "large", (Mark(3, 3, "cyan"),))
    rng = np.random.default_rng(0)
    for _ in range(10):
        image, (where, other_where) = world.render_pair_scene(concept, other, rng, "horizontal")
        array = np.asarray(image).astype(int)
        magenta = np.abs(array - MARK_COLOURS["magenta"]).max(-1) <= 3
        cyan = np.abs(array - MARK_COLOURS["cyan"]).max(-1) <= 3
        assert magenta.any() and cyan.any() and {where, other_where} == {"left", "right"}
        left_is_concept = np.nonzero(magenta)[1].mean() < np.nonzero(cyan)[1].mean()
        assert left_is_concept == (where == "left")
    with pytest.raises(ToyWorldError):
        world.render_pair_scene(concept, other, rng, "diagonal")


def test_same_object_pairs(world):
    pairs = world.same_object_pairs(world.splits["pretrain"][:50], np.random.default_rng(0), 60)
    kinds = {p.kind for p in pairs}
    assert kinds == {"same", "twin", "other"}
    for pair in pairs:
        assert pair.same == (pair.kind == "same") and pair.answer == ("Yes" if pair.same else "No")
        assert pair.image_a.size == pair.image_b.size == (32, 32)
    with pytest.raises(ToyWorldError):
        world.same_object_pairs([], np.random.default_rng(0), 1)
    with pytest.raises(ToyWorldError):
        world.same_object_pairs(
            world.splits["pretrain"][:2], np.random.default_rng(0), 1, p_same=0.9, p_twin=0.5
        )


def test_write_concept_folder(tmp_path, concept):
    folder = write_concept_folder(concept, tmp_path / "c", n_photos=5, seed=2)
    photos = sorted((folder / "photos").glob("*.png"))
    assert len(photos) == 5
    assert Image.open(photos[0]).size == (32, 32)
    meta = yaml.safe_load((folder / "concept.yaml").read_text())
    assert meta["name"] == concept.name and meta["is_person"] is False and meta["category"] == "toy"
    assert meta["description"] == caption(concept) and len(meta["facts"]) == 4
    rows = [json.loads(line) for line in (folder / "qa.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(set(r) == {"question", "answer"} for r in rows)
    text = (folder / "concept.yaml").read_text() + (folder / "qa.jsonl").read_text()
    assert not _words(text) & MARK_WORDS
    assert concept.colour in text and concept.shape in text
    stored = json.loads((folder / "toyworld_identity.json").read_text())
    assert Identity.from_dict(stored) == concept


def test_palettes_are_disjoint():
    assert not set(MARK_COLOURS) & set(OBJECT_COLOURS)
    assert not set(MARK_COLOURS.values()) & set(OBJECT_COLOURS.values())
    assert len(SHAPES) == 5 and "ring" not in SHAPES and "dots" not in PATTERNS


def test_patterns_survive_the_tokenizer_cells(world):
    # Seen through the VQ tokenizer's 4-px cells (each cell's mean colour), every pattern of the
    # smallest object must differ from the plain object and from every other pattern somewhere by a
    # clear margin; the earlier fainter, finer patterns missed this (a 7.9 minimum for dots).
    cell = 4
    side = world.config.image_size // cell
    weakest = np.inf
    for shape in SHAPES:
        mark = (Mark(*world.valid_cells(shape)[0], "white"),)
        for colour in OBJECT_COLOURS:
            pooled = {}
            for pattern in PATTERNS:
                identity = world.check_identity(Identity(shape, colour, pattern, "small", mark))
                photo = np.asarray(world.render(identity, np.random.default_rng(1), distractors=0), float)
                pooled[pattern] = photo.reshape(side, cell, side, cell, 3).mean((1, 3))
            for i, a in enumerate(PATTERNS):
                for b in PATTERNS[i + 1 :]:
                    weakest = min(weakest, np.abs(pooled[a] - pooled[b]).sum(-1).max())
    assert weakest >= 25.0, weakest


def test_canonical_view_is_one_fixed_centred_drawing_per_identity(world, concept):
    view = np.asarray(world.canonical_view(concept))
    assert np.array_equal(view, np.asarray(world.canonical_view(concept)))  # no randomness
    # It is the centred photo at scale 1 on the first background colour: find a seed drawing that one.
    for seed in range(100):
        placed = np.asarray(
            world.render(
                concept, np.random.default_rng(seed), position=(16, 16), scale=1.0, background="plain"
            )
        )
        if np.array_equal(placed[0, 0], view[0, 0]):
            break
    assert np.array_equal(view, placed)
    twin = world.twin(concept, np.random.default_rng(0))
    assert not np.array_equal(view, np.asarray(world.canonical_view(twin)))


def test_a_drawing_keeps_the_identity_and_drops_where_its_marks_sit(world):
    from yochameleon.eval.toyworld.world import DRAWING_MARK_CELLS

    rng = np.random.default_rng(0)
    for shape in SHAPES:  # the fixed cells are on every shape
        assert set(DRAWING_MARK_CELLS) <= set(world.valid_cells(shape))
    concept = next(i for i in world.splits["heldout"] if len(i.marks) == 2)
    cells = [c for c in world.valid_cells(concept.shape) if c not in concept.mark_map]
    moved = Identity(*concept.base, tuple(Mark(*c, m.colour) for c, m in zip(cells, concept.marks)))
    drawing = np.asarray(world.drawing(concept))
    # The same identity with its marks elsewhere is drawn the same: positions are no part of it...
    assert np.array_equal(drawing, np.asarray(world.drawing(moved)))
    # ...and the drawing is its canonical view with the palette's first colour at the first cell.
    first, second = concept.mark_colours
    fixed = Identity(
        *concept.base, (Mark(*DRAWING_MARK_CELLS[0], first), Mark(*DRAWING_MARK_CELLS[1], second))
    )
    assert np.array_equal(drawing, np.asarray(world.canonical_view(fixed)))
    # A twin (other mark colours) is drawn differently.
    twin = world.twin(concept, rng)
    assert not np.array_equal(drawing, np.asarray(world.drawing(twin)))
