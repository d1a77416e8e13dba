"""Records -> token sequences with self-prompting targets, and batches with right padding.

A sequence is ``<s> human <eot> bot <eot>``; the loss covers the bot span and the closing
``<eot>`` only. With self-prompting the bot span first names its task's token set:

* understanding: ``<u1>…<uM>`` + answer + ``<eot>``
* generation: the sample's ``<g1>…<gm>`` + ``<boi>`` image ``<eoi>`` + ``<eot>``

The human turn and the answer text are encoded by :mod:`yochameleon.conversation`, the same code
inference and evaluation use, so a trained concept sees at inference exactly the ids it was trained on.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from yochameleon.backends.base import Backend
from yochameleon.concept import ConceptTokens, normalize_name
from yochameleon.conversation import encode_text, turn_ids
from yochameleon.errors import DataError
from yochameleon.prompts import (
    SKS,
    real_generation_request,
    soft_positive_prompt,
    substitute_identifier,
)

IGNORE = -100
_NAME = re.compile(r"<([^<>\s/\\]+)>")


@dataclass
class Sequence:
    """One training sample as ids. ``labels`` is ``IGNORE`` outside the bot span."""

    input_ids: list[int]
    labels: list[int]
    kind: str
    concept: str

    def __len__(self) -> int:
        return len(self.input_ids)


def build_sequence(
    backend: Backend,
    record: dict,
    concept: ConceptTokens,
    image_ids: list[int] | None,
    self_prompting: bool = True,
    others: Mapping[str, ConceptTokens] | None = None,
) -> Sequence:
    """Render one manifest record for ``concept`` into ids and labels.

    A record that names other concepts (a relation, ``record["mentions"]``) is laid out as
    :meth:`~yochameleon.infer.PersonalizedModel.ask` lays out a question about related concepts:
    the personalized prompts of the concepts the question names (in order of appearance, ``<sks>``
    being ``concept``), then of those only the answer names; the answer opens with the u-tokens of
    the concepts the question names, in turn, and names the others by their identifiers.

    Args:
        backend: the base model (tokenizer, special ids, image spans).
        record: a manifest record (see ``yochameleon.data.manifest``).
        concept: the placed concept tokens.
        image_ids: the record's cached VQ ids, or ``None`` for text-only records.
        self_prompting: prefix targets with the task's token set.
        others: the other concepts a record may name, by name (the run's other concepts, or the
            attached ones).

    Raises:
        DataError: a generation record without an image or with too many g-tokens, or a record
            naming a concept that is not in ``others``.
    """
    sp = backend.special
    sks = concept.sks
    pp = concept.personalized_prompt()
    kind = record["kind"]
    if record.get("mentions"):
        return _relation_sequence(backend, record, concept, image_ids, self_prompting, others or {})
    if record["task"] == "understanding":
        human = substitute_identifier(record["question"], sks)
        preamble = pp
        images = [image_ids] if image_ids is not None else []
        prefix = concept.u_ids if self_prompting else []
        answer = substitute_identifier(record["answer"], sks)
        bot = prefix + encode_text(backend, answer, [concept])
    else:
        if image_ids is None:
            raise DataError(f"generation record {record.get('id')} has no image")
        n = int(record.get("n_g") or concept.spec.n_g)
        if not 1 <= n <= concept.spec.n_g:
            # The slices below would silently hand back fewer g-tokens than the record asks for.
            raise DataError(
                f"generation record {record.get('id')} asks for {n} g-tokens, but concept "
                f"{concept.spec.name!r} has {concept.spec.n_g}; prepare its data with concept.n_g={concept.spec.n_g}"
            )
        g = concept.g_strings[:n]
        if kind == "generation_soft":
            human, preamble = soft_positive_prompt(sks, g, record.get("prompt_form") or "paper"), ""
        else:
            human, preamble = substitute_identifier(real_generation_request(sks), sks), pp
        images = []
        prefix = concept.g_ids[:n] if self_prompting else []
        bot = prefix + backend.image_span(image_ids)
    human_ids = turn_ids(backend, human, [concept], images, preamble=preamble)
    bot = bot + [sp.eot]
    return Sequence(human_ids + bot, [IGNORE] * len(human_ids) + bot, kind, concept.spec.name)


def _relation_sequence(
    backend: Backend,
    record: dict,
    concept: ConceptTokens,
    image_ids: list[int] | None,
    self_prompting: bool,
    others: Mapping[str, ConceptTokens],
) -> Sequence:
    by_name = {normalize_name(n): c for n, c in others.items()}
    missing = [n for n in record["mentions"] if normalize_name(n) not in by_name]
    if missing:
        names = ", ".join(f"<{n}>" for n in missing)
        listed = ", ".join(f"<{n}>" for n in by_name if n != concept.spec.name) or "none"
        raise DataError(
            f"record {record.get('id')} of concept {concept.spec.name!r} names {names}, which is not "
            f"trained in this run or attached (other concepts: {listed}); train them together "
            f"(concept.extra) or relate them afterwards (yochameleon relate)"
        )
    by_name[SKS[1:-1]] = concept

    def named(text: str) -> list[ConceptTokens]:
        found: list[ConceptTokens] = []
        for m in _NAME.finditer(text):
            c = by_name.get(normalize_name(m.group(1)))
            if c is not None and c not in found:
                found.append(c)
        return found

    def write(text: str) -> str:
        def sub(m: re.Match) -> str:
            c = by_name.get(normalize_name(m.group(1)))
            return c.sks if c is not None else m.group(0)

        return _NAME.sub(sub, text)

    asked = named(record["question"])
    cast = asked + [c for c in named(record["answer"]) if c not in asked]
    preamble = " ".join(c.personalized_prompt() for c in cast)
    images = [image_ids] if image_ids is not None else []
    human_ids = turn_ids(backend, write(record["question"]), cast, images, preamble=preamble)
    prefix = [i for c in asked for i in c.u_ids] if self_prompting else []
    bot = prefix + encode_text(backend, write(record["answer"]), cast) + [backend.special.eot]
    return Sequence(human_ids + bot, [IGNORE] * len(human_ids) + bot, record["kind"], concept.spec.name)


@dataclass
class Batch:
    """Right-padded tensors. ``position_ids`` count from 0 on every row; padding is masked."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    kinds: list[str]

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.kinds,
        )


def collate(sequences: list[Sequence], pad_id: int, pad_to: int | None = None) -> Batch:
    """Right-pad ``sequences`` to the longest (or ``pad_to``) with correct position ids."""
    width = max(len(s) for s in sequences) if pad_to is None else pad_to
    n = len(sequences)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(sequences):
        t = len(s)
        ids[i, :t] = torch.tensor(s.input_ids)
        labels[i, :t] = torch.tensor(s.labels)
        mask[i, :t] = 1
    pos = torch.arange(width).unsqueeze(0).expand(n, -1).contiguous()
    return Batch(ids, labels, mask, pos, [s.kind for s in sequences])


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, group: int = 32
) -> list[list[int]]:
    """Shuffled batches whose members have similar lengths, so little compute goes to padding.

    Indices are shuffled, cut into mega-batches of ``group * batch_size``, sorted by length inside
    each, cut into batches, and the batches shuffled. Deterministic for a seed, so a resumed run
    sees the same order.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = group * batch_size
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def steps_per_epoch(n: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(math.ceil(n / batch_size) / grad_accum)
