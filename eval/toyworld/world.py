"""A seeded procedural world of small RGB scenes for measuring personalization on a CPU.

Every scene holds at most a few objects on a textured background. An object has a shape, a colour, a
pattern and a size, and carries one or two *marks*: cells of a ``G x G`` grid laid over its bounding box,
filled with distinct colours from a high-contrast palette that no object, background or distractor ever
uses. An identity is the four nameable factors plus the *set of its mark colours*; a concept's *twins* have
the same four factors and another set of mark colours (never the same colours moved elsewhere), so
they differ in what the marks look like, not only in where they sit.

The base model learns mark colours by name (:func:`full_caption`: "a large red striped circle with a
cyan mark and a black mark"), but a concept's user description (:func:`caption`, what ``concept.yaml``
holds and the text-prompt baseline reads) leaves the marks out, as people leave out details: the learned
tokens must recover from a few photos what the words missed.

Everything is drawn with numpy at ``supersample`` times the output resolution and box-filtered down, which
gives soft edges at thousands of images per second. All randomness comes from a ``numpy.random.Generator``
the caller passes in, so any scene can be re-drawn exactly.

Example:
    >>> world = ToyWorld(world_seed=0)
    >>> concept = world.splits["heldout"][0]
    >>> photo = world.render(concept, np.random.default_rng(1), distractors=2)
    >>> caption(concept)
    'a large red striped circle'
    >>> full_caption(concept)
    'a large red striped circle with a cyan mark'
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from yochameleon.errors import YoChameleonError

__all__ = [
    "BACKGROUND_KINDS",
    "OBJECT_COLOURS",
    "MARK_COLOURS",
    "PATTERNS",
    "SHAPES",
    "SIZES",
    "ConceptTestSet",
    "DRAWING_MARK_CELLS",
    "Identity",
    "Mark",
    "PoolItem",
    "QAPair",
    "SamePair",
    "TextQAItem",
    "ToyWorld",
    "ToyWorldError",
    "VQAItem",
    "WorldConfig",
    "ATTRIBUTE_ANSWERS",
    "FACTOR_VALUES",
    "MARK_SETS",
    "QA_FACTORS",
    "attribute_qa",
    "caption",
    "full_caption",
    "mark_phrase",
    "draw_options",
    "factor_word",
    "concept_photos",
    "pool_images",
    "render",
    "split_identities",
    "test_set",
    "text_qa",
    "twin",
    "two_options",
    "write_concept_folder",
]


class ToyWorldError(YoChameleonError):
    """An identity, scene request or world configuration is invalid."""


# --------------------------------------------------------------------------------------------------------
# Vocabulary. Object colours are mid-tone and saturated, backgrounds are muted, marks are extreme: the three
# palettes never overlap, so a mark-coloured pixel can only belong to a mark.
# --------------------------------------------------------------------------------------------------------
# v2 drops what the 4-px tokenizer cells lost most (measured, eval/toyworld/README.md): the ring, the
# dotted pattern and the 12-px size class.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 45, 45),
    "orange": (235, 135, 30),
    "yellow": (225, 205, 45),
    "green": (60, 160, 70),
    "blue": (45, 90, 210),
    "purple": (125, 65, 180),
    "pink": (240, 145, 185),
    "brown": (135, 90, 50),
}
PATTERNS: tuple[str, ...] = ("solid", "stripes", "checker")
PATTERN_ADJECTIVES: dict[str, str] = {
    "solid": "plain",
    "stripes": "striped",
    "checker": "checkered",
}
SIZES: tuple[str, ...] = ("small", "large")
# Named in the base model's pretraining text (full captions, mark questions), never in a user description.
MARK_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "white": (250, 250, 250),
    "cyan": (0, 235, 235),
    "magenta": (235, 0, 235),
}
# Where a drawing (ToyWorld.drawing) puts the first and second mark colour: on the object for every
# shape of the 4x4 mark grid, and diagonal, so two marks never share an edge.
DRAWING_MARK_CELLS: tuple[tuple[int, int], ...] = ((1, 1), (2, 2))
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "noise", "grid", "bands")
_BACKGROUND_COLOURS: tuple[tuple[int, int, int], ...] = (
    (196, 190, 176),  # sand
    (164, 178, 190),  # blue-grey
    (170, 186, 160),  # sage
    (110, 116, 124),  # slate
    (186, 176, 196),  # lavender-grey
    (150, 140, 128),  # taupe
)
# Bounding-box side in pixels at 32 px; scale jitter (WorldConfig.scale_jitter) never lets classes overlap.
_SIZE_PX_AT_32: dict[str, float] = {"small": 16.5, "large": 21.0}
_DISTRACTOR_PX_AT_32: tuple[float, float] = (5.0, 8.0)


# --------------------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Mark:
    """One mark: the cell ``(row, col)`` of the object's mark grid, filled with a mark-palette colour."""

    row: int
    col: int
    colour: str

    def __post_init__(self) -> None:
        if not isinstance(self.row, int) or not isinstance(self.col, int) or self.row < 0 or self.col < 0:
            raise ToyWorldError(f"mark cell must be non-negative integers, got ({self.row!r}, {self.col!r})")
        if self.colour not in MARK_COLOURS:
            raise ToyWorldError(f"unknown mark colour {self.colour!r}; choose from {sorted(MARK_COLOURS)}")


