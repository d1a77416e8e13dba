"""Quality gates of the toy-world base artifacts (toy world v2): each is measured, printed, and must pass.

* ``scorer_identity`` >= 95% on held-out photos (four factors and the set of mark colours) and
  ``scorer_random`` <= 5% on random scenes.
* ``vq_marks`` >= 95%: VQ reconstructions keep the set of mark colours (read by the scorer) among photos
  whose original the scorer reads right; ``vq_factors`` >= 90%: the same for each nameable factor (the
  gate value is the lowest of the four).
* ``attribute_qa`` >= 90%: the base model answers attribute questions about new photos of held-out
  identities, mark-colour questions included (likelihood ranking over every value of the factor);
  ``attribute_qa_min_factor`` >= 85%: its worst factor.
* ``existence`` >= 90%: "Is <description> in this photo?" answered yes for the photo's object and no for a
  description with exactly one factor changed (balanced); ``existence_marks`` >= 85%: the "no" questions
  whose changed factor is the marks, with the "yes" questions of the same photos.
* ``text_to_image`` >= 60%: images generated from held-out full captions in which the scorer finds every
  captioned factor: shape, colour, pattern, size and the set of mark colours, all five right in one image.
  (Builds before 2026-12-07 gated the mean over the five factors, which is reported beside it as
  ``text_to_image_factors`` and gates nothing.)
* ``twin_separation`` >= 85%: asked with the identity's full (oracle) description, yes on new photos of
  the identity and no on photos of its twins (balanced).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from yochameleon.errors import YoChameleonError

from .world import (
    QA_FACTORS,
    Identity,
    ToyWorld,
    attribute_qa,
    factor_values,
    factor_word,
    full_caption,
)

__all__ = [
    "GateError",
    "GateResult",
    "THRESHOLDS",
    "attribute_qa_accuracy",
    "check_gates",
    "drawing_retention",
    "existence_accuracy",
    "format_gates",
    "gate_values",
    "make_gate",
    "text_to_image_accuracy",
    "twin_separation_accuracy",
    "vq_retention",
]

# name -> (threshold, higher_is_better)
THRESHOLDS: dict[str, tuple[float, bool]] = {
    "scorer_identity": (0.95, True),
    "scorer_random": (0.05, False),
    "vq_marks": (0.95, True),
    "vq_factors": (0.90, True),
    "attribute_qa": (0.90, True),
    "attribute_qa_min_factor": (0.85, True),
    "existence": (0.90, True),
    "existence_marks": (0.85, True),
    "text_to_image": (0.60, True),
    "twin_separation": (0.85, True),
}


class GateError(YoChameleonError):
    """A quality gate was missed, or a gate got invalid input."""


@dataclass(frozen=True)
class GateResult:
    """One measured gate."""

    name: str
    value: float
    threshold: float
    higher_is_better: bool = True

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<16} {self.value:7.3f}  (gate {op} {self.threshold})"


def make_gate(name: str, value: float) -> GateResult:
    """A :class:`GateResult` with the issue's threshold for ``name``.

    Raises:
        GateError: on an unknown gate name or a value outside ``[0, 1]``.
    """
    if name not in THRESHOLDS:
        raise GateError(f"unknown gate {name!r}; known: {sorted(THRESHOLDS)}")
    if not 0.0 <= float(value) <= 1.0 or np.isnan(value):
        raise GateError(f"gate {name} value must be a rate in [0, 1], got {value!r}")
    threshold, higher = THRESHOLDS[name]
    return GateResult(name, float(value), threshold, higher)


def gate_values(qa: dict, existence: dict, t2i: dict, twins: float) -> dict[str, float]:
    """The base model's gate values from its measurements.

    Args:
        qa: :func:`attribute_qa_accuracy`'s ``{"all": ..., factor: ...}``.
        existence: :func:`existence_accuracy`'s ``{"all": ..., factor: ...}``.
        t2i: :func:`text_to_image_accuracy`'s ``{"all": ..., "every": ...}``.
        twins: :func:`twin_separation_accuracy`.

    Returns:
        ``{gate name: value}``; ``text_to_image`` is the share of images with *every* requested factor
        right, as the gate asks (the per-factor mean is an easier number: 0.73 where every-factor is 0.17).
    """
    return {
        "attribute_qa": qa["all"],
        "attribute_qa_min_factor": min(v for k, v in qa.items() if k != "all"),
        "existence": existence["all"],
        "existence_marks": existence["marks"],
        "text_to_image": t2i["every"],
        "twin_separation": twins,
    }


def format_gates(results: Sequence[GateResult]) -> str:
    """One line per gate."""
    return "\n".join(r.line() for r in results)


def check_gates(results: Sequence[GateResult]) -> None:
    """Raise if any gate failed.

    Raises:
        GateError: listing every failed gate.
    """
    failed = [r for r in results if not r.passed]
    if failed:
        raise GateError("quality gates missed:\n" + format_gates(failed))


# --------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------
def _photos(world: ToyWorld, identities: Sequence[Identity], per: int, rng: np.random.Generator):
    images, owners = [], []
    for identity in identities:
        for _ in range(per):
            images.append(world.render(identity, rng, distractors=int(rng.integers(0, 3))))
            owners.append(identity)
    return images, owners


@torch.no_grad()
def vq_retention(
    vqmodel, decoder, scorer, world: ToyWorld, identities: Sequence[Identity], per: int = 8, seed: int = 0
) -> dict:
    """How often VQ reconstructions keep the mark colours and each nameable factor, read by the scorer.

    Each is counted among the photos whose original the scorer reads right on that factor (so the
    gate measures the VQ, not the scorer), with the object located in the original (a blurred outline
    in the reconstruction cannot move the mark cells).

    Returns:
        ``kept`` (mark colours; the ``vq_marks`` gate), ``factors`` (``{factor: kept}`` for the four
        nameable factors; their minimum is the ``vq_factors`` gate), ``retained`` (mark colours with the
        object located in the reconstruction itself) and ``original`` (the scorer's mark-colour accuracy
        on the originals).
    """
    from .scorer import FACTORS

    if not identities or per < 1:
        raise GateError("vq_retention needs identities and per >= 1")
    rng = np.random.default_rng([seed, 0x7A11])
    images, owners = _photos(world, identities, per, rng)
    arrays = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    recon_arr = _reconstructions(vqmodel, decoder, arrays)
    original = scorer.predict(arrays)
    located = scorer.predict(recon_arr, boxes_from=arrays)
    own = scorer.predict(recon_arr)

    def kept(key: str, truth: list, preds: list[dict]) -> float:
        ok = np.array([p[key] == t for p, t in zip(original, truth)])
        hit = np.array([p[key] == t for p, t in zip(preds, truth)])
        return float(hit[ok].mean()) if ok.any() else 0.0

    colours = [o.mark_colours for o in owners]
    return {
        "kept": kept("mark_colours", colours, located),
        "factors": {f: kept(f, [getattr(o, f) for o in owners], located) for f in FACTORS},
        "retained": kept("mark_colours", colours, own),
        "original": float(np.mean([p["mark_colours"] == t for p, t in zip(original, colours)])),
    }


@torch.no_grad()
def _reconstructions(vqmodel, decoder, arrays: np.ndarray) -> np.ndarray:
    """VQ reconstructions (encode, quantize, decode) of ``uint8`` images ``[N, H, W, 3]``."""
    from yochameleon.backends.chameleon_vq import reconstruct

    recon = []
    for start in range(0, len(arrays), 256):
        pixels = torch.from_numpy(arrays[start : start + 256]).permute(0, 3, 1, 2).float() / 127.5 - 1
        out = reconstruct(vqmodel, decoder, pixels).pixels.clamp(-1, 1)
        recon.append(((out + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(recon)


def drawing_retention(vqmodel, decoder, scorer, world: ToyWorld, identities: Sequence[Identity]) -> dict:
    """How often the scorer reads every factor right in the VQ reconstruction of an identity's drawing.

    A base that predicts a drawing's codes exactly draws what this reconstruction shows, so ``every``
    is the ceiling of the text-to-image gate for this tokenizer (informational, gates nothing).

    Returns:
        ``{"every": share with all five right, factor: share right, ...}`` over shape, colour,
        pattern, size and ``marks``.
    """
    if not identities:
        raise GateError("drawing_retention needs identities")
    arrays = np.stack([np.asarray(world.drawing(identity), dtype=np.uint8) for identity in identities])
    wanted = [{**t.attributes, "marks": t.mark_colours} for t in identities]
    hits = np.asarray(scorer.attribute_hits(_reconstructions(vqmodel, decoder, arrays), wanted))
    return {"every": float(hits.all(1).mean()), **{n: float(h) for n, h in zip(wanted[0], hits.mean(0))}}


def _answer_logprob(backend, rows: list[tuple[list[int], int]]) -> np.ndarray:
    """Sum log-probability of each row's last ``n`` tokens given the rest (rows: (ids, n))."""
    from .pretrain import pad_batch

    scores = []
    for start in range(0, len(rows), 64):
        chunk = rows[start : start + 64]
        ids, _ = pad_batch([(r, r) for r, _ in chunk], backend.special.pad)
        hidden, _ = backend.hidden_states(ids)
        logp = backend.logits(hidden[:, :-1]).log_softmax(-1)
        for i, (row, n) in enumerate(chunk):
            t = len(row)
            targets = torch.tensor(row[t - n :])
            scores.append(float(logp[i, t - n - 1 : t - 1].gather(1, targets[:, None]).sum()))
    return np.asarray(scores)


