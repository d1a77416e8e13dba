"""Every template string of yochameleon, and the functions that render them with real tokens.

In record text the concept identifier is the literal placeholder ``<sks>`` and an image position is
the literal ``<image>``; :func:`substitute_identifier` swaps in a concept's real token string and the
trainer expands ``<image>`` into the image's token span.

The wording is our own. Recognition answers always start with ``"Yes,"`` or ``"No,"`` so that
answers can be scored by their first word.
"""

from __future__ import annotations

from yochameleon.errors import ConfigError

SKS = "<sks>"
IMAGE = "<image>"
SOFT_PROMPT_FORMS = ("paper", "code")

# ----- recognition -------------------------------------------------------------------------------

RECOGNITION_QUESTIONS = [
    "Is <sks> in this photo?",
    "Can you see <sks> in this image?",
    "Does this picture show <sks>?",
    "Is <sks> visible here?",
    "Do you spot <sks> anywhere in this photo?",
    "Is this a photo of <sks>?",
    "Does <sks> appear in this image?",
    "Is <sks> present in the picture?",
    "Look at the photo: is <sks> there?",
    "Can <sks> be found in this scene?",
    "Would you say <sks> is in this image?",
    "Is there <sks> in this picture?",
    "Does the image contain <sks>?",
    "Is <sks> shown in this photo?",
    "Have a look: do you see <sks>?",
    "Is <sks> one of the things in this image?",
    "Tell me whether <sks> is in this photo.",
    "Is the subject of this picture <sks>?",
    "Am I looking at <sks> here?",
    "Does this scene include <sks>?",
    "Can you find <sks> in this photograph?",
    "Is <sks> pictured here?",
]

POSITIVE_ANSWERS = [
    "Yes, <sks> is in this photo.",
    "Yes, I can see <sks> in this image.",
    "Yes, this picture shows <sks>.",
    "Yes, <sks> is visible here.",
    "Yes, I spot <sks> in the photo.",
    "Yes, this is a photo of <sks>.",
    "Yes, <sks> appears in this image.",
    "Yes, <sks> is present in the picture.",
    "Yes, <sks> is there.",
    "Yes, <sks> can be found in this scene.",
    "Yes, I would say <sks> is in this image.",
    "Yes, there is <sks> in this picture.",
    "Yes, the image contains <sks>.",
    "Yes, <sks> is shown in this photo.",
    "Yes, I see <sks>.",
    "Yes, <sks> is one of the things in this image.",
    "Yes, <sks> is in the photo.",
    "Yes, the subject of this picture is <sks>.",
    "Yes, you are looking at <sks>.",
    "Yes, this scene includes <sks>.",
    "Yes, <sks> is in this photograph.",
    "Yes, <sks> is pictured here.",
]

NEGATIVE_ANSWERS = [
    "No, <sks> is not in this photo.",
    "No, I cannot see <sks> in this image.",
    "No, this picture does not show <sks>.",
    "No, <sks> is not visible here.",
    "No, I do not spot <sks> in the photo.",
    "No, this is not a photo of <sks>.",
    "No, <sks> does not appear in this image.",
    "No, <sks> is not present in the picture.",
    "No, <sks> is not there.",
    "No, <sks> cannot be found in this scene.",
    "No, I would not say <sks> is in this image.",
    "No, there is no <sks> in this picture.",
    "No, the image does not contain <sks>.",
    "No, <sks> is not shown in this photo.",
    "No, I do not see <sks>.",
    "No, <sks> is not one of the things in this image.",
    "No, <sks> is not in the photo.",
    "No, the subject of this picture is not <sks>.",
    "No, you are not looking at <sks>.",
    "No, this scene does not include <sks>.",
    "No, <sks> is not in this photograph.",
    "No, <sks> is not pictured here.",
]

# ----- captions, generation, text QA -------------------------------------------------------------

CAPTION_REQUEST = "Describe this photo."
CAPTION_REQUESTS = [
    "Describe this photo.",
    "What is happening in this picture?",
    "Write a short caption for this image.",
    "Tell me what you see in this photo.",
]
GENERATION_REQUEST = "A photo of <sks>."
GENERATION_REQUESTS = [
    "A photo of <sks>.",
    "A picture of <sks>.",
    "An image of <sks>.",
    "A snapshot of <sks>.",
]

# Attribute questions the default text-QA answerer asks about each photo (objects and pets).
ATTRIBUTE_QUESTIONS = [
    "What kind of thing is <sks>?",
    "What is the main colour of <sks>?",
    "What shape is <sks>?",
    "What is <sks> made of?",
    "How big is <sks>?",
    "Does <sks> have a pattern or markings?",
    "What is the surface of <sks> like?",
    "What details make <sks> stand out?",
    "What mood does <sks> give off?",
    "How would you sum up the look of <sks>?",
]

# The same for people.
PERSON_ATTRIBUTE_QUESTIONS = [
    "What colour is the hair of <sks>?",
    "How is the hair of <sks> styled?",
    "Does <sks> wear glasses or other accessories?",
    "How does <sks> usually dress?",
    "How tall does <sks> look?",
    "What is the build of <sks>?",
    "What is the skin tone of <sks>?",
    "Does <sks> have any distinctive facial features?",
    "What expression does <sks> usually have?",
    "How would you sum up the look of <sks>?",
]

# Questions whose answer is one of the user's free-text facts from concept.yaml.
FACT_QUESTIONS = [
    "What do you know about <sks>?",
    "Tell me something about <sks>.",
    "What is worth knowing about <sks>?",
    "Share a fact about <sks>.",
]