@dataclass(frozen=True)
class Identity:
    """One object identity: a fixed shape, colour, pattern, size and 1–2 marks of distinct colours.

    Identities are hashable and compare by value (mark cells included, which fixes how photos are drawn).
    Marks are stored sorted by cell, so two identities with the same marks listed in another order are
    equal. What tells identities apart for the benchmark is :attr:`signature` (the four factors and the set
    of mark colours): the world never holds two identities with one signature.

    Attributes:
        shape: one of :data:`SHAPES`.
        colour: one of :data:`OBJECT_COLOURS`.
        pattern: one of :data:`PATTERNS`.
        size: one of :data:`SIZES`.
        marks: 1 or 2 :class:`Mark` on distinct cells.
    """

    shape: str
    colour: str
    pattern: str
    size: str
    marks: tuple[Mark, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for factor, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(OBJECT_COLOURS)),
            ("pattern", self.pattern, PATTERNS),
            ("size", self.size, SIZES),
        ):
            if value not in allowed:
                raise ToyWorldError(f"unknown {factor} {value!r}; choose from {list(allowed)}")
        marks = tuple(sorted(self.marks))
        if not 1 <= len(marks) <= 2:
            raise ToyWorldError(f"an identity has 1 or 2 marks, got {len(marks)}")
        if not all(isinstance(m, Mark) for m in marks):
            raise ToyWorldError("marks must be Mark instances")
        if len({(m.row, m.col) for m in marks}) != len(marks):
            raise ToyWorldError(f"two marks share a cell: {marks}")
        if len({m.colour for m in marks}) != len(marks):
            raise ToyWorldError(f"two marks share a colour: {marks}")
        object.__setattr__(self, "marks", marks)

    @property
    def base(self) -> tuple[str, str, str, str]:
        """The nameable part of the identity: ``(shape, colour, pattern, size)``."""
        return (self.shape, self.colour, self.pattern, self.size)

    @property
    def attributes(self) -> dict[str, str]:
        """The nameable factors by name: ``{"shape": ..., "colour": ..., "pattern": ..., "size": ...}``."""
        return {factor: getattr(self, factor) for factor in FACTOR_VALUES}

    @property
    def mark_colours(self) -> tuple[str, ...]:
        """The set of mark colours, in the palette's order (e.g. ``("black", "cyan")``)."""
        return tuple(c for c in MARK_COLOURS if c in {m.colour for m in self.marks})

    @property
    def signature(self) -> tuple[str, str, str, str, tuple[str, ...]]:
        """What tells identities apart: the four nameable factors and the set of mark colours."""
        return (*self.base, self.mark_colours)

    @property
    def mark_map(self) -> dict[tuple[int, int], str]:
        """Marks as ``{(row, col): colour}``."""
        return {(m.row, m.col): m.colour for m in self.marks}

    @property
    def key(self) -> str:
        """A canonical string, stable across runs (used for names and hashing to files)."""
        marks = ";".join(f"{m.row},{m.col}:{m.colour}" for m in self.marks)
        return f"{self.shape}/{self.colour}/{self.pattern}/{self.size}/{marks}"

    @property
    def name(self) -> str:
        """A short concept name such as ``toy-3fa91c0d``."""
        return "toy-" + hashlib.sha1(self.key.encode()).hexdigest()[:8]

    def mirrored(self, grid: int) -> Identity:
        """The identity as seen in a horizontally flipped photo (mark columns mirrored)."""
        marks = tuple(Mark(m.row, grid - 1 - m.col, m.colour) for m in self.marks)
        return Identity(self.shape, self.colour, self.pattern, self.size, marks)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict; inverse of :meth:`from_dict`."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "pattern": self.pattern,
            "size": self.size,
            "marks": [{"row": m.row, "col": m.col, "colour": m.colour} for m in self.marks],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Identity:
        """Build an identity from :meth:`to_dict` output.

        Raises:
            ToyWorldError: if a key is missing or a value is invalid.
        """
        try:
            marks = tuple(Mark(int(m["row"]), int(m["col"]), str(m["colour"])) for m in data["marks"])
            return cls(
                str(data["shape"]), str(data["colour"]), str(data["pattern"]), str(data["size"]), marks
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ToyWorldError(f"not an identity dict: {data!r} ({err})") from err


# --------------------------------------------------------------------------------------------------------
# Text: captions and question/answer items. Mark colours are named only by full captions and mark
# questions (the base model's pretraining and the oracle baseline), never by a user description.
# --------------------------------------------------------------------------------------------------------
def caption(identity: Identity) -> str:
    """The user's description, without marks, e.g. ``"a large red striped circle"``."""
    return f"a {identity.size} {identity.colour} {PATTERN_ADJECTIVES[identity.pattern]} {identity.shape}"


def mark_phrase(colours: Sequence[str]) -> str:
    """``"a cyan mark"`` or ``"a black mark and a cyan mark"`` (colours in the palette's order).

    Raises:
        ToyWorldError: on an empty set or an unknown colour.
    """
    if not colours or any(c not in MARK_COLOURS for c in colours):
        raise ToyWorldError(f"mark colours must be 1 or more of {list(MARK_COLOURS)}, got {list(colours)}")
    ordered = [c for c in MARK_COLOURS if c in set(colours)]
    return " and ".join(f"a {c} mark" for c in ordered)


def full_caption(identity: Identity) -> str:
    """The description with the marks named, e.g. ``"a large red striped circle with a cyan mark"``."""
    return f"{caption(identity)} with {mark_phrase(identity.mark_colours)}"


@dataclass(frozen=True)
class QAPair:
    """A question about a photo with its answer; ``factor``/``value`` allow exact scoring."""

    question: str
    answer: str
    factor: str
    value: str


@dataclass(frozen=True)
class TextQAItem:
    """A multiple-choice question about a concept (``<sks>`` stands for it); ``answer`` is a letter."""

    question: str
    options: dict[str, str]
    answer: str
    factor: str


@dataclass(frozen=True)
class VQAItem:
    """A multiple-choice question about ``image``, which shows the concept (``<sks>``) and another object."""

    image: Image.Image
    question: str
    options: dict[str, str]
    answer: str
    kind: str


_ATTRIBUTE_QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": (
        "What shape is the object?",
        "Which shape does the object have?",
        "What is the object's shape?",
    ),
    "colour": (
        "What colour is the object?",
        "What is the colour of the object?",
        "Which colour is the object?",
    ),
    "pattern": (
        "What pattern does the object have?",
        "How is the object patterned?",
        "What is on the surface?",
    ),
    "size": ("How big is the object?", "What size is the object?", "Is the object small or large?"),
    "marks": (
        "What marks does the object have?",
        "What colour are the marks on the object?",
        "Which marks are on the object?",
    ),
}
ATTRIBUTE_ANSWERS: dict[str, str] = {
    "shape": "It is a {value}.",
    "colour": "It is {value}.",
    "pattern": "It is {value}.",
    "size": "It is {value}.",
    "marks": "It has {value}.",
}
_CONCEPT_QUESTIONS: dict[str, str] = {
    "shape": "What shape is <sks>?",
    "colour": "What colour is <sks>?",
    "pattern": "What pattern does <sks> have?",
    "size": "How big is <sks>?",
}
FACTOR_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(OBJECT_COLOURS),
    "pattern": PATTERNS,
    "size": SIZES,
}
# Every set of 1-2 distinct mark colours, as its phrase ("a black mark and a cyan mark"): the values of the
# "marks" question. Each plain description is shared by len(MARK_SETS) = 10 identities, and one edit of
# ToyWorld.twin reaches 6 other sets from any of them.
MARK_SETS: tuple[str, ...] = tuple(
    mark_phrase(combo) for n in (1, 2) for combo in itertools.combinations(MARK_COLOURS, n)
)
# The factors attribute questions ask about: the nameable four and the marks.
QA_FACTORS: tuple[str, ...] = (*FACTOR_VALUES, "marks")