@torch.no_grad()
def attribute_qa_accuracy(
    backend, world: ToyWorld, identities: Sequence[Identity], per: int = 3, seed: int = 0
) -> dict[str, float]:
    """Multiple-choice attribute QA on new photos: the answer with the highest likelihood must be right.

    Every value of the asked factor is a candidate answer (every set of mark colours for the marks
    question), so chance is 1/10 to 1/2.

    Returns:
        ``{"all": accuracy, factor: accuracy, ...}`` over :data:`~.world.QA_FACTORS`.
    """
    from .pretrain import conversation
    from .world import ATTRIBUTE_ANSWERS

    if not identities or per < 1:
        raise GateError("attribute_qa_accuracy needs identities and per >= 1")
    rng = np.random.default_rng([seed, 0x0A0A])
    images, owners = _photos(world, identities, per, rng)
    spans = backend.encode_images(images)
    hits = {factor: [] for factor in QA_FACTORS}
    for span_ids, owner in zip(spans.tolist(), owners):
        for qa in attribute_qa(owner, rng):
            human = backend.image_span(span_ids) + backend.tokenize(" " + qa.question)
            candidates = [
                ATTRIBUTE_ANSWERS[qa.factor].format(value=factor_word(qa.factor, v))
                for v in factor_values(qa.factor)
            ]
            rows = []
            for answer in candidates:
                ids, _ = conversation(backend, human, backend.tokenize(answer))
                rows.append((ids, len(backend.tokenize(answer)) + 1))
            best = int(np.argmax(_answer_logprob(backend, rows)))
            hits[qa.factor].append(candidates[best] == qa.answer)
    result = {"all": float(np.mean([h for per_factor in hits.values() for h in per_factor]))}
    result.update({factor: float(np.mean(h)) for factor, h in hits.items()})
    return result


