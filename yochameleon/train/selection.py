"""Checkpoint selection: weighted recognition + image similarity on held-out photos.

Both parts are cheap, deterministic forward passes, so they can run every few hundred steps:

* recognition: for each positive and negative photo, compare the log-probability of answering
  "Yes" vs "No" after the forced u-tokens (the prompt and the score of
  :meth:`yochameleon.infer.PersonalizedModel.yes_no_logprobs`, from :mod:`yochameleon.conversation`);
  weighted accuracy = mean of the positive accuracy and the negative accuracy;
* image similarity: the fraction of a real photo's VQ tokens the model predicts (argmax, teacher
  forced) after the generation prompt and its g-tokens — a token-level stand-in for CLIP-I that
  needs no embedder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from yochameleon.concept import ConceptTokens
from yochameleon.conversation import turn_ids, yes_no_logprobs
from yochameleon.prompts import real_generation_request, recognition_question, substitute_identifier
from yochameleon.train.sequences import build_sequence


@dataclass
class EvalSet:
    """Held-out images of one concept, as cached VQ ids."""

    positives: list[list[int]] = field(default_factory=list)
    negatives: list[list[int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.positives)


@torch.no_grad()
def recognition_accuracy(backend, concept: ConceptTokens, eval_set: EvalSet) -> dict[str, float]:
    """Positive, negative and weighted accuracy by Yes-vs-No likelihood."""
    question = substitute_identifier(recognition_question(0), concept.sks)
    preamble = concept.personalized_prompt()

    def says_yes(image_ids: list[int]) -> bool:
        ids = turn_ids(backend, question, [concept], [image_ids], preamble=preamble)
        # The answer opens with the u-tokens; the next token is its first word.
        yes, no = yes_no_logprobs(backend, ids + concept.u_ids)
        return yes > no

    pos = [says_yes(x) for x in eval_set.positives]
    neg = [not says_yes(x) for x in eval_set.negatives]
    pos_acc = sum(pos) / len(pos) if pos else 0.0
    neg_acc = sum(neg) / len(neg) if neg else 0.0
    weighted = (pos_acc + neg_acc) / 2 if neg else pos_acc
    return {"recognition_pos": pos_acc, "recognition_neg": neg_acc, "recognition_weighted": weighted}


@torch.no_grad()
def image_token_accuracy(backend, concept: ConceptTokens, eval_set: EvalSet) -> float:
    """Mean teacher-forced argmax accuracy over the image tokens of the positive photos."""
    accs = []
    for image_ids in eval_set.positives:
        rec = {
            "task": "generation",
            "kind": "generation_real",
            "question": real_generation_request("<sks>"),
            "image": "x",
            "n_g": concept.spec.n_g,
        }
        seq = build_sequence(backend, rec, concept, image_ids)
        ids = torch.tensor([seq.input_ids], device=backend.device)
        hidden, _ = backend.hidden_states(ids)
        labels = torch.tensor(seq.labels[1:], device=backend.device)
        image = torch.tensor(backend.special.image_token_ids, device=backend.device)
        mask = torch.isin(labels, image)
        pred = backend.logits(hidden[0, :-1][mask]).argmax(-1)
        accs.append(float((pred == labels[mask]).float().mean()))
    return sum(accs) / len(accs) if accs else 0.0


def selection_score(trainer, eval_sets: dict[str, EvalSet]) -> dict[str, float]:
    """The selection metrics averaged over concepts; ``score`` = weighted recognition + image accuracy."""
    rows = []
    for name, tokens in trainer.concepts.items():
        es = eval_sets.get(name)
        if not es:
            continue
        rec = recognition_accuracy(trainer.backend, tokens, es)
        rec["image_token_acc"] = image_token_accuracy(trainer.backend, tokens, es)
        rows.append(rec)
    if not rows:
        return {"score": 0.0}
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    out["score"] = out["recognition_weighted"] + out["image_token_acc"]
    return out


def eval_set_from_records(records: list[dict], lookup, limit: int = 8) -> EvalSet:
    """Positives and negatives for selection from a concept's recognition records (no flips)."""
    es = EvalSet()
    seen: set[str] = set()
    for rec in records:
        if rec.get("kind") != "recognition" or rec.get("flip") or rec.get("image") in seen:
            continue
        seen.add(rec["image"])
        target = es.positives if rec.get("label") == "pos" else es.negatives
        if len(target) < limit:
            target.append(lookup(rec))
    return es