def factor_values(factor: str) -> tuple[str, ...]:
    """Every value a question about ``factor`` (one of :data:`QA_FACTORS`) can have."""
    return MARK_SETS if factor == "marks" else FACTOR_VALUES[factor]


def factor_value(identity: Identity, factor: str) -> str:
    """``identity``'s value of ``factor``; for ``"marks"`` its mark phrase."""
    return mark_phrase(identity.mark_colours) if factor == "marks" else getattr(identity, factor)


def factor_word(factor: str, value: str) -> str:
    """The word that names ``value`` in text: pattern values as adjectives (``"striped"``), others as is."""
    return PATTERN_ADJECTIVES[value] if factor == "pattern" else value


def draw_options(factor: str, right: str, n_wrong: int, rng: np.random.Generator) -> tuple[list[str], int]:
    """The right value of ``factor`` and ``n_wrong`` other values, shuffled.

    Returns:
        ``(values, index)``: the shuffled values and the position of ``right`` among them.
    """
    wrong = [v for v in factor_values(factor) if v != right]
    chosen = [right] + [wrong[i] for i in rng.choice(len(wrong), size=n_wrong, replace=False)]
    order = rng.permutation(len(chosen))
    return [chosen[j] for j in order], int(np.flatnonzero(order == 0)[0])


def two_options(right: str, wrong: str, rng: np.random.Generator) -> list[str]:
    """``[right, wrong]`` or ``[wrong, right]``, each with probability 1/2."""
    return [right, wrong] if rng.integers(2) == 0 else [wrong, right]


def attribute_qa(identity: Identity, rng: np.random.Generator | None = None) -> list[QAPair]:
    """One question per factor about a photo of ``identity`` (paraphrase drawn from ``rng``).

    Args:
        identity: the object shown in the photo.
        rng: picks the paraphrase; ``None`` always uses the first one.

    Returns:
        Five :class:`QAPair` (shape, colour, pattern, size, marks).
    """
    pairs = []
    for factor, questions in _ATTRIBUTE_QUESTIONS.items():
        question = questions[0] if rng is None else questions[int(rng.integers(len(questions)))]
        word = factor_word(factor, factor_value(identity, factor))
        pairs.append(QAPair(question, ATTRIBUTE_ANSWERS[factor].format(value=word), factor, word))
    return pairs


def concept_facts(identity: Identity) -> list[str]:
    """Attribute statements about a concept, written with the ``<sks>`` placeholder."""
    return [
        f"<sks> is a {identity.shape}.",
        f"<sks> is {identity.colour}.",
        f"<sks> is {PATTERN_ADJECTIVES[identity.pattern]}.",
        f"<sks> is {identity.size}.",
    ]


def concept_qa(identity: Identity) -> list[dict[str, str]]:
    """Open question/answer pairs about a concept's attributes (the ``qa.jsonl`` rows)."""
    rows = []
    for factor, question in _CONCEPT_QUESTIONS.items():
        word = factor_word(factor, getattr(identity, factor))
        answer = f"<sks> is a {word}." if factor == "shape" else f"<sks> is {word}."
        rows.append({"question": question, "answer": answer})
    return rows


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def text_qa(identity: Identity, rng: np.random.Generator, n_options: int = 4) -> list[TextQAItem]:
    """Multiple-choice questions about a concept's attributes (no image), one per factor.

    Args:
        identity: the concept.
        rng: draws the wrong options and their order.
        n_options: options per question (capped by the number of values a factor has; at least 2).

    Raises:
        ToyWorldError: if ``n_options < 2``.
    """
    if n_options < 2:
        raise ToyWorldError(f"n_options must be at least 2, got {n_options}")
    items = []
    for factor, question in _CONCEPT_QUESTIONS.items():
        n_wrong = min(n_options, len(FACTOR_VALUES[factor])) - 1
        values, right = draw_options(factor, getattr(identity, factor), n_wrong, rng)
        letters = _letters(len(values))
        options = {letter: factor_word(factor, value) for letter, value in zip(letters, values)}
        items.append(TextQAItem(question, options, letters[right], factor))
    return items


# --------------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------------
def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in unit box coordinates; ``u`` is a row vector (x), ``v`` a column vector (y)."""
    du, dv = u - 0.5, v - 0.5
    in_box = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "circle":
        return du * du + dv * dv <= 0.25
    if shape == "square":
        return in_box
    if shape == "triangle":  # apex up: symmetric under a horizontal flip, like every shape here
        return in_box & (np.abs(du) <= v / 2)
    if shape == "diamond":
        return np.abs(du) + np.abs(dv) <= 0.5
    if shape == "cross":
        return in_box & ((np.abs(du) <= 1 / 6) | (np.abs(dv) <= 1 / 6))
    raise ToyWorldError(f"unknown shape {shape!r}")


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the pattern uses the secondary shade; object-local, so it moves and scales with the object."""
    if pattern == "solid":
        return np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    # Coarse and dark on purpose: every element is at least ~4 px on a small (12 px) object and the
    # second shade is far from the first, because finer or fainter patterns were rebuilt as plain bodies
    # by the VQ tokenizer (4-px cells), so no reader of its tokens could name them.
    if pattern == "stripes":  # one broad band across the middle third
        return np.broadcast_to(np.floor(v * 3) % 2 == 1, np.broadcast_shapes(u.shape, v.shape))
    if pattern == "checker":  # odd count keeps it mirror-symmetric
        return (np.floor(u * 3) + np.floor(v * 3)) % 2 == 1
    raise ToyWorldError(f"unknown pattern {pattern!r}")


def _secondary_shade(rgb: tuple[int, int, int]) -> np.ndarray:
    # A much darker shade of the same colour: patterns never introduce a new colour name, and never
    # reach the mark palette's black.
    return np.asarray(rgb, dtype=np.float32) * 0.42 + 18.0


# --------------------------------------------------------------------------------------------------------
# World
# --------------------------------------------------------------------------------------------------------
N_SIGNATURES = len(SHAPES) * len(OBJECT_COLOURS) * len(PATTERNS) * len(SIZES) * len(MARK_SETS)