def _says_yes(backend, image_spans: list[list[int]], descriptions: list[str], rng: np.random.Generator):
    """Whether the base answers "Yes" (over "No") to a recognition question naming each description."""
    from yochameleon.prompts import RECOGNITION_QUESTIONS

    yes, no = backend.tokenize("Yes")[0], backend.tokenize("No")[0]
    rows = []
    for span, description in zip(image_spans, descriptions):
        k = int(rng.integers(len(RECOGNITION_QUESTIONS)))
        question = RECOGNITION_QUESTIONS[k].replace("<sks>", description)
        prefix = [backend.special.bos, *backend.image_span(span), *backend.tokenize(" " + question)]
        prefix.append(backend.special.eot)
        rows += [([*prefix, yes], 1), ([*prefix, no], 1)]
    scores = _answer_logprob(backend, rows).reshape(-1, 2)
    return scores[:, 0] > scores[:, 1]


@torch.no_grad()
def existence_accuracy(
    backend, world: ToyWorld, identities: Sequence[Identity], per: int = 3, seed: int = 0
) -> dict[str, float]:
    """Grounded yes/no: each new photo is asked about its own object and about one changed description.

    The "no" description changes exactly one factor of the object's full caption, cycling through
    :data:`~.world.QA_FACTORS` (marks included), so the set is balanced in answers and in factors.

    Returns:
        ``{"all": accuracy, factor: accuracy, ...}``: per factor over that factor's "no" questions and
        the "yes" questions of the same photos.
    """
    from .pretrain import changed_description

    if not identities or per < 1:
        raise GateError("existence_accuracy needs identities and per >= 1")
    rng = np.random.default_rng([seed, 0xE715])
    images, owners = _photos(world, identities, per, rng)
    spans = backend.encode_images(images).tolist()
    factors = [QA_FACTORS[k % len(QA_FACTORS)] for k in range(len(owners))]
    descriptions = []
    for owner, factor in zip(owners, factors):
        descriptions += [full_caption(owner), changed_description(owner, (factor,), rng)]
    doubled = [span for span in spans for _ in range(2)]
    yes = _says_yes(backend, doubled, descriptions, rng).reshape(-1, 2)
    right = np.stack([yes[:, 0], ~yes[:, 1]], axis=1)
    result = {"all": float(right.mean())}
    for factor in QA_FACTORS:
        rows = np.array([f == factor for f in factors])
        result[factor] = float(right[rows].mean()) if rows.any() else 0.0
    return result


