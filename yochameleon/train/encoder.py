"""Training a concept encoder on many identities at once, the base model frozen.

``yochameleon encoder train RECIPE.yaml`` (or :func:`train_encoder`) reuses the trainer's pieces
whole: each identity's data is prepared and read as ``train`` prepares and reads it
(:func:`~yochameleon.data.pipeline.load_training_data`), its records become sequences with
:func:`~yochameleon.train.sequences.build_sequence`, and a micro-batch's loss is
:func:`~yochameleon.train.loss.label_only_loss`: the same self-prompting recognition (with retrieved
negatives), text-QA and generation losses. Only where the rows come from differs.

One *slot* concept is attached to the frozen model, and every identity's sequences are built on its
token ids (a concept's rows do not depend on which ids hold them). A micro-batch holds the sequences
of one identity; for it the encoder reads ``k`` of that identity's photos (``k`` drawn between
``encoder.min_photos`` and ``encoder.max_photos``), writes its rows into the slot, the loss's backward
leaves the gradient of the rows on the slot, and that gradient is carried on through the encoder
(the chain rule, in two steps: the loss code computes row gradients exactly as in ``train``).
``optim.grad_accum`` micro-batches, so that many identities, make one optimizer step.

Checkpoints, ``--resume`` (bit-identical on a CPU with the run's thread count), the run lock,
loggers (JSONL / stdout / W&B) and the progress bar behave as in ``train``. The encoder is written
to ``RUN/encoder.safetensors`` + ``RUN/encoder.json``, the sidecar listing every training identity.
One process, no mixed precision.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from yochameleon.backends import LoadOptions, load_backend
from yochameleon.backends.base import Backend
from yochameleon.concept import ConceptSpec, attach, concept_rows, detach, get_bank, validate_concept_name
from yochameleon.config import to_dict
from yochameleon.data.config import DataConfig
from yochameleon.encoder import (
    ConceptEncoder,
    EncoderConfig,
    EncoderFileMeta,
    encoder_paths,
    photo_features,
    save_encoder,
)
from yochameleon.errors import ConceptError, ConfigError, TrainingError
from yochameleon.train.checkpoint import (
    RunLock,
    check_run_dir,
    load_checkpoint,
    remove_stale_tmp,
    run_threads,
    save_checkpoint,
    write_run_meta,
)
from yochameleon.train.config import LoggingConfig, MethodConfig, ModelConfig, OptimConfig
from yochameleon.train.loggers import build_logger
from yochameleon.train.loss import label_only_loss
from yochameleon.train.sequences import Sequence, build_sequence, collate, length_grouped_batches
from yochameleon.train.trainer import (
    StepReporter,
    labelled_weight,
    lr_lambda,
    optimizer_step,
    resolve_device,
)

logger = logging.getLogger(__name__)

# The name of the one concept every identity's sequences are built on during encoder training.
SLOT = "encoder-slot"
ENCODER_FILE = "encoder"


@dataclass
class TokenLayoutConfig:
    """The token layout of the concepts the encoder writes (as ``train``'s ``concept`` section).

    Args:
        n_g: generation tokens.
        n_u: understanding tokens (0 with ``shared``).
        shared: one token set for both tasks.
    """

    n_g: int = 16
    n_u: int = 16
    shared: bool = False

    def __post_init__(self) -> None:
        try:
            ConceptSpec(SLOT, self.n_g, self.n_u, self.shared)
        except ConceptError as exc:
            raise ConfigError(f"concept: {exc}") from exc


@dataclass
class EncoderTrainConfig:
    """An encoder training run: ``yochameleon encoder train RECIPE.yaml [key.sub=value ...]``.

    Args:
        output_dir: the run directory (checkpoints, metrics, ``encoder.safetensors`` + ``.json``).
        seed: seed of the encoder's initialisation, the batch order and the photo draws.
        model: the frozen base model.
        concept: the token layout of the concepts the encoder writes.
        identities: training identities as ``[{concept_dir, name, data_dir}]`` (``name``: default
            the folder's ``concept.yaml`` name or the folder name; ``data_dir``: default
            ``OUTPUT_DIR/data/NAME``, prepared there when missing, as ``train`` does).
        identities_file: a text file listing more concept folders, one per line (relative to the
            file's folder; blank lines and ``#`` comments are skipped).
        data: how each identity's records are built (the same section as ``train``'s).
        encoder: architecture and photo features.
        optim: AdamW over the encoder's weights; ``grad_accum`` is the number of identities (one
            micro-batch each) per optimizer step; an epoch is one pass over every identity's records.
        method: self-prompting, task weights, logits chunk (as in ``train``).
        logging: loggers, progress bar.
        save_every: checkpoint every N optimizer steps (and at the end).
        keep_checkpoints: how many step checkpoints to keep.
    """

    output_dir: str = "runs/encoder"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    concept: TokenLayoutConfig = field(default_factory=TokenLayoutConfig)
    identities: list[dict[str, str]] = field(default_factory=list)
    identities_file: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    save_every: int = 50
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        for item in self.identities:
            unknown = set(item) - {"name", "concept_dir", "data_dir"}
            if unknown or not item.get("concept_dir"):
                raise ConfigError(f"identities items need concept_dir (and name/data_dir); got {item}")
        if self.save_every < 1:
            raise ConfigError("save_every must be >= 1")

    def identity_entries(self) -> list[dict[str, str]]:
        """Every training identity as ``{name, concept_dir, data_dir}``, in recipe order.

        Raises:
            ConfigError: no identities, an unreadable ``identities_file``, a bad or repeated name.
        """
        from yochameleon.data.concept_folder import CONCEPT_YAML, read_concept_yaml
        from yochameleon.errors import DataError

        items = [dict(item) for item in self.identities]
        if self.identities_file:
            path = Path(self.identities_file)
            if not path.is_file():
                raise ConfigError(f"identities_file {path} does not exist")
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    folder = Path(line) if Path(line).is_absolute() else path.parent / line
                    items.append({"concept_dir": str(folder)})
        if not items:
            raise ConfigError(
                "an encoder trains on many identities: list them in identities or identities_file"
            )
        entries, seen = [], set()
        for item in items:
            folder = Path(item["concept_dir"])
            name = item.get("name")
            if not name:
                try:
                    name = read_concept_yaml(folder / CONCEPT_YAML).get("name") or folder.resolve().name
                except DataError as exc:
                    raise ConfigError(str(exc)) from exc
            try:
                name = validate_concept_name(name)
            except ConceptError as exc:
                raise ConfigError(f"identity {folder}: {exc}") from exc
            if name in seen:
                raise ConfigError(f"two training identities are named {name!r}; give one another name")
            seen.add(name)
            data_dir = item.get("data_dir") or str(Path(self.output_dir) / "data" / name)
            entries.append({"name": name, "concept_dir": str(folder), "data_dir": data_dir})
        return entries


@dataclass
class Identity:
    """One training identity: its photo features and its sequences (built on the slot's ids)."""

    name: str
    concept_dir: str
    data_dir: str
    features: torch.Tensor
    photo_sha256: list[str]
    sequences: list[Sequence] = field(default_factory=list)


@dataclass
class EncoderTrainResult:
    """What a finished encoder run produced."""

    run_dir: Path
    encoder_file: Path
    steps: int
    losses: list[float]
    identities: list[str]


class EncoderTrainer:
    """Trains a :class:`~yochameleon.encoder.ConceptEncoder` on a frozen backend (see the module docstring).

    Args:
        config: the validated recipe.
        backend: an already-loaded backend; loaded from ``config.model`` when ``None``.
    """

    def __init__(self, config: EncoderTrainConfig, backend: Backend | None = None) -> None:
        self.cfg = config
        self.run_dir = Path(config.output_dir)
        if backend is None:
            m = config.model
            backend = load_backend(
                m.name_or_path,
                LoadOptions(dtype=m.dtype, quantization=m.quantization, device=resolve_device(m.device)),
            )
        self.backend = backend
        self.identities: list[Identity] = []
        self.encoder: ConceptEncoder | None = None
        self.slot = None
        self.step = 0
        self.losses: list[float] = []

    @property
    def feature_tokens(self) -> int:
        """Feature vectors per photo: 1, or the image tokens of a photo (``encoder.features: tokens``)."""
        features = self.identities[0].features if self.identities else None
        return int(features.shape[1]) if features is not None and features.dim() == 3 else 1

    # ----- set-up -----------------------------------------------------------------------------
    def setup(
        self,
        records: dict[str, list[dict]] | None = None,
        image_ids: Any = None,
        features: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Read (or prepare) every identity's data, compute its photo features, build the encoder.

        Args:
            records: ``{identity: [manifest records]}``; read/prepared from the data dirs when ``None``.
            image_ids: with ``records``, a callable ``record -> VQ ids``.
            features: ``{identity: [k, F]}`` photo features; computed from the folders' photos when ``None``.

        Raises:
            TrainingError: an identity without training sequences.
        """
        from yochameleon.data.concept_folder import ConceptFolder
        from yochameleon.data.photos import file_sha256, load_image_file

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        loaded = []
        # Data first, with no concept attached: preparing a folder without qa.jsonl asks the base model.
        for entry in cfg.identity_entries():
            if records is not None:
                recs, lookup = records[entry["name"]], image_ids
            else:
                from yochameleon.data.pipeline import load_training_data

                recs, lookup = load_training_data(self.backend, entry, entry["data_dir"], cfg)
            folder = None
            if features is None or Path(entry["concept_dir"], "photos").is_dir():
                folder = ConceptFolder.load(entry["concept_dir"], min_photos=cfg.encoder.min_photos)
            if features is not None:
                feats = features[entry["name"]]
            else:
                images = [load_image_file(p) for p in folder.photo_paths]
                feats = photo_features(self.backend, images, cfg.encoder.features)
            # Photo hashes in the sidecar let a benchmark check that its test photos were never seen.
            shas = [file_sha256(p) for p in folder.photo_paths] if folder is not None else []
            ident = Identity(entry["name"], entry["concept_dir"], entry["data_dir"], feats.float(), shas)
            loaded.append((ident, recs, lookup))
        spec = ConceptSpec(SLOT, cfg.concept.n_g, cfg.concept.n_u, cfg.concept.shared)
        self.slot = attach(self.backend, spec)
        kinds = set(cfg.data.tasks)
        for ident, recs, lookup in loaded:
            for rec in recs:
                if rec["kind"] not in kinds:
                    continue
                ids = lookup(rec) if rec.get("image") else None
                ident.sequences.append(
                    build_sequence(self.backend, rec, self.slot, ids, cfg.method.self_prompting)
                )
            if not ident.sequences:
                raise TrainingError(
                    f"identity {ident.name!r} has no training sequences: check data.tasks and its data"
                )
            self.identities.append(ident)
        # A photo's features: [F], or [T, F] with one vector per image token (features: tokens).
        feature_shapes = {tuple(i.features.shape[1:]) for i in self.identities}
        if len(feature_shapes) != 1:
            raise TrainingError(
                f"identities have photo features of different shapes: {sorted(feature_shapes)}"
            )
        self.encoder = ConceptEncoder(
            feature_shapes.pop()[-1],
            self.backend.hidden_size,
            spec.n_tokens,
            cfg.encoder,
            base_rows=concept_rows(self.backend, SLOT),
            feature_tokens=self.feature_tokens,
        ).to(self.backend.device)

    # ----- state ------------------------------------------------------------------------------
    def _state_tensors(self, optimizer) -> dict[str, torch.Tensor]:
        tensors = {f"encoder/{k}": v for k, v in self.encoder.state_dict().items()}
        for i, p in enumerate(self.encoder.parameters()):
            st = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    tensors[f"optim/{i}/{key}"] = st[key]
            if "step" in st:
                tensors[f"optim/{i}/step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        return tensors

    def _restore(self, tensors: dict[str, torch.Tensor], optimizer) -> None:
        prefix = "encoder/"
        self.encoder.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
        for i, p in enumerate(self.encoder.parameters()):
            if f"optim/{i}/exp_avg" in tensors:
                optimizer.state[p] = {
                    "step": tensors[f"optim/{i}/step"].reshape(()).clone(),
                    "exp_avg": tensors[f"optim/{i}/exp_avg"].to(p.device).clone(),
                    "exp_avg_sq": tensors[f"optim/{i}/exp_avg_sq"].to(p.device).clone(),
                }

    def _micro_batches(self, epoch: int) -> list[tuple[int, list[int]]]:
        """``(identity index, sequence indices)`` of every micro-batch of ``epoch``, in training order.

        A function of the seed and the epoch only, so a resumed run rebuilds the same order.
        """
        o, seed = self.cfg.optim, self.cfg.seed
        micro = []
        for i, ident in enumerate(self.identities):
            lengths = [len(s) for s in ident.sequences]
            batches = length_grouped_batches(lengths, o.batch_size, seed + 7919 * epoch + i)
            micro += [(i, b) for b in batches]
        random.Random(f"{seed}:{epoch}").shuffle(micro)
        return micro

    def _photo_subset(self, ident: Identity, step: int, j: int) -> list[int]:
        """The photos micro-batch ``j`` of step ``step`` encodes: ``k`` of them, drawn from the step number."""
        e = self.cfg.encoder
        n = ident.features.shape[0]
        rng = random.Random(f"{self.cfg.seed}:{step}:{j}")
        k = rng.randint(min(e.min_photos, n), min(e.max_photos, n))
        return sorted(rng.sample(range(n), k))

    @torch.no_grad()
    def evaluate(self, photos_shift: int = 0, kinds: tuple[str, ...] | None = None) -> dict[str, float]:
        """Each identity's mean loss over its sequences with the rows the encoder writes now.

        The encoder reads the first ``encoder.max_photos`` photos of each identity (the same set
        every call), so two calls compare the encoder and nothing else.

        Args:
            photos_shift: identity ``i`` is scored with the rows written from the photos of identity
                ``i + photos_shift`` (cyclically). With a shift, the loss rising above the unshifted
                one is what the encoder reads from *these* photos; equal losses mean it writes the
                same rows for every object.
            kinds: score only sequences of these record kinds (``recognition``: the twins and other
                negatives, where one object differs from another); ``None``: all.

        Returns:
            ``{identity: loss, ..., "mean": token-weighted mean over every identity}`` (identities
            without sequences of ``kinds`` are left out).
        """
        if self.encoder is None:
            raise TrainingError("call setup() before evaluate()")
        bank = get_bank(self.backend)
        attached_here = bank is None or SLOT not in bank.concepts
        if attached_here and attach(self.backend, self.slot).ids != self.slot.ids:
            detach(self.backend, SLOT)
            raise TrainingError("the training slot's ids are taken by another concept; detach it first")
        bank = get_bank(self.backend)
        try:
            out, total, weight = {}, 0.0, 0.0
            device = self.backend.device
            n = len(self.identities)
            for i, ident in enumerate(self.identities):
                source = self.identities[(i + photos_shift) % n]
                feats = source.features[: self.cfg.encoder.max_photos].to(device).unsqueeze(0)
                rows = self.encoder(feats)
                bank.embedding.rows[SLOT].copy_(rows["embed"][0])
                bank.head.rows[SLOT].copy_(rows["head"][0])
                sequences = [s for s in ident.sequences if kinds is None or s.kind in kinds]
                if not sequences:
                    continue
                num = den = 0.0
                for start in range(0, len(sequences), self.cfg.optim.batch_size):
                    seqs = sequences[start : start + self.cfg.optim.batch_size]
                    w = sum(labelled_weight(s, self.cfg.method.task_weights) for s in seqs)
                    batch = collate(seqs, self.backend.special.pad).to(device)
                    loss, _ = label_only_loss(
                        self.backend, batch, self.cfg.method.task_weights, self.cfg.method.logits_chunk
                    )
                    num, den = num + float(loss) * w, den + w
                out[ident.name] = num / max(den, 1e-8)
                total, weight = total + num, weight + den
            out["mean"] = total / max(weight, 1e-8)
            return out
        finally:
            if attached_here:
                detach(self.backend, SLOT)

    # ----- the loop ---------------------------------------------------------------------------
    def train(self, resume: bool = False) -> EncoderTrainResult:
        """Run (or resume) training; write ``RUN/encoder.safetensors`` + ``.json``; detach the slot."""
        if self.encoder is None:
            raise TrainingError("call setup() before train()")
        try:
            return self._train(resume)
        finally:
            # The backend is left as it was found (a benchmark goes on using it).
            bank = get_bank(self.backend)
            if bank is not None and SLOT in bank.concepts:
                detach(self.backend, SLOT)

    def _train(self, resume: bool) -> EncoderTrainResult:
        from tqdm.auto import tqdm

        cfg, o = self.cfg, self.cfg.optim
        resolved = to_dict(cfg)
        # Read-only and before the lock: a refused start leaves the run directory untouched.
        old_meta = check_run_dir(self.run_dir, resolved, resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.run_dir).acquire()
        threads_before = torch.get_num_threads()
        try:
            threads = run_threads(old_meta, self.backend.device)
            torch.set_num_threads(threads)
            remove_stale_tmp(self.run_dir)
            write_run_meta(self.run_dir, resolved, threads)
            ckpt = load_checkpoint(self.run_dir) if resume else None
            params = list(self.encoder.parameters())
            optimizer = torch.optim.AdamW(
                params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
            )
            steps_per_epoch = math.ceil(len(self._micro_batches(0)) / o.grad_accum)
            total = steps_per_epoch * o.epochs
            if o.max_steps is not None:
                total = min(total, o.max_steps)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, total))
            if ckpt is not None:
                tensors, state = ckpt
                self._restore(tensors, optimizer)
                self.step = state["step"]
                self.losses = state.get("losses", [])
                scheduler.last_epoch = self.step
                for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                    group["lr"] = base * scheduler.lr_lambdas[0](self.step)
                logger.info("resumed %s at step %d", self.run_dir, self.step)
            log = build_logger(cfg.logging, self.run_dir)
            log.log_config(resolved)
            bar = tqdm(total=total, initial=self.step, desc="encoder", disable=not cfg.logging.progress)
            task_weights = cfg.method.task_weights
            bank = get_bank(self.backend)
            slot_embed, slot_head = bank.embedding.rows[SLOT], bank.head.rows[SLOT]
            device = self.backend.device
            report = StepReporter(bar, log, cfg.logging.every, scheduler)
            while self.step < total:
                epoch = self.step // steps_per_epoch
                micro = self._micro_batches(epoch)
                # As in ``train``: the first micro-batch of the first step not yet taken this epoch.
                start = (self.step - epoch * steps_per_epoch) * o.grad_accum
                groups = [micro[i : i + o.grad_accum] for i in range(start, len(micro), o.grad_accum)]
                for group in groups:
                    if self.step >= total:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    # Each micro-batch's mean loss weighs by its share of the step's labelled tokens,
                    # so the step's gradient is the mean over all of them (as in ``train``).
                    weights = [
                        sum(labelled_weight(self.identities[i].sequences[s], task_weights) for s in idx)
                        for i, idx in group
                    ]
                    step_weight = sum(weights) or 1.0
                    step_loss, kinds_loss, n_tokens = 0.0, {}, 0
                    for j, ((i, idx), weight) in enumerate(zip(group, weights, strict=True)):
                        ident = self.identities[i]
                        photos = self._photo_subset(ident, self.step, j)
                        rows = self.encoder(ident.features[photos].to(device).unsqueeze(0))
                        embed, head = rows["embed"][0], rows["head"][0]
                        with torch.no_grad():
                            slot_embed.copy_(embed)
                            slot_head.copy_(head)
                        slot_embed.grad = slot_head.grad = None
                        batch = collate([ident.sequences[s] for s in idx], self.backend.special.pad).to(
                            device
                        )
                        loss, per_kind = label_only_loss(
                            self.backend, batch, task_weights, cfg.method.logits_chunk
                        )
                        if not torch.isfinite(loss):
                            self._stop_non_finite(optimizer, loss, log)
                        (loss * (weight / step_weight)).backward()
                        # The chain rule's second half: d loss / d rows (left on the slot) into the encoder.
                        grads = [
                            g if g is not None else torch.zeros_like(t)
                            for g, t in ((slot_embed.grad, embed), (slot_head.grad, head))
                        ]
                        torch.autograd.backward([embed, head], grads)
                        step_loss += loss.item() * (weight / step_weight)
                        kinds_loss.update(per_kind)
                        n_tokens += int(batch.attention_mask.sum())
                    slot_embed.grad = slot_head.grad = None
                    grad_norm = optimizer_step(params, optimizer, scheduler, o.max_grad_norm)
                    self.step += 1
                    self.losses.append(step_loss)
                    report(self.step, epoch, step_loss, grad_norm, n_tokens, kinds_loss)
                    if self.step % cfg.save_every == 0 or self.step == total:
                        self._save(optimizer)
            bar.close()
            st_path, _ = self.save(self.run_dir / ENCODER_FILE)
            log.close()
            return EncoderTrainResult(
                self.run_dir, st_path, self.step, self.losses, [i.name for i in self.identities]
            )
        finally:
            torch.set_num_threads(threads_before)
            lock.release()

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write the encoder file with its sidecar (base model, layout, training identities)."""
        cfg = self.cfg
        meta = EncoderFileMeta(
            n_g=cfg.concept.n_g,
            n_u=cfg.concept.n_u,
            shared=cfg.concept.shared,
            architecture=to_dict(cfg.encoder),
            feature_dim=int(self.identities[0].features.shape[-1]),
            feature_tokens=self.feature_tokens,
            hidden_size=self.backend.hidden_size,
            base_model=self.backend.name_or_path,
            base_family=self.backend.family,
            base_fingerprint=self.backend.fingerprint(),
            training_identities=[
                {"name": i.name, "concept_dir": i.concept_dir, "photo_sha256": i.photo_sha256}
                for i in self.identities
            ],
            steps=self.step,
            training_config=to_dict(cfg),
        )
        return save_encoder(self.encoder, meta, encoder_paths(path)[0])

    def _save(self, optimizer, tag: str | None = None) -> Path:
        state = {"losses": self.losses, "identities": [i.name for i in self.identities]}
        return save_checkpoint(
            self.run_dir,
            self.step,
            self._state_tensors(optimizer),
            state,
            keep=self.cfg.keep_checkpoints,
            tag=tag,
        )

    def _stop_non_finite(self, optimizer, loss: torch.Tensor, log) -> None:
        # No optimizer step has run for this step yet: the encoder is the last good state.
        path = self._save(optimizer, tag="last_good")
        log.log({"non_finite_loss": float(loss)}, self.step)
        log.close()
        raise TrainingError(
            f"loss became {float(loss)} at step {self.step + 1}; stopped. The last good encoder is "
            f"saved in {path}. Lower optim.lr or check the data."
        )


def train_encoder(
    config: EncoderTrainConfig, backend: Backend | None = None, resume: bool = False
) -> EncoderTrainResult:
    """Train a concept encoder from a recipe: prepare/read every identity, train, write the encoder file.

    Args:
        config: the validated recipe.
        backend: an already-loaded base model (a benchmark reuses one); loaded from ``config.model``
            when ``None``. Left as it was: the training slot is detached at the end.
        resume: continue the run in ``config.output_dir``.

    Returns:
        The run directory, the encoder file (``RUN/encoder.safetensors``), steps, per-step losses and
        the training identities' names.

    Raises:
        TrainingError: a locked run directory, a changed recipe on resume, a fresh start over a run,
            a non-finite loss.
        ConfigError: no identities or a bad identity list.
    """
    # A refused start comes before the model loads and the data is read.
    check_run_dir(config.output_dir, to_dict(config), resume)
    trainer = EncoderTrainer(config, backend)
    trainer.setup()
    return trainer.train(resume=resume)


__all__ = [
    "EncoderTrainConfig",
    "EncoderTrainResult",
    "EncoderTrainer",
    "TokenLayoutConfig",
    "train_encoder",
]
