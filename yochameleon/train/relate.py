"""The joint relation step: concepts trained apart learn the facts that relate them.

Concepts trained in one run (``concept.extra``) learn their relations with everything else. Concepts
trained apart each know only themselves; this step loads their concept files onto one frozen model
and trains only their rows on the relation records of the facts that relate them (both directions, see
:mod:`yochameleon.relations`), for a few hundred steps. Relation records alone pull the rows away from
what they were trained for (recognition fell from 0.65 to 0.50 in the toy world), so by default each
step also *replays* the concepts' own recognition and text-QA records, read from the data folders
their runs trained on. Each record's prompt holds
both concepts' personalized prompts and its answer names the other concept by its identifier, laid
out exactly as :meth:`~yochameleon.infer.PersonalizedModel.ask` lays out a question about related
concepts. The updated concept files record the relation and how it was learned (``relations`` in
their JSON: the facts, ``source: joint_step`` and the settings below).

Python: :func:`relate_concepts` (files in, files out) or :func:`train_relations` (concepts already
attached). CLI: ``yochameleon relate A.safetensors B.safetensors --model M --facts "..." --out DIR``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from yochameleon.backends.base import Backend
from yochameleon.concept import add_relation, detach, get_bank, load_concept, normalize_name, save_concept
from yochameleon.errors import ConceptError, ConfigError, DataError
from yochameleon.relations import Fact, parse_fact, relation_qa, split_facts
from yochameleon.train.loss import label_only_loss
from yochameleon.train.sequences import build_sequence, collate

logger = logging.getLogger(__name__)
# Understanding records only: the joint step trains nothing a generation record would need.
REPLAY_KINDS: tuple[str, ...] = ("recognition", "text_qa")


@dataclass
class RelateConfig:
    """Settings of the joint relation step (recorded in the concept files it writes).

    Args:
        steps: optimizer steps; a few hundred suffice, the records are few and short.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: records per step.
        max_grad_norm: clip the rows' gradient norm before each step (0 disables).
        repeats: copies of each relation record in the pool batches are drawn from.
        replay_batch: the concepts' own recognition and text-QA records added to each step (drawn in
            turn from every related concept's records), so the rows keep what they knew; 0 trains on
            relation records alone. A concept whose training data cannot be found is related without
            replay (a warning names the folder looked for).
        replay_kinds: the record kinds replayed.
        seed: seed of the batch order.
        self_prompting: answers open with the u-tokens of the concepts a question names, as the
            concepts were trained (``False`` for concepts trained without self-prompting).
        progress: show a progress bar (not recorded).

    Raises:
        ConfigError: (from ``__post_init__``) a value out of range.
    """

    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 4
    max_grad_norm: float = 1.0
    repeats: int = 1
    replay_batch: int = 4
    replay_kinds: tuple[str, ...] = ("recognition", "text_qa")
    seed: int = 0
    self_prompting: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.replay_kinds = tuple(self.replay_kinds)
        if self.steps < 1 or self.batch_size < 1 or self.repeats < 1:
            raise ConfigError("relate steps, batch_size and repeats must be >= 1")
        if self.replay_batch < 0:
            raise ConfigError(f"relate replay_batch must be >= 0, got {self.replay_batch}")
        unknown = [k for k in self.replay_kinds if k not in REPLAY_KINDS]
        if unknown:
            raise ConfigError(f"relate replay_kinds must be among {list(REPLAY_KINDS)}, got {unknown}")
        if self.lr <= 0:
            raise ConfigError(f"relate lr must be positive, got {self.lr}")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("relate max_grad_norm and weight_decay must be >= 0")

    def recorded(self) -> dict[str, object]:
        """The settings written to the concept files."""
        return {k: v for k, v in asdict(self).items() if k != "progress"}


@dataclass
class RelateResult:
    """What :func:`train_relations` did.

    Attributes:
        concepts: the concepts whose rows trained.
        facts: the facts, parsed.
        records: the relation records (text, ``<sks>`` = the record's concept).
        losses: the loss of every step (relation and replayed records together).
        replayed: per concept, how many of its own records were replayed from.
    """

    concepts: list[str]
    facts: list[Fact]
    records: list[dict]
    losses: list[float]
    replayed: dict[str, int] = field(default_factory=dict)


def parse_relation_facts(facts: Sequence[str], names: Sequence[str]) -> list[Fact]:
    """Parse facts for a joint step between ``names``: each must name two of them.

    Raises:
        ConceptError: no facts, a fact naming a concept that is not among ``names`` (the message
            names it), or one naming a single concept.
    """
    if not facts:
        raise ConceptError("no facts to relate the concepts with")
    parsed = []
    for text in facts:
        fact = parse_fact(text, known=names)
        if not fact.names_others:
            named = ", ".join(f"<{n}>" for n in fact.concepts) or "no concept"
            raise ConceptError(
                f"fact {fact.text!r} names {named}; a relation names two of "
                f"{', '.join(f'<{n}>' for n in names)}"
            )
        parsed.append(fact)
    return parsed


def relation_records(facts: Sequence[Fact]) -> list[dict]:
    """The relation records of ``facts`` (manifest records), each written for the first concept its fact names."""
    from yochameleon.data.records import Record

    records = []
    for fact in facts:
        own = fact.concepts[0]
        for pair in relation_qa(fact, own):
            record = Record(
                id=f"relation-{len(records):05d}",
                concept=own,
                task="understanding",
                kind="relation",
                question=pair.question,
                answer=pair.answer,
                mentions=list(pair.mentions),
                fact=pair.fact,
            )
            records.append(record.to_dict())
    return records


def train_relations(
    backend: Backend,
    facts: Sequence[str],
    config: RelateConfig | None = None,
    source: dict | None = None,
    replay: Mapping[str, tuple[list[dict], Callable[[dict], list[int]]]] | None = None,
) -> RelateResult:
    """Train the rows of the concepts ``facts`` relate (already attached) on their relation records.

    Only the rows of the concepts the facts name get gradients and updates; every base weight and
    every other attached concept stays bit-identical. Each concept records the relation
    (:func:`~yochameleon.concept.add_relation`), so a following save writes it to its file.

    Args:
        backend: the frozen model with the concepts attached.
        facts: facts naming two attached concepts each, as ``<NAME>``.
        config: the step's settings.
        source: extra provenance written into each relation entry (e.g. the concept files read).
        replay: per concept, its own manifest records and their ``record -> VQ ids`` lookup; the
            records of ``config.replay_kinds`` are replayed, ``config.replay_batch`` per step, drawn
            from the concepts in turn (see :func:`replay_data`). ``None`` or ``replay_batch=0``:
            relation records only.

    Returns:
        The concepts, facts, records, per-step losses and replayed record counts.

    Raises:
        ConceptError: see :func:`parse_relation_facts` (the known concepts are the attached ones).
    """
    from tqdm.auto import tqdm

    config = config or RelateConfig()
    bank = get_bank(backend)
    attached = dict(bank.concepts) if bank else {}
    parsed = parse_relation_facts(facts, list(attached))
    names = [n for n in attached if any(n in f.concepts for f in parsed)]
    records = relation_records(parsed)
    sequences = [
        build_sequence(backend, rec, attached[rec["concept"]], None, config.self_prompting, others=attached)
        for rec in records
    ] * config.repeats
    replayed = _replay_sequences(backend, attached, names, replay or {}, config)
    params = [p for n in names for p in bank.parameters(n)]
    # The other attached concepts' rows get no gradient at all, not merely no update.
    frozen = [p for p in bank.parameters() if all(p is not q for q in params) and p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    order: list[int] = []
    turns = _Turns(replayed, config.replay_batch, random.Random(config.seed + 1))
    losses: list[float] = []
    for p in frozen:
        p.requires_grad_(False)
    try:
        for _ in tqdm(range(config.steps), desc="relate", disable=not config.progress):
            if len(order) < config.batch_size:
                # Each pass over the pool in a new order; a step never draws a record twice.
                order += rng.sample(range(len(sequences)), len(sequences))
            idx, order = order[: config.batch_size], order[config.batch_size :]
            drawn = [sequences[i] for i in idx] + turns.draw()
            batch = collate(drawn, backend.special.pad).to(backend.device)
            optimizer.zero_grad(set_to_none=True)
            loss, _ = label_only_loss(backend, batch)
            if not torch.isfinite(loss):
                raise DataError(f"the relation loss became {float(loss)} at step {len(losses) + 1}; lower lr")
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p in params:
            p.grad = None
    settings = {**config.recorded(), **(source or {})}
    for name in names:
        for other in names:
            mine = [f for f in parsed if name in f.concepts and other in f.concepts]
            if other == name or not mine:
                continue
            add_relation(
                backend,
                name,
                {
                    "with": other,
                    "facts": [f.to_dict() for f in mine],
                    "source": "joint_step",
                    "settings": settings,
                    "records": sum(1 for r in records if r["fact"] in {f.text for f in mine}),
                    "replayed": {n: len(replayed.get(n, [])) for n in names} if config.replay_batch else {},
                    "loss": {"first": losses[0], "last": losses[-1]},
                },
            )
    return RelateResult(names, parsed, records, losses, {n: len(replayed.get(n, [])) for n in names})


def _replay_sequences(backend, attached, names, replay, config: RelateConfig) -> dict[str, list]:
    """Each related concept's own records of ``config.replay_kinds`` as sequences (none without data)."""
    if not config.replay_batch:
        return {}
    out = {}
    for name in names:
        records, lookup = replay.get(name, ([], None))
        chosen = [r for r in records if r["kind"] in config.replay_kinds and not r.get("mentions")]
        out[name] = [
            build_sequence(
                backend,
                rec,
                attached[name],
                lookup(rec) if rec.get("image") else None,
                config.self_prompting,
                others=attached,
            )
            for rec in chosen
        ]
    return {n: seqs for n, seqs in out.items() if seqs}


class _Turns:
    """Replayed sequences, ``k`` per draw, taken from the concepts in turn, each list in a fresh order per pass."""

    def __init__(self, sequences: Mapping[str, list], k: int, rng: random.Random) -> None:
        self.sequences, self.k, self.rng = dict(sequences), k, rng
        self.queues: dict[str, list[int]] = {n: [] for n in self.sequences}
        self.names = list(self.sequences)
        self.turn = 0

    def draw(self) -> list:
        picked = []
        for _ in range(self.k if self.names else 0):
            name = self.names[self.turn % len(self.names)]
            self.turn += 1
            queue = self.queues[name]
            if not queue:
                queue.extend(self.rng.sample(range(len(self.sequences[name])), len(self.sequences[name])))
            picked.append(self.sequences[name][queue.pop()])
        return picked


def run_entry(meta) -> dict:
    """The concept's own entry (``concept`` or one of ``concept.extra``) in the run a concept file records, or ``{}``."""
    concept = (meta.training_config or {}).get("concept") or {}
    entries = [concept, *(concept.get("extra") or [])]
    return next((e for e in entries if normalize_name(str(e.get("name"))) == meta.name), {})


def replay_data(backend: Backend, meta, path: str | Path = "concept file"):
    """The records a concept file's run trained on and their token lookup, or ``None`` when gone.

    The run's recipe (``training_config``) names the concept's data folder (``concept.data_dir``, or
    ``OUTPUT_DIR/data/NAME`` by default, ``concept.extra`` entries included); its manifest is read and
    its images tokenized through the shared token cache.

    Returns:
        ``(records, lookup)``, or ``None`` (with a warning naming the folder) when the recipe names
        no folder or the folder has no valid manifest.
    """
    from yochameleon.data.manifest import read_manifest
    from yochameleon.data.pipeline import token_lookup
    from yochameleon.train.config import default_data_dir

    entry = run_entry(meta)
    output_dir = (meta.training_config or {}).get("output_dir")
    folder = entry.get("data_dir") or (
        default_data_dir(output_dir, str(entry["name"])) if output_dir and entry else None
    )
    if not folder:
        logger.warning("%s records no training data folder: relating %s without replay", path, meta.name)
        return None
    try:
        manifest = read_manifest(folder)
    except DataError as exc:
        logger.warning("relating %s without replay: its training data is unreadable (%s)", meta.name, exc)
        return None
    return manifest.record_dicts(), token_lookup(backend, manifest, progress=False)


def facts_from_folders(files: Sequence[str | Path]) -> list[str]:
    """The facts relating the concepts of ``files``, read from the concept folders they were trained from.

    Each concept file records its run's recipe; the ``concept.yaml`` of the concept's folder there
    is read (a file recording none, or a folder that is gone, is skipped), and its facts naming
    another of the concepts are kept.

    Raises:
        ConceptError: a malformed fact in a folder (see :func:`yochameleon.relations.split_facts`).
    """
    from yochameleon.concept import read_concept_file
    from yochameleon.data.concept_folder import CONCEPT_YAML, read_concept_yaml

    metas = [read_concept_file(f)[0] for f in files]
    names = {normalize_name(m.name) for m in metas}
    facts: list[str] = []
    for path, meta in zip(files, metas, strict=True):
        folder = run_entry(meta).get("concept_dir")
        if not folder or not Path(folder).is_dir():
            # The other concept's folder may state the fact; none stating any is refused by the caller.
            logger.info("%s records no concept folder to read facts from", path)
            continue
        _, related = split_facts(read_concept_yaml(Path(folder) / CONCEPT_YAML).get("facts", []), meta.name)
        for fact in related:
            if set(fact.concepts) <= names and fact.text not in facts:
                facts.append(fact.text)
    return facts


def relate_concepts(
    backend: Backend,
    files: Sequence[str | Path],
    facts: Sequence[str] | None,
    out_dir: str | Path,
    config: RelateConfig | None = None,
) -> list[Path]:
    """Load concept files, learn the facts relating them, write updated concept files.

    The concepts are attached to ``backend`` for the step and detached afterwards (concepts that
    were attached before stay, bit-identical). A concept the facts do not name is written back
    unchanged.

    Args:
        backend: the frozen base model the files were trained on.
        files: two (or more) concept files, trained apart.
        facts: facts naming two of the concepts each (``"<bo> is the brother of <mắm>"``); ``None``
            reads them from the concept folders the files record (:func:`facts_from_folders`).
        out_dir: where ``NAME.safetensors`` + ``NAME.json`` are written for each concept.
        config: the step's settings.

    Returns:
        The written ``.safetensors`` paths, in the order of ``files``.

    Raises:
        ConceptError: fewer than two files, a fact naming a concept not among them (the message
            names it), or no facts.
    """
    from yochameleon.concept import read_concept_file

    if len(files) < 2:
        raise ConceptError(f"relate needs at least two concept files, got {len(files)}")
    if facts is None:
        facts = facts_from_folders(files)
        if not facts:
            raise ConceptError(
                "the concept folders these files were trained from state no facts relating "
                f"{', '.join(map(str, files))}; give them (--facts)"
            )
    loaded = []
    try:
        for f in files:
            loaded.append(load_concept(backend, f).spec.name)
        metas = {name: read_concept_file(f)[0] for name, f in zip(loaded, files, strict=True)}
        known = set(loaded)
        for text in facts:
            parse_fact(text, known=known)  # a concept attached before, but not given, is refused too
        source = {"files": {name: str(f) for name, f in zip(loaded, files, strict=True)}}
        replay = {}
        if (config or RelateConfig()).replay_batch:
            for name, f in zip(loaded, files, strict=True):
                data = replay_data(backend, metas[name], f)
                if data is not None:
                    replay[name] = data
        result = train_relations(backend, facts, config, source=source, replay=replay)
        logger.info(
            "related %s: loss %.4f -> %.4f over %d steps",
            " and ".join(result.concepts),
            result.losses[0],
            result.losses[-1],
            len(result.losses),
        )
        out = Path(out_dir)
        return [
            save_concept(backend, name, out / name, training_config=metas[name].training_config)[0]
            for name in loaded
        ]
    finally:
        for name in loaded:
            detach(backend, name)


__all__ = [
    "RelateConfig",
    "RelateResult",
    "facts_from_folders",
    "parse_relation_facts",
    "relate_concepts",
    "relation_records",
    "replay_data",
    "run_entry",
    "train_relations",
]