@torch.no_grad()
def twin_separation_accuracy(
    backend, world: ToyWorld, identities: Sequence[Identity], per: int = 6, seed: int = 0
) -> float:
    """Asked with each identity's full (oracle) description: yes on its photos, no on its twins' photos.

    ``per`` new photos of each identity and ``per`` photos of fresh twins (same description without the
    marks, another set of mark colours); the accuracy is over both, so chance is 1/2.
    """
    if not identities or per < 1:
        raise GateError("twin_separation_accuracy needs identities and per >= 1")
    rng = np.random.default_rng([seed, 0x7715])
    images, truth, descriptions = [], [], []
    for identity in identities:
        for _ in range(per):
            for shown, who in ((True, identity), (False, world.twin(identity, rng))):
                images.append(world.render(who, rng, distractors=int(rng.integers(0, 3))))
                truth.append(shown)
                descriptions.append(full_caption(identity))
    spans = backend.encode_images(images).tolist()
    yes = _says_yes(backend, spans, descriptions, rng)
    return float((yes == np.array(truth)).mean())


@torch.no_grad()
def generate_images(
    backend, prompts: Sequence[str], seed: int = 0, temperature: float = 0.7, top_k: int = 64
) -> list[Image.Image]:
    """Text-to-image with the base model, prompts grouped by token length (generation needs equal lengths)."""
    from yochameleon.generation import Sampling, generate

    eot = backend.special.eot
    encoded = [[backend.special.bos, *backend.tokenize(p), eot] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    out: list[Image.Image | None] = [None] * len(prompts)
    for length, members in sorted(by_length.items()):
        ids = torch.tensor([encoded[i] for i in members])
        spans = generate(
            backend,
            ids,
            backend.image_span_constraint(),
            backend.image_seq_len + 2,
            Sampling(temperature=temperature, top_k=top_k, seed=seed + length),
        )
        codes = torch.stack([torch.tensor(backend.span_to_image_ids(s.tolist())) for s in spans])
        for i, image in zip(members, backend.decode_images(codes)):
            out[i] = image
    return out  # type: ignore[return-value]


def text_to_image_accuracy(
    backend, scorer, identities: Sequence[Identity], per: int = 2, seed: int = 0
) -> tuple[dict[str, float], list[Image.Image]]:
    """Attribute accuracy of images generated from full captions (marks named).

    Returns:
        ``({"all": mean over shape, colour, pattern, size and mark colours, "every": share of images with
        all five right}, generated images)``.
    """
    from .pretrain import generation_prompt

    if not identities or per < 1:
        raise GateError("text_to_image_accuracy needs identities and per >= 1")
    targets = [identity for identity in identities for _ in range(per)]
    prompts = [generation_prompt(full_caption(identity)) for identity in targets]
    images = generate_images(backend, prompts, seed=seed)
    wanted = [{**t.attributes, "marks": t.mark_colours} for t in targets]
    hits = scorer.attribute_hits(images, wanted)  # one scorer pass
    return {
        "all": float(np.mean([h for row in hits for h in row])),
        "every": float(np.mean([all(row) for row in hits])),
    }, images