@dataclass(frozen=True)
class WorldConfig:
    """Rendering and split settings.

    Attributes:
        image_size: output side in pixels (32 by default; 48 is the fallback if marks are too small).
        mark_grid: marks live on a ``mark_grid x mark_grid`` grid over the object's bounding box.
        supersample: draw at this multiple and box-filter down (soft edges).
        scale_jitter: scale is drawn from ``[1 - j, 1 + j]``; small enough that size classes never overlap.
        n_pretrain, n_dev, n_heldout: identities per split.
    """

    image_size: int = 32
    mark_grid: int = 4
    supersample: int = 2
    scale_jitter: float = 0.08
    n_pretrain: int = 2000
    n_dev: int = 16
    n_heldout: int = 32

    def __post_init__(self) -> None:
        if self.image_size < 24:
            raise ToyWorldError(f"image_size must be at least 24, got {self.image_size}")
        if not 2 <= self.mark_grid <= 12:
            raise ToyWorldError(f"mark_grid must be in [2, 12], got {self.mark_grid}")
        if not 1 <= self.supersample <= 4:
            raise ToyWorldError(f"supersample must be in [1, 4], got {self.supersample}")
        if not 0.0 <= self.scale_jitter <= 0.1:
            raise ToyWorldError(
                f"scale_jitter must be in [0, 0.1] so size classes stay apart, got {self.scale_jitter}"
            )
        if min(self.n_pretrain, self.n_dev, self.n_heldout) < 0 or self.n_heldout + self.n_dev < 1:
            raise ToyWorldError("split sizes must be non-negative and dev + heldout at least 1")
        total = self.n_pretrain + self.n_dev + self.n_heldout
        if total > N_SIGNATURES:
            raise ToyWorldError(
                f"the splits ask for {total} identities but the world has only {N_SIGNATURES} "
                "(shape x colour x pattern x size x mark-colour set)"
            )

    def size_px(self, size: str) -> float:
        """Nominal bounding-box side of a size class, in output pixels."""
        return _SIZE_PX_AT_32[size] * self.image_size / 32.0


@dataclass(frozen=True)
class PoolItem:
    """A retrieval-pool image and the identity it shows (``None`` for an object-free clutter scene)."""

    image: Image.Image
    identity: Identity | None


@dataclass(frozen=True)
class SamePair:
    """Two photos and whether they show the same object; ``kind`` is ``same``, ``twin`` or ``other``."""

    image_a: Image.Image
    image_b: Image.Image
    same: bool
    kind: str
    question: str = "Is the object in the first photo the same object as in the second photo?"

    @property
    def answer(self) -> str:
        return "Yes" if self.same else "No"


@dataclass
class ConceptTestSet:
    """Everything the benchmark needs to score one concept.

    Attributes:
        identity: the concept.
        positives: the concept at new places and scales on new backgrounds.
        hard_negatives: twins (same shape, colour, pattern, size; other marks), with their identities.
        easy_negatives: random scenes, with their identities (``None`` for clutter).
        vqa: multiple-choice visual questions; the concept shares the scene with a twin or another object.
        text_qa: multiple-choice questions about the concept's attributes.
    """

    identity: Identity
    positives: list[Image.Image]
    hard_negatives: list[Image.Image]
    hard_negative_identities: list[Identity]
    easy_negatives: list[Image.Image]
    easy_negative_identities: list[Identity | None]
    vqa: list[VQAItem]
    text_qa: list[TextQAItem]


@dataclass(frozen=True)
class _Placement:
    identity: Identity
    cx: float
    cy: float
    scale: float


