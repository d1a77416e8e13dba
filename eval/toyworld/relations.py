"""``yochameleon toyworld relations``: do two concepts learn what relates them? (issue 28).

Pairs of identities ``(A, B)`` are drawn from a split of world 0 (held-out by default; ``--split dev`` for
tuning), each with a third identity ``C`` from the same split, the *distractor*. Per pair and seed:

* **Facts.** A relation from :data:`RELATION_CHOICES` (chosen by the seed), ``"<A> is the brother of <B>."``,
  and facts no photo shows: each of A, B and C belongs to a team (:data:`TEAMS`; distinct teams, never the
  concept's own colour, so the object's look cannot answer the question). They go into the concepts'
  ``concept.yaml`` (the relation and A's team in A's folder, B's team in B's, C's in C's); the user
  description stays the plain caption, as in the benchmark. Concept folders come from
  :meth:`~.world.ToyWorld.write_concept_folder`, training data from
  :func:`~yochameleon.data.pipeline.prepare_concept` over the benchmark's pool and index
  (:func:`~.bench.prepare_pool`), training from ``recipes/toyworld-bench.yaml``.
* **Cases.**

  - ``joint``: A and B trained in one run (``concept.extra``); A's relation records train with the rest.
  - ``apart``: A and B each trained alone (``concept.relations=later``), then
    :func:`~yochameleon.train.relate.relate_concepts` learns the relation on both files.
  - ``text_prompt``: the base model with every attached concept's definition, worded as the benchmark's
    text baseline words it (:func:`~yochameleon.baselines.prompting.definition`, plain names ``sks``,
    ``qvo``, ``zub`` for A, B, C), then the same facts in words, in the preamble.

  C is trained alone once per pair and seed; both trained cases attach that same file as the distractor.
  Trained concepts are asked through :class:`~yochameleon.infer.PersonalizedModel` (answers with the
  u-tokens forced, ``related=True``: a question about A carries B's prompt too, as a user gets it).
* **Metrics**, one value per pair and seed (the unit the 95% bootstrap CIs resample):

  - ``relation_mc``: with A, B and C attached, "Who is <B>'s brother? <A> or <C>?" and the inverse
    "Who is <A>'s sibling? <B> or <C>?", each with the options in both orders (four questions). Correct
    when the answer names exactly one of the two options and it is the right one
    (:func:`~yochameleon.eval.metrics.score_choice`; concepts are named ``<NAME>`` in trained answers and
    by their plain name in the text baseline's).
  - ``relation_open``: the two questions without options, as relation records train them ("Who is
    <B>'s brother?" → "<A> is <B>'s brother."). Correct when the *first* of A, B and C that the answer
    names is the right one (an answer naming none is wrong). For trained concepts C cannot be named here:
    a prompt masks attached concepts it neither names nor relates, so this is A against B; the text
    baseline can name any of the three.
  - ``team_fact``: with A, B and C attached, "Which team does <A> belong to? blue, red, green or yellow?"
    (options in a seeded order) and the same for B, scored by option text
    (:func:`~yochameleon.eval.metrics.score_choice`). Training asked the fact only as
    :func:`~yochameleon.data.qa.facts_to_qa` does (a paraphrase of "What do you know about <sks>?" that
    other facts share, and the fact's own question "What does <sks> belong to?" → "<sks> belongs to
    the blue team."), so this is also a rephrasing test; ``team_recall`` asks the fact's own trained
    question (:func:`trained_fact_question`) and is right when the answer names exactly one team, the
    right one.
  - recognition (weighted, as the benchmark scores it: Yes-vs-No likelihood on the concept's
    :meth:`~.world.ToyWorld.test_set` positives, twins and random scenes), the mean of A's and B's:
    ``recognition_alone`` (only that concept attached), ``recognition_both`` (A and B attached; trained
    concepts get exactly their alone logits, by the design of attached-concept masking, so a drop is a
    bug) and ``recognition_related`` (A and B attached, the question laid out as a related question is:
    both personalized prompts in the preamble). The text baseline has one layout for both: every
    attached definition and fact in the preamble. ``recognition_drop`` and ``recognition_drop_related``
    are alone minus each. ``apart`` also reports ``recognition_before_relate`` (the files before the
    joint step, alone).
  - two-concept generation: "A photo of <A> next to <B>." (each concept's g-tokens forced in turn).
    The toy world's scorer reads **one object per image** (its segmenter votes for a single box), so no
    image can be scored as showing both. ``gen_a`` / ``gen_b`` are the rates of images the scorer reads
    as A's / B's identity (four factors and mark colours), ``gen_either`` the rate of either.

The summary JSON holds per case the mean and 95% CI of every metric, paired differences ``joint − case``
over the shared (pair, seed) units, every unit's record (questions, answers, files) and the timings; a
markdown table (``OUT.md``) and a contact sheet (``OUT_contact.png``: per case and unit a row of two
photos of A, two of B, then the generated images) go beside it.

Example:
    >>> config = RelationsConfig.create(quick=True)
    >>> summary = run_relations(config, "outputs/relations/quick.json")
    >>> sorted(summary["cases"])
    ['apart', 'joint', 'text_prompt']
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml

from yochameleon.baselines.base import Method, Prompted
from yochameleon.baselines.prompting import PLAIN_NAME, definition

from .bench import (
    BENCH_RECIPE,
    BenchError,
    RecipeRun,
    _positive_int,
    check_artifacts,
    draw_concepts,
)
from .build import default_out_dir, recorded_path
from .world import Identity, ToyWorld, WorldConfig, caption

__all__ = [
    "CASES",
    "METRICS",
    "PLAIN_NAMES",
    "QUICK_DEFAULTS",
    "RELATION_CHOICES",
    "TEAMS",
    "Pair",
    "Question",
    "RelationsConfig",
    "draw_pairs",
    "first_named",
    "markdown_relations",
    "pair_questions",
    "run_relations",
    "score_answer",
    "summarize_relations",
    "write_pair_folders",
]

CASES: tuple[str, ...] = ("joint", "apart", "text_prompt")
REFERENCE = "joint"
# Kin relations only: a place relation ("next to") would be what the two-concept image prompt asks for.
RELATION_CHOICES: tuple[str, ...] = ("brother", "sister", "mother", "father", "son", "daughter", "friend")
# Colour words, which the toy base knows as single tokens; a concept never gets its own colour's team.
TEAMS: tuple[str, ...] = ("blue", "red", "green", "yellow")
# How the text baseline calls A, B and C (the benchmark's text baseline calls its one concept "sks").
PLAIN_NAMES: tuple[str, str, str] = (PLAIN_NAME, "qvo", "zub")
GENERATION_PROMPT = "A photo of {a} next to {b}."
METRICS: tuple[str, ...] = (
    "relation_mc",
    "relation_open",
    "team_fact",
    "team_recall",
    "recognition_alone",
    "recognition_both",
    "recognition_related",
    "recognition_drop",
    "recognition_drop_related",
    "recognition_before_relate",
    "gen_a",
    "gen_b",
    "gen_either",
)
# --quick: one pair, one seed, one epoch, a short joint step and small test sets (about 3 minutes).
QUICK_DEFAULTS: dict[str, Any] = {
    "n_pairs": 1,
    "seeds": 1,
    "pool_size": 1000,
    "relate_steps": 20,
    "n_positives": 4,
    "n_hard": 4,
    "n_easy": 4,
    "n_generated": 2,
    "overrides": ("optim.epochs=1",),
}
_NAME = re.compile(r"<([^<>\s/\\]+)>")


@dataclass(frozen=True)
class RelationsConfig(RecipeRun):
    """Everything one measurement does; the summary JSON records it.

    Attributes:
        artifacts: the toy-world artifacts folder (``base/``, ``embedder/``, ``scorer.*``).
        split: ``heldout`` for reported numbers, ``dev`` for tuning.
        n_pairs: pairs (each with its distractor: three identities) drawn from ``split`` by ``pair_seed``.
        pair_seed: chooses the identities.
        seeds: seeds ``0 .. seeds-1`` per pair (relation, teams, training, test sets, option order, images).
        world_seed: the world the base was pretrained around (0 for the committed base).
        n_photos: training photos per concept.
        n_positives, n_hard, n_easy: recognition test photos per concept and seed.
        n_generated: two-concept images per case, pair and seed.
        pool_size, pool_seed: the retrieval pool (as the benchmark's; its pool is reused when it matches).
        recipe: the training recipe (the benchmark's).
        overrides: ``key=value`` overrides of the recipe.
        relate_steps: optimizer steps of the ``apart`` case's joint relation step.
        relations: the vocabulary relations a pair's relation is drawn from.
        n_boot: bootstrap resamples of every CI.
        threads: torch CPU threads.
        quick: asked for with ``--quick`` (recorded; :meth:`create` applies its sizes).

    Raises:
        BenchError: (in ``__post_init__``) a non-positive size, an unknown split or relation, more
            identities than the split holds, or no recipe file.
        ConfigError: the recipe or an override does not make a valid training config.
    """

    artifacts: str = str(default_out_dir())
    split: str = "heldout"
    n_pairs: int = 4
    pair_seed: int = 0
    seeds: int = 2
    world_seed: int = 0
    n_photos: int = 4
    n_positives: int = 10
    n_hard: int = 10
    n_easy: int = 10
    n_generated: int = 4
    pool_size: int = 10000
    pool_seed: int = 1
    recipe: str = str(BENCH_RECIPE)
    overrides: tuple[str, ...] = field(default_factory=tuple)
    relate_steps: int = 300
    relations: tuple[str, ...] = RELATION_CHOICES
    n_boot: int = 2000
    threads: int = 1
    quick: bool = False

    QUICK: ClassVar[dict[str, Any]] = QUICK_DEFAULTS
    KIND: ClassVar[str] = "relations"

    def __post_init__(self) -> None:
        from yochameleon.relations import RELATIONS

        # Lists from JSON or argparse become tuples so the frozen config stays hashable.
        for name in ("artifacts", "recipe"):
            object.__setattr__(self, name, recorded_path(getattr(self, name)))
        for name in ("overrides", "relations"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("n_pairs", "seeds", "n_positives", "n_generated", "relate_steps", "n_boot", "threads"):
            _positive_int(name, getattr(self, name))
        for name in ("pair_seed", "world_seed", "n_hard", "n_easy", "pool_seed"):
            _positive_int(name, getattr(self, name), minimum=0)
        _positive_int("pool_size", self.pool_size, minimum=50)
        if self.n_photos < 3:
            raise BenchError(f"a concept folder needs at least 3 photos, got n_photos={self.n_photos}")
        if self.n_hard + self.n_easy < 1:
            raise BenchError("recognition needs negatives: n_hard + n_easy must be at least 1")
        if self.split not in ("heldout", "dev"):
            raise BenchError(f"split must be heldout or dev, got {self.split!r}")
        unknown = [r for r in self.relations if r not in RELATIONS]
        if not self.relations or unknown:
            raise BenchError(
                f"relations must name vocabulary relations ({', '.join(RELATIONS)}), got {unknown}"
            )
        world = WorldConfig()
        available = world.n_heldout if self.split == "heldout" else world.n_dev
        if 3 * self.n_pairs > available:
            raise BenchError(
                f"each pair takes three {self.split} identities (A, B and a distractor); the split has "
                f"{available}, so at most {available // 3} pairs, not {self.n_pairs}"
            )
        if not Path(self.recipe).is_file():
            raise BenchError(f"recipe {self.recipe} does not exist")
        self.train_config(0)  # a bad recipe or override fails now, not after the pool is indexed


# ---- pairs, facts and questions ----------------------------------------------------------------------
def _tag(name: str) -> str:
    return f"<{name}>"


@dataclass(frozen=True)
class Pair:
    """One measured unit: a pair ``(a, b)``, its distractor, the relation and teams one seed chose.

    Attributes:
        index: the pair's place in the draw.
        seed: the seed (relation, teams, training, tests).
        a, b: the related identities (``a`` is ``b``'s ``relation``).
        distractor: a third identity of the split, attached as the wrong option.
        relation: a vocabulary relation (``brother``).
        teams: the teams of ``a``, ``b`` and ``distractor``.
    """

    index: int
    seed: int
    a: Identity
    b: Identity
    distractor: Identity
    relation: str
    teams: tuple[str, str, str]

    @property
    def identities(self) -> tuple[Identity, Identity, Identity]:
        """``(a, b, distractor)``."""
        return (self.a, self.b, self.distractor)

    @property
    def names(self) -> tuple[str, str, str]:
        """The concept names of ``a``, ``b`` and ``distractor``."""
        return tuple(i.name for i in self.identities)  # type: ignore[return-value]

    @property
    def key(self) -> str:
        """``pair{index}/seed{seed}``, the unit's folder and label."""
        return f"pair{self.index}/seed{self.seed}"

    def relation_fact(self) -> str:
        """``"<A> is the brother of <B>."``, worded as the relation vocabulary states it."""
        from yochameleon.relations import RELATIONS

        return RELATIONS[self.relation].render("statement", _tag(self.a.name), _tag(self.b.name))

    def team_fact(self, k: int) -> str:
        """``"<X> belongs to the blue team."`` for identity ``k`` (0 a, 1 b, 2 distractor)."""
        return f"{_tag(self.names[k])} belongs to the {self.teams[k]} team."

    def folder_facts(self) -> dict[str, list[str]]:
        """The facts each concept's ``concept.yaml`` gains: the relation goes in A's folder only."""
        a, b, c = self.names
        return {a: [self.relation_fact(), self.team_fact(0)], b: [self.team_fact(1)], c: [self.team_fact(2)]}

    def to_dict(self) -> dict[str, Any]:
        """JSON form (identities with their captions)."""
        return {
            "pair": self.index,
            "seed": self.seed,
            "relation": self.relation,
            "relation_fact": self.relation_fact(),
            "concepts": {
                role: {"name": ident.name, "caption": caption(ident), "team": team, **ident.to_dict()}
                for role, ident, team in zip(("a", "b", "distractor"), self.identities, self.teams)
            },
        }


def _teams(identities: Sequence[Identity], rng: np.random.Generator) -> tuple[str, str, str]:
    # Distinct teams, none the identity's own colour (four teams, three concepts: always possible).
    valid = [t for t in itertools.permutations(TEAMS, 3) if all(c != i.colour for c, i in zip(t, identities))]
    return valid[int(rng.integers(len(valid)))]


def draw_pairs(
    n_pairs: int,
    pair_seed: int,
    seeds: Sequence[int],
    split: str = "heldout",
    world: ToyWorld | None = None,
    relations: Sequence[str] = RELATION_CHOICES,
) -> list[Pair]:
    """The measured units: ``n_pairs`` triples ``(a, b, distractor)`` of ``split``, each with every seed.

    Identities come from :func:`~.bench.draw_concepts` (a seeded permutation of the split, never a
    pretraining identity), three per pair; a seed chooses the relation and the teams.

    Raises:
        BenchError: an unknown split, or more identities than the split holds.
    """
    world = world or ToyWorld(0)
    drawn = draw_concepts(3 * n_pairs, pair_seed, split, world)
    units = []
    for index in range(n_pairs):
        a, b, c = drawn[3 * index : 3 * index + 3]
        for seed in seeds:
            rng = np.random.default_rng([world.world_seed, int(pair_seed), index, int(seed), 0x2E1A])
            relation = relations[int(rng.integers(len(relations)))]
            units.append(Pair(index, int(seed), a, b, c, relation, _teams((a, b, c), rng)))
    return units


def write_pair_folders(world: ToyWorld, pair: Pair, root: str | Path, n_photos: int = 4) -> dict[str, Path]:
    """Write the concept folders of ``pair`` (a, b, distractor) under ``root`` with the pair's facts added.

    Each folder is :meth:`~.world.ToyWorld.write_concept_folder`'s (photos drawn with seed 0, as the
    benchmark draws them); ``concept.yaml`` gains :meth:`Pair.folder_facts`, its description stays the
    plain caption.

    Returns:
        ``{name: folder}``.
    """
    folders = {}
    extra = pair.folder_facts()
    for identity in pair.identities:
        folder = world.write_concept_folder(identity, Path(root) / identity.name, n_photos=n_photos, seed=0)
        meta = yaml.safe_load((folder / "concept.yaml").read_text())
        meta["facts"] = [*meta.get("facts", []), *extra[identity.name]]
        (folder / "concept.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        folders[identity.name] = folder
    return folders


@dataclass(frozen=True)
class Question:
    """One question of a unit, naming concepts as ``<NAME>``.

    Attributes:
        kind: ``relation_mc``, ``relation_open``, ``team_fact`` or ``team_recall``.
        text: what is asked (multiple-choice options already listed in it, in a seeded order).
        options: the option texts of a multiple-choice question; for an open question, every concept
            whose mention counts (see :func:`score_answer`).
        correct: the right option (a ``<NAME>`` or a team).
    """

    kind: str
    text: str
    options: tuple[str, ...]
    correct: str


def trained_fact_question(pair: Pair, k: int) -> str:
    """The question concept ``k``'s team fact alone was trained with (``"What does <X> belong to?"``).

    :func:`~yochameleon.data.qa.facts_to_qa` asks every ordinary fact with a shared paraphrase of
    "What do you know about <sks>?" and a fact with a known verb also with its own question
    (:func:`~yochameleon.data.qa.fact_question`); only the latter has one right answer.
    """
    from yochameleon.data.qa import fact_question

    question = fact_question(f"<sks> belongs to the {pair.teams[k]} team.")
    assert question is not None  # "belongs to" is a listed verb
    return question.replace("<sks>", _tag(pair.names[k]))


def pair_questions(pair: Pair) -> list[Question]:
    """The relation (both directions, with and without options) and team questions of a unit.

    The relation questions are the vocabulary's own ("Who is <B>'s brother?", and through the inverse
    "Who is <A>'s sibling?"); the multiple-choice ones offer the right concept and the distractor, in
    both orders (no answer is helped by its position). The team is asked as a multiple-choice
    question (options in a seeded order) and, as ``team_recall``, with the question its fact was
    trained with (:func:`trained_fact_question`), right when the answer names exactly one team, the
    right one.
    """
    from yochameleon.eval.metrics import mc_prompt, shuffle_options
    from yochameleon.relations import RELATIONS

    a, b, c = map(_tag, pair.names)
    rel = RELATIONS[pair.relation]
    inverse = RELATIONS[rel.inverse]
    asked = [(rel.render("question", a, b), a), (inverse.render("question", b, a), b)]
    questions = []
    for text, right in asked:
        for options in ((right, c), (c, right)):
            mc = {"question": text, "options": list(options)}
            questions.append(Question("relation_mc", mc_prompt(mc), options, right))
    for text, right in asked:
        questions.append(Question("relation_open", text, (a, b, c), right))
    for k, who in ((0, a), (1, b)):
        item = {
            "question": f"Which team does {who} belong to?",
            "options": list(TEAMS),
            "answer": pair.teams[k],
        }
        mc = shuffle_options(item, pair.seed)
        questions.append(Question("team_fact", mc_prompt(mc), tuple(mc["options"]), pair.teams[k]))
    for k in (0, 1):
        questions.append(Question("team_recall", trained_fact_question(pair, k), TEAMS, pair.teams[k]))
    return questions


def render(text: str, names: Mapping[str, str] | None) -> str:
    """``text`` with each ``<NAME>`` in ``names`` written as ``names[NAME]`` (``None``: unchanged)."""
    if names is None:
        return text
    return _NAME.sub(lambda m: names.get(m.group(1), m.group(0)), text)


def first_named(answer: str, candidates: Sequence[str]) -> str | None:
    """The candidate whose first whole-word occurrence in ``answer`` comes first (case-insensitive)."""
    text = " ".join((answer or "").lower().split())
    best: tuple[int, str] | None = None
    for candidate in candidates:
        m = re.search(rf"(?<!\w){re.escape(candidate.lower())}(?!\w)", text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), candidate)
    return best[1] if best else None


def score_answer(question: Question, answer: str, names: Mapping[str, str] | None = None) -> bool:
    """Whether ``answer`` is right; ``names`` maps concept names to how the case writes them (plain names).

    Multiple choice (``relation_mc``, ``team_fact``, ``team_recall``): exactly one option named, the right one
    (:func:`~yochameleon.eval.metrics.score_choice`). ``relation_open``: the first concept the answer
    names is the right one.
    """
    from yochameleon.eval.metrics import score_choice

    options = [render(o, names) for o in question.options]
    correct = render(question.correct, names)
    if question.kind == "relation_open":
        return first_named(answer, options) == correct
    return score_choice(answer, options, correct)


# ---- the cases, as things to ask ---------------------------------------------------------------------
class _Trained:
    """Concept files attached to the shared backend for a ``with`` block, asked as users ask them."""

    names: Mapping[str, str] | None = None  # trained concepts are written <NAME>, as prompts name them

    def __init__(self, backend, files: Sequence[Path]) -> None:
        self.backend = backend
        self.files = list(files)
        self.tokens: dict[str, Any] = {}

    def __enter__(self) -> _Trained:
        from yochameleon.concept import load_concept
        from yochameleon.infer import PersonalizedModel

        try:
            for f in self.files:
                tokens = load_concept(self.backend, f)
                self.tokens[tokens.spec.name] = tokens
        except BaseException:
            self.__exit__()
            raise
        self.model = PersonalizedModel(self.backend)
        return self

    def __exit__(self, *exc: object) -> None:
        from yochameleon.concept import detach

        for name in self.tokens:
            detach(self.backend, name)
        self.tokens = {}

    def yes_no(self, question: str, image) -> tuple[float, float]:
        """:meth:`PersonalizedModel.yes_no_logprobs` (only the named concept's prompt in the preamble)."""
        return self.model.yes_no_logprobs(question, image)

    def yes_no_related(self, question: str, image, name: str) -> tuple[float, float]:
        """Yes/No laid out as a related question is: the prompts of ``name`` and its related concepts."""
        from yochameleon.conversation import image_ids, turn_ids, yes_no_logprobs

        own = self.tokens[name]
        cast = self.model.cast([own])
        preamble = " ".join(c.personalized_prompt() for c in cast)
        text = question.replace(_tag(name), own.sks)
        ids = turn_ids(self.backend, text, cast, [image_ids(self.backend, image)], preamble=preamble)
        return yes_no_logprobs(self.backend, ids + own.u_ids)

    def answer(self, question: str, max_new_tokens: int = 24) -> str:
        """:meth:`PersonalizedModel.ask`, u-tokens forced, related concepts in the preamble."""
        return self.model.ask(question, force_tokens=True, max_new_tokens=max_new_tokens)

    def generate_images(self, prompt: str, n: int, seed: int) -> list:
        """:meth:`PersonalizedModel.generate_image`, every named concept's g-tokens forced in turn."""
        return self.model.generate_image(prompt, n=n, seed=seed, force_tokens=True)


def text_definition(identity: Identity, plain: str) -> str:
    """The benchmark's text-baseline definition of ``identity`` (its user description), under ``plain``."""
    # definition() calls its concept PLAIN_NAME; a caption never contains that word.
    return definition(caption(identity), "").replace(PLAIN_NAME, plain, 1)


class TextPromptPair(Method):
    """``text_prompt`` for several concepts: each attached one's definition, then the facts among them.

    Args:
        backend: the base model.
        pair: the unit.
        attached: the names of the concepts "attached" (defined in the preamble).
    """

    name = "text_prompt"

    def __init__(self, backend, pair: Pair, attached: Sequence[str]) -> None:
        super().__init__(backend)
        self.names = dict(zip(pair.names, PLAIN_NAMES))
        by_name = dict(zip(pair.names, pair.identities))
        facts = [pair.relation_fact()] + [pair.team_fact(k) for k in range(3)]
        named = [f for f in facts if all(n in attached for n in _NAME.findall(f))]
        self.preamble = " ".join(
            [text_definition(by_name[n], self.names[n]) for n in attached]
            + [render(f, self.names) for f in named]
        )

    def __enter__(self) -> TextPromptPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prompt(self, text: str, image=None, task: str = "understanding") -> Prompted:
        return Prompted(self._ids(render(text, self.names), image, preamble=self.preamble))

    def yes_no_related(self, question: str, image, name: str) -> tuple[float, float]:
        """The text baseline has one layout: every attached definition and fact in the preamble."""
        return self.yes_no(question, image)

    def answer(self, question: str, image=None, max_new_tokens: int = 24) -> str:
        return super().answer(question, image, max_new_tokens=max_new_tokens)

    def generate_images(self, request: str, n: int = 1, seed: int = 0, temperature: float = 1.0) -> list:
        return super().generate_images(request, n=n, seed=seed, temperature=temperature)


# ---- scoring one unit --------------------------------------------------------------------------------
def _recognition(yes_no: Callable[[str, Any], tuple[float, float]], name: str, tests) -> float:
    """Weighted recognition of concept ``name`` on its test set, asked as the benchmark's harness asks."""
    from yochameleon.eval.metrics import recognition_scores
    from yochameleon.prompts import recognition_question

    items = (
        [(im, "pos") for im in tests.positives]
        + [(im, "neg_hard") for im in tests.hard_negatives]
        + [(im, "neg_easy") for im in tests.easy_negatives]
    )
    preds = []
    for i, (image, _) in enumerate(items):
        yes, no = yes_no("<image>" + recognition_question(i).replace("<sks>", _tag(name)), image)
        preds.append(yes > no)
    return float(recognition_scores(preds, [label for _, label in items])["recognition_weighted"])


def measure_unit(
    attach: Callable[[Sequence[str]], Any],
    pair: Pair,
    tests: Mapping[str, Any],
    scorer,
    n_generated: int,
    image_dir: Path | None = None,
) -> dict[str, Any]:
    """Every metric of one case on one unit.

    Args:
        attach: ``names -> context manager`` holding those concepts attached (trained files, or
            :class:`TextPromptPair`); it answers ``yes_no``, ``yes_no_related``, ``answer`` and
            ``generate_images`` and writes concepts as its ``names`` map says.
        pair: the unit.
        tests: ``{name: ConceptTestSet}`` of ``a`` and ``b``.
        scorer: the toy world's identity scorer.
        n_generated: two-concept images to draw.
        image_dir: where the images are saved (``00.png``, ...), or ``None``.

    Returns:
        The metrics (see the module docstring) and ``answers``: every question, answer and verdict.
    """
    a, b, c = pair.names
    alone, both, related = [], [], []
    for name in (a, b):
        with attach([name]) as asker:
            alone.append(_recognition(asker.yes_no, name, tests[name]))
    with attach([a, b]) as asker:
        for name in (a, b):
            both.append(_recognition(asker.yes_no, name, tests[name]))
            related.append(
                _recognition(lambda q, im, name=name: asker.yes_no_related(q, im, name), name, tests[name])
            )
    answers = []
    with attach([a, b, c]) as asker:
        for q in pair_questions(pair):
            text = asker.answer(q.text)
            answers.append(
                {
                    "kind": q.kind,
                    "question": render(q.text, asker.names),
                    "answer": text,
                    "correct": score_answer(q, text, asker.names),
                }
            )
        prompt = render(GENERATION_PROMPT.format(a=_tag(a), b=_tag(b)), asker.names)
        images = asker.generate_images(prompt, n=n_generated, seed=pair.seed)
    if image_dir is not None:
        Path(image_dir).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(Path(image_dir) / f"{i:02d}.png")
    found_a = scorer.identity_correct(images, pair.a)
    found_b = scorer.identity_correct(images, pair.b)

    def rate(kind: str) -> float:
        return float(np.mean([x["correct"] for x in answers if x["kind"] == kind]))

    return {
        "relation_mc": rate("relation_mc"),
        "relation_open": rate("relation_open"),
        "team_fact": rate("team_fact"),
        "team_recall": rate("team_recall"),
        "recognition_alone": float(np.mean(alone)),
        "recognition_both": float(np.mean(both)),
        "recognition_related": float(np.mean(related)),
        "recognition_drop": float(np.mean(alone) - np.mean(both)),
        "recognition_drop_related": float(np.mean(alone) - np.mean(related)),
        "recognition_by_concept": {
            n: {"alone": x, "both": y, "related": z} for n, x, y, z in zip((a, b), alone, both, related)
        },
        "gen_a": float(np.mean(found_a)),
        "gen_b": float(np.mean(found_b)),
        "gen_either": float(np.mean([x or y for x, y in zip(found_a, found_b)])),
        "generation_prompt": prompt,
        "answers": answers,
    }


# ---- summary and table -------------------------------------------------------------------------------
def summarize_relations(
    records: Sequence[Mapping[str, Any]], config: Mapping[str, Any] | None = None, n_boot: int = 2000
) -> dict[str, Any]:
    """Per case, the mean and 95% bootstrap CI of every metric over units; paired ``joint − case`` differences.

    Args:
        records: one per case and unit, ``{"case", "pair", "seed", METRIC: value or None, ...}``.
        config: the run's description, stored under ``config``.
        n_boot: bootstrap resamples.

    Returns:
        ``{"benchmark", "cases": {case: {"n", METRIC, METRIC_ci}}, "reference", "differences":
        {case: {METRIC: {"mean", "ci", "n", "crosses_zero"}}}, "per_unit", "config"}``. A CI needs two
        units (``None`` otherwise); so does a difference.

    Raises:
        BenchError: no records, or two records for one case and unit.
    """
    from yochameleon.eval.metrics import bootstrap_ci, paired_bootstrap_diff

    if not records:
        raise BenchError("no results to summarize")
    by_case: dict[str, dict[tuple[int, int], Mapping[str, Any]]] = {}
    for r in records:
        unit = (int(r["pair"]), int(r["seed"]))
        if unit in by_case.setdefault(r["case"], {}):
            raise BenchError(f"two results for case {r['case']!r}, pair {unit[0]}, seed {unit[1]}")
        by_case[r["case"]][unit] = r
    cases: dict[str, dict[str, Any]] = {}
    for case, units in by_case.items():
        stats: dict[str, Any] = {"n": len(units)}
        for metric in METRICS:
            values = [u[metric] for u in units.values() if u.get(metric) is not None]
            stats[metric] = float(np.mean(values)) if values else None
            stats[metric + "_ci"] = list(bootstrap_ci(values, n_boot, 0)) if len(values) > 1 else None
        cases[case] = stats
    differences: dict[str, dict[str, Any]] = {}
    ref = by_case.get(REFERENCE, {})
    for case, units in by_case.items():
        if case == REFERENCE:
            continue
        diffs = {}
        for metric in METRICS:
            pairs = [
                (ref[k][metric], u[metric])
                for k, u in units.items()
                if k in ref and ref[k].get(metric) is not None and u.get(metric) is not None
            ]
            if len(pairs) > 1:
                diffs[metric] = paired_bootstrap_diff([x for x, _ in pairs], [y for _, y in pairs], n_boot, 0)
        differences[case] = diffs
    return {
        "benchmark": "toyworld-relations",
        "cases": cases,
        "reference": REFERENCE if ref else None,
        "differences": differences,
        "per_unit": [dict(r) for r in records],
        "config": dict(config or {}),
    }


_COLUMNS = (
    ("relation_mc", "relation MC"),
    ("relation_open", "relation open"),
    ("team_fact", "team fact"),
    ("team_recall", "team recall"),
    ("recognition_alone", "recog. alone"),
    ("recognition_both", "recog. both"),
    ("recognition_related", "recog. related layout"),
    ("recognition_drop", "drop (both)"),
    ("recognition_drop_related", "drop (related)"),
    ("gen_a", "gen: A found"),
    ("gen_b", "gen: B found"),
    ("gen_either", "gen: A or B"),
)


def _cell(stats: Mapping[str, Any], metric: str) -> str:
    value, ci = stats.get(metric), stats.get(metric + "_ci")
    if value is None:
        return "–"
    return f"{value:.3f}" if ci is None else f"{value:.3f} ± {(ci[1] - ci[0]) / 2:.3f}"


def markdown_relations(summary: Mapping[str, Any]) -> str:
    """The table: a row per case, mean ± half the 95% CI per metric, then the paired differences and notes."""
    config = summary.get("config", {})
    lines = [
        f"Relations in the toy world ({config.get('split', '?')} split, {config.get('n_units', '?')} "
        f"pair×seed units; mean ± half the 95% bootstrap CI).",
        "",
        "| case | " + " | ".join(title for _, title in _COLUMNS) + " |",
        "|---|" + "---|" * len(_COLUMNS),
    ]
    for case, stats in summary["cases"].items():
        lines.append(f"| {case} | " + " | ".join(_cell(stats, m) for m, _ in _COLUMNS) + " |")
    before = summary["cases"].get("apart", {})
    if before.get("recognition_before_relate") is not None:
        lines += [
            "",
            f"apart, recognition of the files before the joint step: {_cell(before, 'recognition_before_relate')}",
        ]
    diffs = summary.get("differences") or {}
    rows = [
        f"| {case} | {m} | {d['mean']:+.3f} | [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] | {d['n']} |"
        for case, per in diffs.items()
        for m, d in per.items()
        if m in ("relation_mc", "relation_open", "team_fact", "team_recall", "recognition_both", "gen_either")
    ]
    if rows:
        lines += [
            "",
            "Paired differences joint − case:",
            "",
            "| case | metric | mean | 95% CI | units |",
            "|---|---|---|---|---|",
        ]
        lines += rows
    lines += [
        "",
        'relation MC: "Who is <B>\'s brother? <A> or <C>?" and its inverse, each in both option orders, A, B '
        "and a distractor C attached; right when the answer names exactly one option, the right one. relation "
        "open: the two questions without options; right when the first concept named is the right one. team "
        'fact: "Which team does <A> belong to? blue, red, green or yellow?" (and B), a fact no photo shows; '
        "team recall: the question the fact was trained with, right when exactly the right team is named. "
        "Recognition: weighted, the mean of A and B; alone = only that concept attached, both = A and B "
        "attached, related layout = both personalized prompts in the preamble (text_prompt: one layout, "
        'every definition and fact). Generation: "A photo of <A> next to <B>."; the scorer reads one object '
        "per image, so each rate is the share of images read as that identity. The contact sheet "
        "(OUT_contact.png) has a row per case (joint, apart, text_prompt, in turn) and unit: two training "
        "photos of A, two of B, then the generated images.",
    ]
    return "\n".join(lines) + "\n"


def write_contact_sheet(work: Path, units: Sequence[Pair], out: Path) -> Path | None:
    """Per case and unit a row: two training photos of A, two of B, then the two-concept images.

    Returns:
        The sheet, or ``None`` when no images were generated.
    """
    from PIL import Image

    from yochameleon.eval.report import contact_sheet

    rows = []
    for case in CASES:
        for pair in units:
            generated = sorted((work / "images" / case / pair.key).glob("*.png"))
            if not generated:
                continue
            photos = [
                p
                for name in pair.names[:2]
                for p in sorted((work / "concepts" / pair.key / name / "photos").glob("*.png"))[:2]
            ]
            rows.append([Image.open(p).convert("RGB") for p in [*photos, *generated]])
    if not rows:
        return None
    contact_sheet(rows).save(out)
    return out


# ---- the run -----------------------------------------------------------------------------------------
def _train(
    backend, base_cfg, entries: Sequence[dict], out: Path, relations: str, progress: bool
) -> dict[str, Path]:
    """Train ``entries`` (``{name, concept_dir, data_dir}``) in one run on the shared backend; their files."""
    from yochameleon.concept import detach, get_bank
    from yochameleon.config import from_dict, to_dict
    from yochameleon.train.config import TrainConfig
    from yochameleon.train.trainer import Trainer

    cfg = to_dict(base_cfg)
    first, *rest = entries
    cfg["output_dir"] = str(out)
    cfg["concept"].update({**first, "extra": list(rest), "relations": relations})
    cfg["logging"]["progress"] = progress
    shutil.rmtree(out, ignore_errors=True)  # never resume a stale run
    trainer = Trainer(from_dict(TrainConfig, cfg), backend=backend)
    try:
        trainer.setup()
        return dict(trainer.train().concept_files)
    finally:
        bank = get_bank(backend)
        for entry in entries:
            if bank is not None and entry["name"] in bank.concepts:
                detach(backend, entry["name"])


def run_relations(
    config: RelationsConfig,
    json_out: str | Path,
    work_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the measurement; write the summary JSON, the markdown table and the contact sheet beside it.

    Args:
        config: the settings.
        json_out: the summary JSON.
        work_dir: pool, index, concept folders, data, runs and images (default: ``OUT_work/`` beside the
            JSON). A pool and index already there are reused while size, seed and embedder match (copy
            the benchmark's ``pool/``, ``index/`` and ``pool.json`` in to skip indexing). Its
            ``records.jsonl`` holds the records of every unit finished so far.
        progress: progress bars.
        log: where progress lines and timings go (default: stderr).

    Returns:
        The summary (see :func:`summarize_relations`).

    Raises:
        BenchError: missing artifacts or a bad setting.
    """
    import torch
    from tqdm.auto import tqdm

    from yochameleon.backends import LoadOptions, load_backend
    from yochameleon.concept import read_concept_file
    from yochameleon.data.pipeline import prepare_concept
    from yochameleon.retrieval import OpenClipEmbedder
    from yochameleon.train.relate import RelateConfig, relate_concepts

    from .bench import prepare_pool
    from .pretrain import EMBEDDER_NAME
    from .scorer import Scorer

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.perf_counter()
    art = check_artifacts(config.artifacts)
    json_out = Path(json_out)
    work = Path(work_dir) if work_dir is not None else json_out.with_name(json_out.stem + "_work")
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def add(stage: str, t0: float) -> None:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    records: list[dict[str, Any]] = []
    try:
        t0 = time.perf_counter()
        world = ToyWorld(config.world_seed)
        units = draw_pairs(
            config.n_pairs, config.pair_seed, config.seed_list, config.split, world, config.relations
        )
        backend = load_backend(art / "base", LoadOptions(dtype="float32", device="cpu"))
        weights = art / "embedder" / f"{EMBEDDER_NAME}.safetensors"
        embedder = OpenClipEmbedder(model_config=art / "embedder" / f"{EMBEDDER_NAME}.json", weights=weights)
        scorer = Scorer.load(art / "scorer")
        add("load", t0)
        log(f"[relations] {config.n_pairs} {config.split} pairs x {config.seeds} seed(s); work folder {work}")
        t0 = time.perf_counter()
        index_dir, reused = prepare_pool(
            world, embedder, weights, work, config.pool_size, config.pool_seed, progress
        )
        add("pool_index", t0)
        log(f"[pool] {'reused' if reused else 'built'}: {config.pool_size} photos indexed")

        bar = tqdm(total=len(units), desc="relations", unit="unit", disable=not progress)
        for pair in units:
            unit_start = t0 = time.perf_counter()
            a, b, c = pair.names
            base_cfg = config.train_config(pair.seed, art / "base")
            base_cfg.data.index_dir = str(index_dir)
            folders = write_pair_folders(world, pair, work / "concepts" / pair.key, config.n_photos)
            entries = {}
            for name, folder in folders.items():
                data_dir = work / "data" / pair.key / name
                shutil.rmtree(data_dir, ignore_errors=True)
                prepare_concept(folder, data_dir, base_cfg.data, base_cfg.concept.n_g, name=name)
                entries[name] = {"name": name, "concept_dir": str(folder), "data_dir": str(data_dir)}
            tests = {
                ident.name: world.test_set(
                    ident,
                    seed=pair.seed,
                    n_positives=config.n_positives,
                    n_hard=config.n_hard,
                    n_easy=config.n_easy,
                    n_vqa=0,
                )
                for ident in (pair.a, pair.b)
            }
            add("concepts_data_tests", t0)

            t0 = time.perf_counter()
            runs = work / "runs" / pair.key
            alone = {
                name: _train(backend, base_cfg, [entries[name]], runs / f"alone_{name}", "later", progress)[
                    name
                ]
                for name in (a, b, c)
            }
            add("fit_alone", t0)
            t0 = time.perf_counter()
            relate = RelateConfig(steps=config.relate_steps, seed=pair.seed, progress=progress)
            related = relate_concepts(
                backend, [alone[a], alone[b]], [pair.relation_fact()], runs / "related", relate
            )
            relate_entry = next(r for r in read_concept_file(related[0])[0].relations if r["with"] == b)
            add("relate", t0)
            t0 = time.perf_counter()
            joint = _train(backend, base_cfg, [entries[a], entries[b]], runs / "joint", "strict", progress)
            add("fit_joint", t0)

            files = {
                "joint": {a: joint[a], b: joint[b], c: alone[c]},
                "apart": {a: related[0], b: related[1], c: alone[c]},
            }
            for case in CASES:
                t0 = time.perf_counter()
                if case == "text_prompt":
                    attach = lambda names, pair=pair: TextPromptPair(backend, pair, names)  # noqa: E731
                else:
                    attach = lambda names, f=files[case]: _Trained(backend, [f[n] for n in names])  # noqa: E731
                metrics = measure_unit(
                    attach, pair, tests, scorer, config.n_generated, work / "images" / case / pair.key
                )
                record = {"case": case, "pair": pair.index, "seed": pair.seed, **{m: None for m in METRICS}}
                record.update(metrics)
                if case == "apart":
                    before = []
                    for name in (a, b):
                        with _Trained(backend, [alone[name]]) as asker:
                            before.append(_recognition(asker.yes_no, name, tests[name]))
                    record["recognition_before_relate"] = float(np.mean(before))
                    record["relate_loss"] = relate_entry["loss"]
                if case != "text_prompt":
                    record["files"] = {n: str(p) for n, p in files[case].items()}
                record["unit"] = pair.to_dict()
                records.append(record)
                add(f"evaluate_{case}", t0)
            log(
                f"[{pair.key}] {pair.relation}: "
                + "; ".join(
                    f"{r['case']} MC {r['relation_mc']:.2f} open {r['relation_open']:.2f} team {r['team_fact']:.2f}"
                    for r in records[-len(CASES) :]
                )
                + f" ({time.perf_counter() - unit_start:.0f}s)"
            )
            # A run stopped later still leaves every finished unit's records.
            (work / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            bar.update(1)
        bar.close()
    finally:
        torch.set_num_threads(previous_threads)

    t0 = time.perf_counter()
    run_config = {
        "benchmark": "toyworld-relations",
        "split": config.split,
        "n_units": len(units),
        "relations": config.to_dict(),
        "units": [u.to_dict() for u in units],
        "train": {
            "recipe": config.recipe,
            "overrides": list(config.overrides),
            "epochs": base_cfg.optim.epochs,
            "lr": base_cfg.optim.lr,
            "n_g": base_cfg.concept.n_g,
            "n_u": base_cfg.concept.n_u,
            "relate_steps": config.relate_steps,
        },
        "ci": {"level": 0.95, "n_boot": config.n_boot, "paired_reference": REFERENCE},
    }
    summary = summarize_relations(records, run_config, n_boot=config.n_boot)
    table = markdown_relations(summary)
    md = json_out.with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(table)
    sheet = write_contact_sheet(work, units, json_out.with_name(json_out.stem + "_contact.png"))
    add("summary", t0)
    timings["total"] = time.perf_counter() - started
    summary["config"]["timings"] = {k: round(v, 1) for k, v in timings.items()}
    json_out.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    log("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["config"]["timings"].items()))
    log(f"[relations] summary {json_out}; table {md}" + (f"; contact sheet {sheet}" if sheet else ""))
    return summary
