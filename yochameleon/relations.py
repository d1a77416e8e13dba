"""Facts that name other concepts: parsing, the relation vocabulary, and the QA records they become.

A fact in ``concept.yaml`` (or given to ``yochameleon relate``) names concepts as ``<NAME>``;
``<sks>`` and the concept's own ``<NAME>`` both mean the concept whose folder holds the fact::

    facts:
      - <bo> wears a red collar              # names only bo: an ordinary fact about bo
      - <bo> is the brother of <mắm>         # a relation in the vocabulary: asked both ways
      - <bo> sleeps on <mắm>'s blanket       # a free relation: one record, answered as written

A fact names at most two concepts. A relation in the vocabulary (:data:`RELATIONS`) is read as
``<a> REL <b>`` and becomes questions in both directions: about ``<b>`` ("Who is <mắm>'s brother?"
→ "<bo> is <mắm>'s brother.") and, through the inverse relation, about ``<a>`` ("Who is <bo>'s
sibling?" → "<mắm> is <bo>'s sibling."), plus a question naming both whose answer is the fact. A
fact naming another concept in any other words is a *free relation*: one record, "What do you know
about <bo> and <mắm>?", answered by the fact. Every answer names the other concept by its token,
so the records train both concepts' rows.

The vocabulary (``<a> … <b>``; the inverse is what ``<b>`` is to ``<a>``):

=====================================================  ===================
relation (and the phrasings read as it)                inverse
=====================================================  ===================
is the brother / sister / sibling of                   sibling
is the mother / father / parent of                     child
is the son / daughter / child of                       parent
is the friend of, is friends with                      friend
is the owner of, owns                                  belongs to
belongs to, is owned by, is the pet of                 owner
is next to, is beside                                  next to
is in front of                                         behind
is behind                                              in front of
is on, is on top of                                    under
is under, is below                                     on
is to the left of, is left of                          to the right of
is to the right of, is right of                        to the left of
=====================================================  ===================

"<bo> is <mắm>'s brother" is read like "<bo> is the brother of <mắm>". Words are matched without
regard to case; a closing full stop is optional.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass

from yochameleon.concept import normalize_name, validate_concept_name
from yochameleon.errors import ConceptError
from yochameleon.prompts import (
    FREE_RELATION_QUESTIONS,
    KIN_ANSWER,
    KIN_QUESTION,
    KIN_STATEMENT,
    PLACE_ANSWER,
    PLACE_QUESTION,
    PLACE_STATEMENT,
    RELATION_QUESTIONS,
    SKS,
    VERB_ANSWER,
    VERB_QUESTION,
    VERB_STATEMENT,
)

_NAME = re.compile(r"<([^<>\s/\\]+)>")
_FORMS = {
    "kin": (KIN_STATEMENT, KIN_QUESTION, KIN_ANSWER),
    "place": (PLACE_STATEMENT, PLACE_QUESTION, PLACE_ANSWER),
    "verb": (VERB_STATEMENT, VERB_QUESTION, VERB_ANSWER),
}


@dataclass(frozen=True)
class Relation:
    """One relation of the vocabulary.

    Attributes:
        name: its words as used in questions and answers (``brother``, ``next to``, ``belongs to``).
        inverse: the relation the second concept has to the first.
        form: how it is phrased: ``kin`` (``is the REL of``), ``place`` (``is REL``) or ``verb`` (``REL``).
    """

    name: str
    inverse: str
    form: str

    def render(self, which: str, a: str, b: str) -> str:
        """The ``statement``, ``question`` (asked about ``b``) or ``answer`` (naming ``a``)."""
        statement, question, answer = _FORMS[self.form]
        template = {"statement": statement, "question": question, "answer": answer}[which]
        return template.format(a=a, b=b, rel=self.name)


def _vocabulary() -> dict[str, Relation]:
    kin = {
        "brother": "sibling",
        "sister": "sibling",
        "sibling": "sibling",
        "mother": "child",
        "father": "child",
        "parent": "child",
        "son": "parent",
        "daughter": "parent",
        "child": "parent",
        "friend": "friend",
        "owner": "belongs to",
    }
    place = {
        "next to": "next to",
        "in front of": "behind",
        "behind": "in front of",
        "on": "under",
        "under": "on",
        "to the left of": "to the right of",
        "to the right of": "to the left of",
    }
    table = {name: Relation(name, inverse, "kin") for name, inverse in kin.items()}
    table |= {name: Relation(name, inverse, "place") for name, inverse in place.items()}
    table["belongs to"] = Relation("belongs to", "owner", "verb")
    return table


RELATIONS: dict[str, Relation] = _vocabulary()
# Other phrasings, read as the relation they name.
_SYNONYMS = {
    "beside": "next to",
    "on top of": "on",
    "below": "under",
    "left of": "to the left of",
    "right of": "to the right of",
}

_A, _B = r"(?P<a><[^<>]+>)", r"(?P<b><[^<>]+>)"
_KIN_WORDS = "|".join(sorted((n for n, r in RELATIONS.items() if r.form == "kin"), key=len, reverse=True))
_PLACE_WORDS = "|".join(
    sorted([*(n for n, r in RELATIONS.items() if r.form == "place"), *_SYNONYMS], key=len, reverse=True)
)
# (pattern, relation or None for the captured words, swap a and b)
_PATTERNS: list[tuple[re.Pattern[str], str | None, bool]] = [
    (re.compile(rf"^{_A} is (?:the |a |an )?(?P<rel>{_KIN_WORDS}) of {_B}$", re.I), None, False),
    (re.compile(rf"^{_A} is {_B}'s (?P<rel>{_KIN_WORDS})$", re.I), None, False),
    (re.compile(rf"^{_A} is (?:a )?friends? with {_B}$", re.I), "friend", False),
    (re.compile(rf"^{_A} is (?:the |a )?pet of {_B}$", re.I), "belongs to", False),
    (re.compile(rf"^{_A} is {_B}'s pet$", re.I), "belongs to", False),
    (re.compile(rf"^{_A} owns {_B}$", re.I), "owner", False),
    (re.compile(rf"^{_A} (?:belongs to|is owned by) {_B}$", re.I), "belongs to", False),
    (re.compile(rf"^{_A} is (?P<rel>{_PLACE_WORDS}) {_B}$", re.I), None, False),
]


@dataclass(frozen=True)
class Fact:
    """A parsed fact.

    Attributes:
        text: the fact, every concept written ``<NAME>`` (NFC; ``<sks>`` resolved).
        concepts: the concepts it names, in order of first appearance.
        subject: ``a`` of a vocabulary relation ``<a> REL <b>``.
        relation: the vocabulary relation's name; ``None`` for a free relation or a plain fact.
        object: ``b`` of a vocabulary relation.
    """

    text: str
    concepts: tuple[str, ...]
    subject: str | None = None
    relation: str | None = None
    object: str | None = None

    @property
    def names_others(self) -> bool:
        """Whether the fact relates two concepts (a vocabulary or a free relation)."""
        return len(self.concepts) > 1

    @property
    def inverse(self) -> str | None:
        """What ``object`` is to ``subject``, for a vocabulary relation."""
        return RELATIONS[self.relation].inverse if self.relation else None

    def to_dict(self) -> dict[str, object]:
        """The fact as JSON (concept files record it)."""
        d = asdict(self)
        d["concepts"] = list(self.concepts)
        d["inverse"] = self.inverse
        return d


def _tag(name: str) -> str:
    return f"<{name}>"


def parse_fact(text: str, own: str | None = None, known: Collection[str] | None = None) -> Fact:
    """Parse one fact.

    Args:
        text: the fact, naming concepts as ``<NAME>``.
        own: the concept the fact belongs to (its folder's concept); ``<sks>`` means it. Without
            one, ``<sks>`` is refused: the fact must name its concepts.
        known: the concepts that may be named (trained in the same run, or attached); ``None``
            accepts any valid name.

    Returns:
        The parsed fact.

    Raises:
        ConceptError: an empty fact, ``<sks>`` without ``own``, an invalid or unknown name (the
            message names it), more than two concepts, or a relation of a concept to itself.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConceptError(f"a fact must be non-empty text, got {text!r}")
    text = " ".join(text.split())
    names: list[str] = []

    def sub(m: re.Match) -> str:
        raw = m.group(0)
        if raw == SKS:
            if own is None:
                raise ConceptError(
                    f"fact {text!r} names {SKS}, which is ambiguous here; name the concept as <NAME>"
                )
            name = normalize_name(own)
        else:
            try:
                name = validate_concept_name(m.group(1))
            except ConceptError as exc:
                raise ConceptError(f"fact {text!r}: {exc}") from exc
        if name not in names:
            names.append(name)
        return _tag(name)

    resolved = _NAME.sub(sub, text)
    if known is not None:
        allowed = {normalize_name(k) for k in known} | ({normalize_name(own)} if own else set())
        unknown = [n for n in names if n not in allowed]
        if unknown:
            listed = ", ".join(_tag(n) for n in sorted(allowed)) or "none"
            raise ConceptError(
                f"fact {resolved!r} names {', '.join(map(_tag, unknown))}, which "
                f"{'is' if len(unknown) == 1 else 'are'} not trained in this run or attached "
                f"(known concepts: {listed})"
            )
    if len(names) > 2:
        raise ConceptError(f"fact {resolved!r} names {len(names)} concepts; a fact relates at most two")
    body = resolved.rstrip(". ")
    for pattern, fixed, swap in _PATTERNS:
        m = pattern.match(body)
        if not m:
            continue
        a, b = m.group("a")[1:-1], m.group("b")[1:-1]
        if swap:
            a, b = b, a
        if a == b:
            raise ConceptError(f"fact {resolved!r} relates {_tag(a)} to itself")
        rel = fixed or m.group("rel").lower()
        return Fact(resolved, tuple(names), a, _SYNONYMS.get(rel, rel), b)
    return Fact(resolved, tuple(names))


@dataclass(frozen=True)
class RelationQA:
    """One question/answer pair from a relation fact, for the concept ``own``.

    ``question`` and ``answer`` name ``own`` as ``<sks>`` and the other concept as ``<NAME>``
    (record text); ``mentions`` lists the other concepts named.
    """

    question: str
    answer: str
    mentions: tuple[str, ...]
    fact: str


def relation_qa(fact: Fact, own: str) -> list[RelationQA]:
    """The QA pairs a relation fact becomes, written for concept ``own``'s records.

    A vocabulary relation ``<a> REL <b>`` gives: the question about ``b`` answered by naming ``a``;
    the inverse question about ``a`` answered by naming ``b``; and questions naming both answered
    by the fact. A free relation gives one question naming both, answered by the fact.

    Raises:
        ConceptError: the fact does not name another concept, or does not name ``own``.
    """
    own = normalize_name(own)
    if not fact.names_others:
        raise ConceptError(f"fact {fact.text!r} names no other concept; it is an ordinary fact")
    if own not in fact.concepts:
        raise ConceptError(
            f"fact {fact.text!r} does not name {_tag(own)}; a concept's facts must name it "
            f"(put the fact in the folder of a concept it names)"
        )

    def tag(name: str) -> str:
        return SKS if name == own else _tag(name)

    def rec(question: str, answer: str) -> RelationQA:
        others = tuple(n for n in fact.concepts if n != own)
        return RelationQA(question, answer, others, fact.text)

    first, second = fact.concepts
    statement = _write(fact.text, tag)
    if fact.relation is None:
        return [rec(q.format(a=tag(first), b=tag(second)), statement) for q in FREE_RELATION_QUESTIONS]
    rel, inv = RELATIONS[fact.relation], RELATIONS[fact.inverse]
    a, b = tag(fact.subject), tag(fact.object)
    pairs = [
        rec(rel.render("question", a, b), rel.render("answer", a, b)),
        rec(inv.render("question", b, a), inv.render("answer", b, a)),
    ]
    pairs += [rec(q.format(a=a, b=b), rel.render("statement", a, b)) for q in RELATION_QUESTIONS]
    return pairs


def _write(text: str, tag) -> str:
    """``text`` with each ``<NAME>`` written by ``tag`` and a closing full stop."""
    out = _NAME.sub(lambda m: tag(m.group(1)), text)
    return out if out.endswith((".", "!", "?")) else out + "."


def split_facts(facts: Sequence[str], own: str) -> tuple[list[str], list[Fact]]:
    """Split a concept's facts into ordinary facts and relations to other concepts.

    Ordinary facts come back as record text (the concept named ``<sks>``); relations as parsed
    facts, for :func:`relation_qa`.

    Raises:
        ConceptError: see :func:`parse_fact`; also a fact naming other concepts but not ``own``.
    """
    plain: list[str] = []
    related: list[Fact] = []
    own = normalize_name(own)
    for text in facts:
        fact = parse_fact(text, own=own)
        if fact.names_others:
            relation_qa(fact, own)  # refuses a fact that does not name its own concept
            related.append(fact)
        elif fact.concepts and fact.concepts != (own,):
            raise ConceptError(
                f"a fact of {_tag(own)} names only {_tag(fact.concepts[0])}: {fact.text!r}; "
                f"put it in that concept's folder or name {_tag(own)}"
            )
        else:
            # As written (no full stop added), the concept's own name read as <sks>.
            plain.append(_NAME.sub(lambda m: SKS, fact.text) if fact.concepts else text.strip())
    return plain, related


def mentioned_names(text: str) -> list[str]:
    """The ``<NAME>``s of ``text`` other than ``<sks>`` and ``<image>``, NFC, in order of appearance."""
    seen: list[str] = []
    for m in _NAME.finditer(text):
        name = normalize_name(m.group(1))
        if name not in ("sks", "image") and name not in seen:
            seen.append(name)
    return seen


__all__ = [
    "RELATIONS",
    "Fact",
    "Relation",
    "RelationQA",
    "mentioned_names",
    "parse_fact",
    "relation_qa",
    "split_facts",
]