# A fact "<sks> VERB …" whose verb is listed is also asked with its own question, so it is the one
# answer to at least one question (the paraphrases above repeat once a concept has more facts than
# there are paraphrases). Matched case-insensitively on the words after "<sks> ".
FACT_VERB_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("belongs to", "What does <sks> belong to?"),
    ("likes", "What does <sks> like?"),
    ("loves", "What does <sks> love?"),
    ("hates", "What does <sks> hate?"),
    ("wears", "What does <sks> wear?"),
    ("eats", "What does <sks> eat?"),
    ("plays", "What does <sks> play?"),
    ("has", "What does <sks> have?"),
    ("lives in", "Where does <sks> live?"),
    ("lives on", "Where does <sks> live?"),
    ("sleeps on", "Where does <sks> sleep?"),
    ("sleeps in", "Where does <sks> sleep?"),
    ("comes from", "Where does <sks> come from?"),
    ("is from", "Where is <sks> from?"),
)

# ----- relations between concepts (see yochameleon.relations) ------------------------------------
# ``{a}`` and ``{b}`` are concept identifiers, ``{rel}`` the relation's words. A relation "{a} REL
# {b}" is asked about {b} (the answer names {a}) and, through the inverse relation, about {a}.

# Relations between people or animals: "<a> is the brother of <b>".
KIN_STATEMENT = "{a} is the {rel} of {b}."
KIN_QUESTION = "Who is {b}'s {rel}?"
KIN_ANSWER = "{a} is {b}'s {rel}."
# Where things are: "<a> is next to <b>".
PLACE_STATEMENT = "{a} is {rel} {b}."
PLACE_QUESTION = "What is {rel} {b}?"
PLACE_ANSWER = "{a} is {rel} {b}."
# Verb relations: "<a> belongs to <b>".
VERB_STATEMENT = "{a} {rel} {b}."
VERB_QUESTION = "What {rel} {b}?"
VERB_ANSWER = "{a} {rel} {b}."
# Questions answered by the fact itself, naming both concepts.
RELATION_QUESTIONS = [
    "How are {a} and {b} related?",
    "What is the relation between {a} and {b}?",
]
# A fact outside the vocabulary ("<a> sleeps on <b>'s blanket") is answered as written.
FREE_RELATION_QUESTIONS = [
    "What do you know about {a} and {b}?",
    "Tell me something about {a} and {b}.",
]

# How the base-model answerer is asked about a photo: it does not know <sks>, so the identifier is
# replaced by a plain description of the subject, and it is told to answer as if it knew the subject.
ANSWERER_PROMPT = (
    "{image}Look at {subject} in this photo. Answer briefly, as if you know {subject} well, "
    "without mentioning the photo. {question}"
)
DEFAULT_SUBJECT = "the main subject"


def recognition_question(i: int) -> str:
    """The ``i``-th recognition question (cycled), with ``<sks>`` as the identifier."""
    return RECOGNITION_QUESTIONS[i % len(RECOGNITION_QUESTIONS)]


def recognition_answer(i: int, positive: bool) -> str:
    """The ``i``-th "Yes, …" / "No, …" answer (cycled)."""
    pool = POSITIVE_ANSWERS if positive else NEGATIVE_ANSWERS
    return pool[i % len(pool)]


def with_image(text: str) -> str:
    """``text`` with the image placed first (``<image>`` + text), as inference places it."""
    return text if IMAGE in text else f"{IMAGE}{text}"


def attribute_questions(is_person: bool) -> list[str]:
    """The default text-QA questions for a person or for an object/pet."""
    return list(PERSON_ATTRIBUTE_QUESTIONS if is_person else ATTRIBUTE_QUESTIONS)


def answerer_prompt(question: str, subject: str = DEFAULT_SUBJECT) -> str:
    """The text a base-model answerer sees: ``<sks>`` becomes ``subject``; the image comes first."""
    return ANSWERER_PROMPT.format(image=IMAGE, subject=subject, question=question.replace(SKS, subject))


def personalized_prompt(sks: str, g_tokens: list[str], u_tokens: list[str]) -> str:
    """``<sks> is <g1>…<gN><u1>…<uM>.``: prepended to every prompt about the concept."""
    return f"{sks} is {''.join(list(g_tokens) + list(u_tokens))}."


def soft_positive_prompt(sks: str, g_prefix: list[str], form: str = "paper") -> str:
    """The prompt of a soft positive described by the first ``m`` g-tokens.

    ``paper``: ``<sks> is <g1..gm>. A photo of <sks>.`` (the paper's figure); ``code``:
    ``A photo of <g1..gm>.`` (the original code's default).

    Raises:
        ConfigError: ``form`` is neither ``paper`` nor ``code``.
    """
    if form == "paper":
        return f"{sks} is {''.join(g_prefix)}. {real_generation_request(sks)}"
    if form == "code":
        return GENERATION_REQUEST.replace(SKS, "".join(g_prefix))
    raise ConfigError(f"soft prompt form must be one of {SOFT_PROMPT_FORMS}, got {form!r}")


def real_generation_request(sks: str) -> str:
    """The request paired with a real photo: ``A photo of <sks>.``."""
    return GENERATION_REQUEST.replace(SKS, sks)


def substitute_identifier(text: str, sks_token: str) -> str:
    """Replace the ``<sks>`` placeholder with a concept's real token string."""
    return text.replace(SKS, sks_token)
