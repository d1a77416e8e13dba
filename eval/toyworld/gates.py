"""Quality gates of the toy-world base artifacts (issue 8): each is measured, printed, and must pass.

* ``vq_marks``: VQ reconstructions keep the marks right (scorer's mark predictions) in >= 90% of the
  photos whose marks the scorer reads right on the original (so the gate measures the VQ, not the scorer).
* ``attribute_qa``: the base model answers attribute questions about photos of held-out identities
  (likelihood ranking over every value of the factor) >= 90%.
* ``text_to_image``: images the base model generates from held-out captions show the captioned shape,
  colour, pattern and size (scored by the scorer) >= 60% of the time.
* ``twin_probe``: a linear probe on the base model's pooled hidden states tells a held-out identity's
  photos from photos of its twins >= 80% on unseen photos.
* ``scorer_identity`` >= 95% on held-out photos and ``scorer_random`` <= 2% on random scenes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from yochameleon.errors import YoChameleonError

from .world import Identity, ToyWorld, attribute_qa, caption

__all__ = [
    "GateError",
    "GateResult",
    "THRESHOLDS",
    "attribute_qa_accuracy",
    "check_gates",
    "format_gates",
    "linear_probe_accuracy",
    "make_gate",
    "text_to_image_accuracy",
    "twin_probe_accuracy",
    "vq_mark_retention",
]

# name -> (threshold, higher_is_better)
THRESHOLDS: dict[str, tuple[float, bool]] = {
    "vq_marks": (0.90, True),
    "attribute_qa": (0.90, True),
    "text_to_image": (0.60, True),
    "twin_probe": (0.80, True),
    "scorer_identity": (0.95, True),
    "scorer_random": (0.02, False),
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
def vq_mark_retention(
    vqmodel, decoder, scorer, world: ToyWorld, identities: Sequence[Identity], per: int = 8, seed: int = 0
) -> dict[str, float]:
    """How often VQ reconstructions keep the marks right, read by the scorer.

    Returns:
        ``kept`` (the gate): marks right on the reconstruction, read at the object's place in the original,
        among photos whose original the scorer reads right; ``retained``: the same with the object located
        in the reconstruction itself (a blurred outline then also moves the cells); ``absolute``
        (``retained`` over all photos) and ``original`` (the scorer's mark accuracy on the originals).
    """
    from yochameleon.backends.chameleon_vq import reconstruct

    if not identities or per < 1:
        raise GateError("vq_mark_retention needs identities and per >= 1")
    rng = np.random.default_rng([seed, 0x7A11])
    images, owners = _photos(world, identities, per, rng)
    arrays = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    recon = []
    for start in range(0, len(arrays), 256):
        pixels = torch.from_numpy(arrays[start : start + 256]).permute(0, 3, 1, 2).float() / 127.5 - 1
        out = reconstruct(vqmodel, decoder, pixels).pixels.clamp(-1, 1)
        recon.append(((out + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    recon_arr = np.concatenate(recon)
    truth = [o.mark_map for o in owners]
    orig_ok = np.array([p["marks"] == t for p, t in zip(scorer.predict(arrays), truth)])
    rec_ok = np.array([p["marks"] == t for p, t in zip(scorer.predict(recon_arr), truth)])
    kept = np.array([p["marks"] == t for p, t in zip(scorer.predict(recon_arr, boxes_from=arrays), truth)])
    return {
        "kept": float(kept[orig_ok].mean()) if orig_ok.any() else 0.0,
        "retained": float(rec_ok[orig_ok].mean()) if orig_ok.any() else 0.0,
        "absolute": float(rec_ok.mean()),
        "original": float(orig_ok.mean()),
    }


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
) -> float:
    """Multiple-choice attribute QA on new photos: the answer with the highest likelihood must be right.

    Every value of the asked factor is a candidate answer, so chance is 1/3 to 1/8.
    """
    from .pretrain import conversation
    from .scorer import FACTOR_VALUES
    from .world import ATTRIBUTE_ANSWERS, factor_word

    if not identities or per < 1:
        raise GateError("attribute_qa_accuracy needs identities and per >= 1")
    rng = np.random.default_rng([seed, 0x0A0A])
    images, owners = _photos(world, identities, per, rng)
    spans = backend.encode_images(images)
    hits = total = 0
    for span_ids, owner in zip(spans.tolist(), owners):
        for qa in attribute_qa(owner, rng):
            human = backend.image_span(span_ids) + backend.tokenize(" " + qa.question)
            candidates = [
                ATTRIBUTE_ANSWERS[qa.factor].format(value=factor_word(qa.factor, v))
                for v in FACTOR_VALUES[qa.factor]
            ]
            rows = []
            for answer in candidates:
                ids, _ = conversation(backend, human, backend.tokenize(answer))
                rows.append((ids, len(backend.tokenize(answer)) + 1))
            best = int(np.argmax(_answer_logprob(backend, rows)))
            hits += int(candidates[best] == qa.answer)
            total += 1
    return hits / total


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
) -> tuple[float, list[Image.Image]]:
    """Attribute accuracy (shape, colour, pattern, size) of images generated from captions.

    Returns:
        The accuracy and the generated images (for inspection).
    """
    from .pretrain import generation_prompt

    if not identities or per < 1:
        raise GateError("text_to_image_accuracy needs identities and per >= 1")
    targets = [identity for identity in identities for _ in range(per)]
    prompts = [generation_prompt(caption(identity)) for identity in targets]
    images = generate_images(backend, prompts, seed=seed)
    wanted = [t.attributes for t in targets]
    return scorer.attribute_accuracy(images, wanted), images


def linear_probe_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    l2: float = 1e-2,
    steps: int = 200,
) -> float:
    """Test accuracy of an L2-regularised logistic regression (standardised features, LBFGS).

    Raises:
        GateError: on mismatched shapes or labels that are not both 0 and 1 in training.
    """
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise GateError(
            f"probe features must be 2-D with equal widths, got {train_x.shape} and {test_x.shape}"
        )
    if len(train_x) != len(train_y) or len(test_x) != len(test_y) or len(test_x) == 0:
        raise GateError("probe features and labels differ in length (or the test set is empty)")
    if set(np.unique(train_y).tolist()) != {0, 1}:
        raise GateError("probe training labels must contain both classes 0 and 1")
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.tensor((train_x - mean) / std)
    y = torch.tensor(train_y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (torch.tensor((test_x - mean) / std) @ w + b) > 0
    return float((pred.numpy() == test_y.astype(bool)).mean())


@torch.no_grad()
def image_features(backend, images: Sequence[Image.Image]) -> np.ndarray:
    """Mean final hidden state over each photo's image span (in a ``<s> <boi> ids <eoi>`` sequence)."""
    spans = backend.encode_images(list(images))
    rows = [[backend.special.bos, *backend.image_span(s)] for s in spans.tolist()]
    ids = torch.tensor(rows)
    feats = []
    for start in range(0, len(ids), 64):
        hidden, _ = backend.hidden_states(ids[start : start + 64])
        feats.append(hidden[:, 2:-1].mean(1).float().numpy())
    return np.concatenate(feats)


def twin_probe_accuracy(
    backend, world: ToyWorld, identities: Sequence[Identity], per: int = 24, seed: int = 0
) -> float:
    """Mean over identities of a linear probe's accuracy telling the identity from its twins.

    For each identity: ``per`` photos of it and ``per`` photos of random twins; the probe trains on two
    thirds and is tested on the rest (unseen photos and, mostly, unseen twins).
    """
    if not identities or per < 6:
        raise GateError("twin_probe_accuracy needs identities and per >= 6")
    rng = np.random.default_rng([seed, 0x7714])
    accs = []
    for identity in identities:
        pos = [world.render(identity, rng, distractors=int(rng.integers(0, 2))) for _ in range(per)]
        neg = [
            world.render(world.twin(identity, rng), rng, distractors=int(rng.integers(0, 2)))
            for _ in range(per)
        ]
        feats = image_features(backend, pos + neg)
        labels = np.array([1] * per + [0] * per)
        split = (2 * per) // 3
        train = np.r_[0:split, per : per + split]
        test = np.r_[split:per, per + split : 2 * per]
        accs.append(linear_probe_accuracy(feats[train], labels[train], feats[test], labels[test]))
    return float(np.mean(accs))