class ToyWorld:
    """The procedural world: identities, splits, rendering and benchmark items.

    Args:
        world_seed: seeds the identity splits (not the scenes: those take their own ``rng``/``seed``).
        config: rendering and split settings.
    """

    def __init__(self, world_seed: int = 0, config: WorldConfig | None = None) -> None:
        if not isinstance(world_seed, (int, np.integer)) or world_seed < 0:
            raise ToyWorldError(f"world_seed must be a non-negative integer, got {world_seed!r}")
        self.world_seed = int(world_seed)
        self.config = config or WorldConfig()
        res = self.config.image_size * self.config.supersample
        # Pixel centres of the supersampled canvas, in output-pixel units.
        self._coords = ((np.arange(res) + 0.5) / self.config.supersample).astype(np.float32)
        self._valid_cells = {shape: self._compute_valid_cells(shape) for shape in SHAPES}

    # ---- identities -------------------------------------------------------------------------------------
    def _compute_valid_cells(self, shape: str) -> tuple[tuple[int, int], ...]:
        # A mark may sit on a cell whose centre lies on the object, so every mark touches its object.
        g = self.config.mark_grid
        centres = (np.arange(g) + 0.5) / g
        inside = _shape_mask(shape, centres[None, :], centres[:, None])
        return tuple((int(r), int(c)) for r, c in zip(*np.nonzero(inside)))

    def valid_cells(self, shape: str) -> tuple[tuple[int, int], ...]:
        """Mark cells ``(row, col)`` allowed on ``shape`` for this world's mark grid."""
        if shape not in self._valid_cells:
            raise ToyWorldError(f"unknown shape {shape!r}")
        return self._valid_cells[shape]

    def check_identity(self, identity: Identity) -> Identity:
        """Return ``identity`` if its marks fit this world's grid and shape.

        Raises:
            ToyWorldError: if ``identity`` is not an :class:`Identity` or a mark is off the object.
        """
        if not isinstance(identity, Identity):
            raise ToyWorldError(f"expected an Identity, got {type(identity).__name__}")
        allowed = set(self._valid_cells[identity.shape])
        for mark in identity.marks:
            if (mark.row, mark.col) not in allowed:
                raise ToyWorldError(
                    f"mark cell ({mark.row}, {mark.col}) is not on a {identity.shape} "
                    f"(grid {self.config.mark_grid}); allowed: {sorted(allowed)}"
                )
        return identity

    def _random_marks(
        self, shape: str, rng: np.random.Generator, n_marks: int | None = None
    ) -> tuple[Mark, ...]:
        cells = self._valid_cells[shape]
        n = int(rng.integers(1, 3)) if n_marks is None else n_marks
        picks = rng.choice(len(cells), size=n, replace=False)
        colours = list(MARK_COLOURS)
        hues = rng.choice(len(colours), size=n, replace=False)
        return tuple(Mark(*cells[int(i)], colours[int(h)]) for i, h in zip(picks, hues))

    def _draw_identity(self, rng: np.random.Generator) -> Identity:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(OBJECT_COLOURS)[int(rng.integers(len(OBJECT_COLOURS)))]
        pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        return Identity(shape, colour, pattern, size, self._random_marks(shape, rng))

    @cached_property
    def splits(self) -> dict[str, list[Identity]]:
        """Disjoint identity lists ``{"pretrain", "dev", "heldout"}``, fixed by ``world_seed``."""
        rng = np.random.default_rng([self.world_seed, 0x7079])
        seen: set[tuple] = set()
        out: dict[str, list[Identity]] = {}
        # Held-out and dev first, so their draws do not depend on the (configurable) pretraining count.
        for split, count in (
            ("heldout", self.config.n_heldout),
            ("dev", self.config.n_dev),
            ("pretrain", self.config.n_pretrain),
        ):
            items: list[Identity] = []
            while len(items) < count:
                identity = self._draw_identity(rng)
                if identity.signature not in seen:
                    seen.add(identity.signature)
                    items.append(identity)
            out[split] = items
        return {"pretrain": out["pretrain"], "dev": out["dev"], "heldout": out["heldout"]}

    @cached_property
    def protected(self) -> frozenset[tuple]:
        """Signatures of dev and held-out identities: random scenes and pretraining never show them."""
        return frozenset(i.signature for i in (*self.splits["dev"], *self.splits["heldout"]))

    def is_protected(self, identity: Identity) -> bool:
        """Whether ``identity`` looks like a dev or held-out identity (same signature)."""
        return identity.signature in self.protected

    def random_identity(self, rng: np.random.Generator, exclude: Iterable[Identity] = ()) -> Identity:
        """A fresh random identity whose signature is neither dev, held-out, nor one of ``exclude``'s."""
        banned = {i.signature for i in exclude}
        while True:
            identity = self._draw_identity(rng)
            if identity.signature not in self.protected and identity.signature not in banned:
                return identity

    def twin(self, identity: Identity, rng: np.random.Generator) -> Identity:
        """A hard negative: the same shape, colour, pattern and size with another set of mark colours.

        One of three edits, chosen at random: recolour a mark with a colour the identity lacks, add a
        mark of such a colour, or remove one of two marks. Half the time every mark then moves to fresh
        cells. The set of mark colours always differs from ``identity``'s, so no twin differs by
        position alone.
        """
        self.check_identity(identity)
        cells = self._valid_cells[identity.shape]
        while True:
            marks = list(identity.marks)
            unused = [c for c in MARK_COLOURS if c not in identity.mark_colours]
            edit = int(rng.integers(3))
            i = int(rng.integers(len(marks)))
            used = {(m.row, m.col) for m in marks}
            free = [c for c in cells if c not in used]
            if edit == 0:
                marks[i] = Mark(marks[i].row, marks[i].col, unused[int(rng.integers(len(unused)))])
            elif len(marks) == 2:
                marks.pop(i)
            elif free:
                cell = free[int(rng.integers(len(free)))]
                marks.append(Mark(cell[0], cell[1], unused[int(rng.integers(len(unused)))]))
            else:
                continue
            if rng.random() < 0.5:
                picks = rng.choice(len(cells), size=len(marks), replace=False)
                marks = [Mark(*cells[int(k)], m.colour) for k, m in zip(picks, marks)]
            candidate = Identity(
                identity.shape, identity.colour, identity.pattern, identity.size, tuple(marks)
            )
            if candidate.mark_colours != identity.mark_colours:
                return candidate

    # ---- rendering --------------------------------------------------------------------------------------
    def _background(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        res = len(self._coords)
        palette = np.asarray(_BACKGROUND_COLOURS, dtype=np.float32)
        a, b = palette[rng.choice(len(palette), size=2, replace=False)]
        canvas = np.empty((res, res, 3), dtype=np.float32)
        canvas[:] = a
        if kind == "plain":
            return canvas
        x = self._coords[None, :] / self.config.image_size
        y = self._coords[:, None] / self.config.image_size
        if kind == "gradient":
            angle = rng.uniform(0, 2 * np.pi)
            t = np.clip((np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) + 0.5, 0, 1)
            return a + (b - a) * t[..., None]
        if kind == "noise":
            coarse = rng.uniform(-1, 1, size=(5, 5)).astype(np.float32)
            small = Image.fromarray(coarse, mode="F").resize((res, res), Image.BILINEAR)
            return canvas + np.asarray(small, dtype=np.float32)[..., None] * 18.0
        if kind == "grid":
            period = self.config.image_size / float(rng.choice([4, 5, 6]))
            line = (self._coords % period) < 0.75
            canvas[line[:, None] | line[None, :]] = a * 0.85
            return canvas
        if kind == "bands":
            width = rng.uniform(4, 8) / self.config.image_size
            sel = np.floor((x + y) / width) % 2 == 1
            return np.where(sel[..., None], b, a).astype(np.float32)
        raise ToyWorldError(f"unknown background {kind!r}; choose from {list(BACKGROUND_KINDS)}")

    def _paint(
        self,
        canvas: np.ndarray,
        shape: str,
        colour: tuple[int, int, int],
        pattern: str,
        side: float,
        cx: float,
        cy: float,
        marks: Sequence[Mark] = (),
        coverage: np.ndarray | None = None,
    ) -> None:
        ss = self.config.supersample
        res = canvas.shape[0]
        x0, y0 = cx - side / 2, cy - side / 2
        # Only touch the object's window of the canvas.
        lo_x, hi_x = max(0, int(np.floor(x0 * ss))), min(res, int(np.ceil((x0 + side) * ss)) + 1)
        lo_y, hi_y = max(0, int(np.floor(y0 * ss))), min(res, int(np.ceil((y0 + side) * ss)) + 1)
        if lo_x >= hi_x or lo_y >= hi_y:
            return
        u = ((self._coords[lo_x:hi_x] - x0) / side)[None, :]
        v = ((self._coords[lo_y:hi_y] - y0) / side)[:, None]
        window = canvas[lo_y:hi_y, lo_x:hi_x]
        inside = _shape_mask(shape, u, v)
        shade = _pattern_mask(pattern, u, v)
        primary = np.asarray(colour, dtype=np.float32)
        window[inside & ~shade] = primary
        window[inside & shade] = _secondary_shade(colour)
        if coverage is not None:
            coverage[:] = 0.0
            coverage[lo_y:hi_y, lo_x:hi_x][inside] = 1.0
        if marks:
            g = self.config.mark_grid
            in_u, in_v = (u >= 0) & (u < 1), (v >= 0) & (v < 1)
            cell_u = np.where(in_u, np.floor(u * g), -1)
            cell_v = np.where(in_v, np.floor(v * g), -1)
            for mark in marks:
                cell = (cell_v == mark.row) & (cell_u == mark.col)
                window[cell] = MARK_COLOURS[mark.colour]
                if coverage is not None:
                    # Mark cells lie inside the bounding box, which every shape touches on all four sides,
                    # so the union's extent is still exactly the box.
                    coverage[lo_y:hi_y, lo_x:hi_x][cell] = 1.0

    def _paint_distractor(
        self, canvas: np.ndarray, rng: np.random.Generator, avoid: Sequence[tuple[float, float, float]]
    ) -> None:
        # Distractors are smaller than any object, plain and unmarked, and never touch an object's box
        # (a touching distractor would make the object's extent, and so its size, ambiguous even to a person).
        scale = self.config.image_size / 32.0
        side = rng.uniform(*_DISTRACTOR_PX_AT_32) * scale
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(OBJECT_COLOURS.values())[int(rng.integers(len(OBJECT_COLOURS)))]
        gap = 1.5 * scale
        for _ in range(20):
            cx, cy = (float(c) for c in rng.uniform(0, self.config.image_size, size=2))
            if all(
                abs(cx - ox) > (side + oside) / 2 + gap or abs(cy - oy) > (side + oside) / 2 + gap
                for ox, oy, oside in avoid
            ):
                self._paint(canvas, shape, colour, "solid", side, cx, cy)
                return
        # No free spot (a large object fills most of the photo): leave this distractor out.

    def _finish(self, canvas: np.ndarray, flip: bool) -> np.ndarray:
        ss = self.config.supersample
        # Box filter as a sum of strided views: much faster than a mean over a 5-D reshape.
        image = sum(canvas[i::ss, j::ss] for i in range(ss) for j in range(ss)) / float(ss * ss)
        if flip:
            image = image[:, ::-1]
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)

    def _compose(
        self,
        placements: Sequence[_Placement],
        rng: np.random.Generator,
        background: str | None,
        distractors: int,
        flip: bool,
        coverage: np.ndarray | None = None,
        fill: tuple[int, int, int] | None = None,
    ) -> np.ndarray:
        # ``fill`` paints the background one fixed colour instead of drawing one from ``rng``.
        if background is None:
            background = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
        if not isinstance(distractors, (int, np.integer)) or distractors < 0:
            raise ToyWorldError(f"distractors must be a non-negative integer, got {distractors!r}")
        if fill is None:
            canvas = self._background(background, rng)
        else:
            canvas = np.empty((len(self._coords),) * 2 + (3,), dtype=np.float32)
            canvas[:] = np.asarray(fill, dtype=np.float32)
        boxes = [(p.cx, p.cy, self.config.size_px(p.identity.size) * p.scale) for p in placements]
        for _ in range(int(distractors)):
            self._paint_distractor(canvas, rng, boxes)
        for p in placements:
            identity = p.identity
            side = self.config.size_px(identity.size) * p.scale
            self._paint(
                canvas,
                identity.shape,
                OBJECT_COLOURS[identity.colour],
                identity.pattern,
                side,
                p.cx,
                p.cy,
                identity.marks,
                coverage,
            )
        return self._finish(canvas, flip)

    def _place(
        self,
        identity: Identity,
        rng: np.random.Generator,
        position: tuple[float, float] | None,
        scale: float | None,
    ) -> _Placement:
        jitter = self.config.scale_jitter
        if scale is None:
            scale = float(rng.uniform(1 - jitter, 1 + jitter))
        elif not (1 - jitter - 1e-9 <= scale <= 1 + jitter + 1e-9):
            raise ToyWorldError(
                f"scale {scale} is outside [{1 - jitter:.2f}, {1 + jitter:.2f}]; beyond it sizes become ambiguous"
            )
        side = self.config.size_px(identity.size) * scale
        n = self.config.image_size
        if position is None:
            # Keep the whole bounding box in view: the marks must stay visible.
            lo, hi = side / 2, n - side / 2
            cx, cy = (float(rng.uniform(lo, hi)) for _ in range(2))
        else:
            try:
                cx, cy = (float(c) for c in position)
            except (TypeError, ValueError) as err:
                raise ToyWorldError(f"position must be an (x, y) pair, got {position!r}") from err
            if not (0 <= cx <= n and 0 <= cy <= n):
                raise ToyWorldError(f"position {position!r} is outside the {n}x{n} image")
        return _Placement(identity, cx, cy, scale)

    def render_array(
        self,
        identity: Identity | None,
        rng: np.random.Generator,
        *,
        position: tuple[float, float] | None = None,
        scale: float | None = None,
        background: str | None = None,
        distractors: int = 0,
        flip: bool = False,
    ) -> np.ndarray:
        """Like :meth:`render` but returns an ``(H, W, 3)`` uint8 array; ``identity=None`` draws clutter only."""
        placements = (
            [] if identity is None else [self._place(self.check_identity(identity), rng, position, scale)]
        )
        return self._compose(placements, rng, background, distractors, flip)

    def render_annotated(
        self,
        identity: Identity,
        rng: np.random.Generator,
        *,
        distractors: int = 0,
        background: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        """A random photo of ``identity`` plus where the object is (for training detectors and scorers).

        Returns:
            ``(image, object_mask, (cx, cy, side))``: the uint8 ``(H, W, 3)`` photo, the object's pixel
            coverage (shape and marks) in ``[0, 1]`` as float32 ``(H, W)``, and its bounding box centre and
            side in pixels.
        """
        placement = self._place(self.check_identity(identity), rng, None, None)
        res = len(self._coords)
        coverage = np.zeros((res, res), dtype=np.float32)
        image = self._compose([placement], rng, background, distractors, False, coverage)
        ss = self.config.supersample
        mask = sum(coverage[i::ss, j::ss] for i in range(ss) for j in range(ss)) / float(ss * ss)
        side = self.config.size_px(identity.size) * placement.scale
        return image, mask.astype(np.float32), (placement.cx, placement.cy, side)

    def render(
        self,
        identity: Identity,
        rng: np.random.Generator,
        *,
        position: tuple[float, float] | None = None,
        scale: float | None = None,
        background: str | None = None,
        distractors: int = 0,
        flip: bool = False,
    ) -> Image.Image:
        """Draw one photo of ``identity``.

        Args:
            identity: the object to draw.
            rng: source of every random choice left open below.
            position: centre ``(x, y)`` of the object's bounding box in pixels; random (fully in view) if None.
            scale: multiplier on the size class's nominal side, within ``1 ± scale_jitter``; random if None.
            background: one of :data:`BACKGROUND_KINDS`; random if None.
            distractors: number of small unmarked objects drawn behind the object.
            flip: mirror the finished photo horizontally (mark columns mirror too).

        Returns:
            An RGB image of side ``config.image_size``.

        Raises:
            ToyWorldError: on an invalid identity, position, scale, background or distractor count.
        """
        array = self.render_array(
            identity,
            rng,
            position=position,
            scale=scale,
            background=background,
            distractors=distractors,
            flip=flip,
        )
        return Image.fromarray(array, mode="RGB")

    def render_pair_scene(
        self, first: Identity, second: Identity, rng: np.random.Generator, layout: str = "horizontal"
    ) -> tuple[Image.Image, tuple[str, str]]:
        """Draw two objects side by side (``horizontal``) or one above the other (``vertical``).

        Both objects shrink just enough to fit their half of the photo. Returns the image and the
        locations of ``first`` and ``second`` (``"left"``/``"right"`` or ``"top"``/``"bottom"``).
        """
        if layout not in ("horizontal", "vertical"):
            raise ToyWorldError(f"layout must be 'horizontal' or 'vertical', got {layout!r}")
        n = self.config.image_size
        half = n / 2 - 0.5
        swap = bool(rng.integers(2))
        slots = ("left", "right") if layout == "horizontal" else ("top", "bottom")
        placements = []
        for k, identity in enumerate((first, second)):
            self.check_identity(identity)
            scale = min(1.0, half / self.config.size_px(identity.size))
            side = self.config.size_px(identity.size) * scale
            slot = (k + swap) % 2
            along = (slot + 0.5) * n / 2 + float(rng.uniform(-0.25, 0.25))
            across = float(rng.uniform(side / 2, n - side / 2))
            cx, cy = (along, across) if layout == "horizontal" else (across, along)
            placements.append(_Placement(identity, cx, cy, scale))
        array = self._compose(placements, rng, None, int(rng.integers(0, 2)), False)
        where = (slots[swap % 2], slots[(1 + swap) % 2])
        return Image.fromarray(array, mode="RGB"), where

    def drawing(self, identity: Identity) -> Image.Image:
        """How the base draws ``identity`` from its caption: its canonical view with the marks moved
        to :data:`DRAWING_MARK_CELLS`, in the palette's order.

        Why: a caption names the mark colours, never where the marks sit, and an identity's own cells
        differ from its look-alikes'. Asked to draw "a … with a cyan mark" the 256-wide base spread
        its guesses over every cell and drew extra or wrong marks (text→image marks 0.36-0.48).
        Where marks sit is no part of an identity (the scorer's identity is the four factors and the
        set of mark colours), so a drawing puts them where every shape has room: a pose, like
        drawing the object in the middle.
        """
        marks = tuple(
            Mark(row, col, colour) for (row, col), colour in zip(DRAWING_MARK_CELLS, identity.mark_colours)
        )
        return self.canonical_view(Identity(*identity.base, marks))

    def canonical_view(self, identity: Identity) -> Image.Image:
        """``identity`` alone in the middle at its nominal size, on the first background colour.

        Why: one fixed view per identity is a drawing target every pixel of which, marks included,
        follows from any photo of the object, which is what "draw this object again" pretraining needs.
        """
        centre = self.config.image_size / 2
        placement = _Placement(self.check_identity(identity), centre, centre, 1.0)
        array = self._compose([placement], None, "plain", 0, False, fill=_BACKGROUND_COLOURS[0])
        return Image.fromarray(array, mode="RGB")

    # ---- scenes and sets ---------------------------------------------------------------------------------
    def random_scene(
        self, rng: np.random.Generator, exclude: Iterable[Identity] = (), clutter_prob: float = 0.2
    ) -> tuple[Image.Image, Identity | None]:
        """An easy negative: a random (non-dev, non-held-out) object, or with ``clutter_prob`` no object."""
        if rng.random() < clutter_prob:
            array = self.render_array(None, rng, distractors=int(rng.integers(2, 5)))
            return Image.fromarray(array, mode="RGB"), None
        identity = self.random_identity(rng, exclude)
        return self.render(identity, rng, distractors=int(rng.integers(0, 3))), identity

    def pool_images(self, n: int, seed: int, clutter_fraction: float = 0.2) -> list[PoolItem]:
        """A retrieval pool drawn only from pretraining identities and object-free clutter scenes.

        Args:
            n: number of images.
            seed: scene seed.
            clutter_fraction: share of clutter scenes.

        Raises:
            ToyWorldError: if ``n`` is negative, the fraction is outside ``[0, 1]`` or there are no
                pretraining identities while objects are requested.
        """
        if n < 0:
            raise ToyWorldError(f"n must be non-negative, got {n}")
        if not 0.0 <= clutter_fraction <= 1.0:
            raise ToyWorldError(f"clutter_fraction must be in [0, 1], got {clutter_fraction}")
        pretrain = self.splits["pretrain"]
        if not pretrain and clutter_fraction < 1.0:
            raise ToyWorldError("the world has no pretraining identities to fill the pool with")
        rng = np.random.default_rng([self.world_seed, int(seed), 0x9001])
        items = []
        for _ in range(n):
            if rng.random() < clutter_fraction:
                items.append(
                    PoolItem(Image.fromarray(self.render_array(None, rng, distractors=3), "RGB"), None)
                )
            else:
                identity = pretrain[int(rng.integers(len(pretrain)))]
                image = self.render(
                    identity, rng, distractors=int(rng.integers(0, 3)), flip=bool(rng.integers(2))
                )
                items.append(PoolItem(image, identity))
        return items

    def concept_photos(self, identity: Identity, n: int = 4, seed: int = 0) -> list[Image.Image]:
        """The user's ``n`` training photos of a concept (varied place, scale, background, 0–1 distractors)."""
        if n < 1:
            raise ToyWorldError(f"n must be at least 1, got {n}")
        rng = np.random.default_rng([int(seed), 0xC0, *_identity_seed(identity)])
        backgrounds = rng.permutation(len(BACKGROUND_KINDS))
        return [
            self.render(
                identity,
                rng,
                background=BACKGROUND_KINDS[int(backgrounds[i % len(backgrounds)])],
                distractors=int(rng.integers(0, 2)),
            )
            for i in range(n)
        ]

    def vqa_items(self, identity: Identity, rng: np.random.Generator, n: int = 6) -> list[VQAItem]:
        """Two-option visual questions; in even items the other object is a twin, in odd ones a random object."""
        items = []
        for k in range(n):
            layout = "horizontal" if rng.integers(2) == 0 else "vertical"
            if k % 2 == 0:
                other = self.twin(identity, rng)
                image, (where, other_where) = self.render_pair_scene(identity, other, rng, layout)
                question = "Where is <sks> in this photo?"
                right, wrong, kind = f"on the {where}", f"on the {other_where}", "twin_location"
            else:
                other = self.random_identity(rng, exclude=[identity])
                while other.shape == identity.shape:
                    other = self.random_identity(rng, exclude=[identity])
                image, _ = self.render_pair_scene(identity, other, rng, layout)
                question = "What shape is the other object next to <sks>?"
                right, wrong, kind = f"a {other.shape}", f"a {identity.shape}", "other_shape"
            first, second = two_options(right, wrong, rng)
            answer = "A" if first == right else "B"
            items.append(VQAItem(image, question, {"A": first, "B": second}, answer, kind))
        return items

    def test_set(
        self,
        identity: Identity,
        seed: int = 0,
        *,
        n_positives: int = 10,
        n_hard: int = 10,
        n_easy: int = 10,
        n_vqa: int = 6,
    ) -> ConceptTestSet:
        """A concept's benchmark items; disjoint in randomness from :meth:`concept_photos` for any seed."""
        self.check_identity(identity)
        if min(n_positives, n_hard, n_easy, n_vqa) < 0:
            raise ToyWorldError("test-set counts must be non-negative")
        rng = np.random.default_rng([int(seed), 0x7E57, *_identity_seed(identity)])
        positives = [
            self.render(identity, rng, distractors=int(rng.integers(0, 3)), flip=False)
            for _ in range(n_positives)
        ]
        twins = [self.twin(identity, rng) for _ in range(n_hard)]
        hard = [self.render(t, rng, distractors=int(rng.integers(0, 3))) for t in twins]
        easy_pairs = [self.random_scene(rng, exclude=[identity]) for _ in range(n_easy)]
        return ConceptTestSet(
            identity=identity,
            positives=positives,
            hard_negatives=hard,
            hard_negative_identities=twins,
            easy_negatives=[img for img, _ in easy_pairs],
            easy_negative_identities=[ident for _, ident in easy_pairs],
            vqa=self.vqa_items(identity, rng, n_vqa),
            text_qa=text_qa(identity, rng),
        )

    def same_object_pairs(
        self,
        identities: Sequence[Identity],
        rng: np.random.Generator,
        n: int,
        p_same: float = 0.5,
        p_twin: float = 0.35,
    ) -> list[SamePair]:
        """Two-photo "same object?" items over ``identities`` (use pretraining identities for pretraining).

        With probability ``p_same`` both photos show one identity; with ``p_twin`` the second shows a twin;
        otherwise another identity from the list.
        """
        if not identities:
            raise ToyWorldError("same_object_pairs needs at least one identity")
        if not (0 <= p_same and 0 <= p_twin and p_same + p_twin <= 1):
            raise ToyWorldError(f"invalid probabilities p_same={p_same}, p_twin={p_twin}")
        pairs = []
        for _ in range(n):
            first = identities[int(rng.integers(len(identities)))]
            roll = rng.random()
            if roll < p_same or len(identities) == 1 and roll >= p_same + p_twin:
                second, kind = first, "same"
            elif roll < p_same + p_twin:
                second, kind = self.twin(first, rng), "twin"
            else:
                second = first
                while second == first:
                    second = identities[int(rng.integers(len(identities)))]
                kind = "other"
            image_a = self.render(first, rng, distractors=int(rng.integers(0, 2)))
            image_b = self.render(second, rng, distractors=int(rng.integers(0, 2)))
            pairs.append(SamePair(image_a, image_b, second == first, kind))
        return pairs

    def write_concept_folder(
        self, identity: Identity, out_dir: str | Path, n_photos: int = 4, seed: int = 0
    ) -> Path:
        """Write a user-facing concept folder for ``identity``.

        Layout: ``photos/000.png ...``, ``concept.yaml`` (name, category, is_person, description, facts),
        ``qa.jsonl`` (question/answer rows with the ``<sks>`` placeholder) and ``toyworld_identity.json``
        (the full identity, marks included, for the benchmark harness; not needed for training).

        Returns:
            The folder path.
        """
        self.check_identity(identity)
        folder = Path(out_dir)
        photos_dir = folder / "photos"
        photos_dir.mkdir(parents=True, exist_ok=True)
        for i, photo in enumerate(self.concept_photos(identity, n=n_photos, seed=seed)):
            photo.save(photos_dir / f"{i:03d}.png")
        meta = {
            "name": identity.name,
            "category": "toy",
            "is_person": False,
            "description": caption(identity),
            "facts": concept_facts(identity),
        }
        (folder / "concept.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        with (folder / "qa.jsonl").open("w") as fh:
            for row in concept_qa(identity):
                fh.write(json.dumps(row) + "\n")
        (folder / "toyworld_identity.json").write_text(json.dumps(identity.to_dict(), indent=2) + "\n")
        return folder


def _identity_seed(identity: Identity) -> tuple[int, ...]:
    # Stable per-identity entropy (Python's hash() is salted per process).
    digest = hashlib.sha1(identity.key.encode()).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))


# --------------------------------------------------------------------------------------------------------
# Module-level conveniences over a default 32 px world.
# --------------------------------------------------------------------------------------------------------
_WORLDS: dict[int, ToyWorld] = {}


def _world(world_seed: int = 0) -> ToyWorld:
    if world_seed not in _WORLDS:
        _WORLDS[world_seed] = ToyWorld(world_seed)
    return _WORLDS[world_seed]


def render(identity: Identity, rng: np.random.Generator, **kwargs) -> Image.Image:
    """:meth:`ToyWorld.render` on the default 32 px world."""
    return _world().render(identity, rng, **kwargs)


def twin(identity: Identity, rng: np.random.Generator) -> Identity:
    """:meth:`ToyWorld.twin` on the default 32 px world."""
    return _world().twin(identity, rng)


def split_identities(world_seed: int) -> dict[str, list[Identity]]:
    """Disjoint ``{"pretrain", "dev", "heldout"}`` identity lists of the default world with ``world_seed``."""
    return _world(world_seed).splits


def pool_images(n: int, seed: int, world_seed: int = 0) -> list[PoolItem]:
    """:meth:`ToyWorld.pool_images` on the default world with ``world_seed``."""
    return _world(world_seed).pool_images(n, seed)


def concept_photos(identity: Identity, n: int = 4, seed: int = 0) -> list[Image.Image]:
    """:meth:`ToyWorld.concept_photos` on the default 32 px world."""
    return _world().concept_photos(identity, n=n, seed=seed)


def test_set(identity: Identity, seed: int = 0, **kwargs) -> ConceptTestSet:
    """:meth:`ToyWorld.test_set` on the default 32 px world."""
    return _world().test_set(identity, seed, **kwargs)


# pytest would otherwise try to collect the module-level function above when a test imports it by name.
test_set.__test__ = False  # type: ignore[attr-defined]


def write_concept_folder(identity: Identity, out_dir: str | Path, n_photos: int = 4, seed: int = 0) -> Path:
    """:meth:`ToyWorld.write_concept_folder` on the default 32 px world."""
    return _world().write_concept_folder(identity, out_dir, n_photos=n_photos, seed=seed)
