"""The self-prompting trainer: concept rows only, label-only logits, cached image tokens, resume.

Features and the recipe keys that control them:

* self-prompting targets (``method.self_prompting``), per-task loss weights (``method.task_weights``);
* label-only chunked cross-entropy (``method.logits_chunk``), gradient checkpointing
  (``method.gradient_checkpointing``), length-grouped right-padded batches;
* AdamW over the concept rows only (``optim.*``), constant or cosine schedule, gradient
  accumulation, clipping before the step, bf16/fp16 autocast through accelerate (``mixed_precision``);
* several concepts in one run on one frozen model (``concept.extra``), batches mix concepts;
  facts naming another concept of the run train as relation records, with both concepts'
  personalized prompts, and the concept files record the relation (``concept.relations``);
* rows start from the base model's rows, a description's words or a concept file
  (``concept.init`` / ``concept.init_from``: a warm start from ``yochameleon encode``);
* checkpoint selection every ``eval_every`` steps by weighted recognition + image-token accuracy;
* atomic checkpoints every ``save_every`` steps, a run lock, ``resume=True`` continues after a kill
  and gives the same rows as an uninterrupted run (on a CPU with the run's thread count, recorded in
  ``run.json``); a larger ``optim.max_steps`` / ``optim.epochs`` extends a finished run, any other
  recipe change is refused;
* a non-finite loss stops the run with a message and keeps the last good state.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yochameleon.backends import LoadOptions, load_backend
from yochameleon.backends.base import Backend
from yochameleon.concept import (
    ConceptSpec,
    ConceptTokens,
    allocate_ids,
    attach,
    concept_rows,
    description_rows,
    file_rows,
    get_bank,
    save_concept,
)
from yochameleon.config import to_dict
from yochameleon.errors import TrainingError
from yochameleon.train.checkpoint import (
    RunLock,
    check_run_dir,
    load_checkpoint,
    remove_stale_tmp,
    run_threads,
    save_checkpoint,
    write_run_meta,
)
from yochameleon.train.config import OptimConfig, TrainConfig
from yochameleon.train.loggers import build_logger
from yochameleon.train.loss import label_only_loss
from yochameleon.train.sequences import IGNORE, Sequence, build_sequence, collate, length_grouped_batches

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    concept_files: dict[str, Path]
    steps: int
    losses: list[float]
    best: dict[str, Any] | None


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def rank_batches(batches: list[list[int]], world: int, rank: int) -> list[list[int]]:
    """This rank's share of every global batch, the same number of batches of the same size on every rank.

    A global batch holds ``batch_size * world`` indices, but the short ones (the tail of each
    length-sorted group) may hold fewer than ``world``; slicing them ``[rank::world]`` would leave a
    rank without its batch, and its peers would wait for it at the gradient reduce forever. As
    ``DistributedSampler`` pads an epoch, a short batch is padded to a multiple of ``world`` with its
    own first indices: a few samples count twice in that step, none is dropped.

    Args:
        batches: the global batches of an epoch, as indices (every rank computes the same list).
        world: number of processes.
        rank: this process's index.

    Returns:
        One batch per global batch, so ``len(result) == len(batches)`` on every rank.
    """
    shares = []
    for batch in batches:
        padded = [batch[i % len(batch)] for i in range(math.ceil(len(batch) / world) * world)]
        shares.append(padded[rank::world])
    return shares


def lr_lambda(o: OptimConfig, total: int):
    """The learning-rate factor of step ``step`` (``LambdaLR``): warm-up, then constant or cosine."""

    def fn(step: int) -> float:
        warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else 1.0
        if o.schedule == "cosine":
            progress = min(1.0, step / max(1, total))
            return warm * 0.5 * (1 + math.cos(math.pi * progress))
        return warm

    return fn


def total_steps(n_sequences: int, o: OptimConfig, world: int = 1) -> int:
    """Optimizer steps a run of ``n_sequences`` training sequences takes with ``o`` on ``world`` processes.

    ``ceil(ceil(n / (batch_size * world)) / grad_accum)`` steps per epoch, times ``epochs``, capped
    at ``max_steps`` when set (what :meth:`Trainer.train` runs).
    """
    per_epoch = math.ceil(n_sequences / (o.batch_size * world))
    total = math.ceil(per_epoch / o.grad_accum) * o.epochs
    return min(total, o.max_steps) if o.max_steps is not None else total


def optimizer_step(params, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip the gradient norm (``max_grad_norm`` 0: measured, not clipped), step the optimizer and schedule.

    Returns:
        The gradient norm before clipping.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    return float(grad_norm)


class StepReporter:
    """Ends each optimizer step: times it, advances the progress bar, logs metrics every ``every`` steps.

    Args:
        bar: the run's tqdm bar.
        log: the run's logger (``log.log(metrics, step)``).
        every: log every this many steps.
        scheduler: the learning-rate schedule (its last lr is logged).
    """

    def __init__(self, bar, log, every: int, scheduler) -> None:
        self.bar, self.log, self.every, self.scheduler = bar, log, every, scheduler
        self.t_last = time.perf_counter()

    def __call__(
        self,
        step: int,
        epoch: int,
        loss: float,
        grad_norm: float,
        n_tokens: int,
        kinds_loss: dict[str, float],
    ) -> dict[str, float]:
        """Report finished step ``step``; return its metrics."""
        now = time.perf_counter()
        metrics = {
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "epoch": epoch,
            "tokens": n_tokens,
            "sec_per_step": now - self.t_last,
            **{f"loss_{k}": v for k, v in kinds_loss.items()},
        }
        self.t_last = now
        self.bar.update(1)
        self.bar.set_postfix_str(f"ep {epoch} loss {loss:.4f} lr {metrics['lr']:.1e}")
        if step % self.every == 0:
            self.log.log(metrics, step)
        return metrics


def labelled_weight(sequence: Sequence, task_weights: dict[str, float]) -> float:
    """How much a sequence counts in a token-averaged loss: its labelled targets times its task weight.

    Position ``t`` predicts label ``t + 1``, so the first label is never a target.
    """
    targets = sum(1 for label in sequence.labels[1:] if label != IGNORE)
    return targets * task_weights.get(sequence.kind, 1.0)


class Trainer:
    """Trains one or more concepts on a frozen backend. See the module docstring for features.

    Args:
        config: the validated recipe.
        backend: an already-loaded backend (tests and multi-stage jobs reuse one); loaded from
            ``config.model`` when ``None``.
        accelerator: an ``accelerate.Accelerator``; one is created when ``None``.
    """

    def __init__(self, config: TrainConfig, backend: Backend | None = None, accelerator=None) -> None:
        from accelerate import Accelerator

        self.cfg = config
        self.run_dir = Path(config.output_dir)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            cpu=resolve_device(config.model.device) == "cpu",
        )
        self.is_main = self.accelerator.is_main_process
        if backend is None:
            device = str(self.accelerator.device)
            backend = load_backend(
                config.model.name_or_path,
                LoadOptions(dtype=config.model.dtype, quantization=config.model.quantization, device=device),
            )
        self.backend = backend
        self.concepts: dict[str, ConceptTokens] = {}
        # concept -> other concept -> facts trained as relation records in this run
        self._relations: dict[str, dict[str, list[str]]] = {}
        self._left_for_later: set[str] = set()
        self.sequences: list[Sequence] = []
        self.eval_sets: dict[str, Any] = {}
        self.step = 0
        self.losses: list[float] = []
        self.best: dict[str, Any] | None = None

    # ----- set-up -----------------------------------------------------------------------------
    def setup(self, records: dict[str, list[dict]] | None = None, image_ids: Any = None) -> None:
        """Attach concepts and build their sequences.

        Args:
            records: ``{concept: [manifest records]}``; read/prepared from the data dirs when ``None``.
            image_ids: a callable ``(data_dir, record) -> list[int] | None`` returning cached VQ ids;
                by default the token cache of each concept's data dir.
        """
        torch.manual_seed(self.cfg.seed)
        c = self.cfg.concept
        for entry in self.cfg.concept_entries():
            spec = ConceptSpec(entry["name"], c.n_g, c.n_u, c.shared)
            if c.init == "description":
                tokens = allocate_ids(self.backend, spec)
                rows = description_rows(self.backend, tokens, _description(entry))
                self.concepts[spec.name] = attach(self.backend, tokens, rows)
            elif c.init == "file":
                # A warm start (an encoded concept) or any compatible concept file: its rows, on
                # whatever free ids this run gives the concept.
                rows = file_rows(self.backend, entry["init_from"], spec)
                self.concepts[spec.name] = attach(self.backend, spec, rows)
            else:
                self.concepts[spec.name] = attach(self.backend, spec)
        for entry in self.cfg.concept_entries():
            tokens = self.concepts[entry["name"]]
            if records is not None:
                recs, lookup = records[entry["name"]], image_ids
            else:
                from yochameleon.data.pipeline import load_training_data

                # Rank 0 prepares a missing folder and fills the token cache; the others then read them.
                with self.accelerator.main_process_first():
                    recs, lookup = load_training_data(self.backend, entry, entry["data_dir"], self.cfg)
            if self.cfg.eval_every:
                self.eval_sets[entry["name"]] = self._eval_set(recs, lookup)
            kinds = set(self.cfg.data.tasks)
            for rec in recs:
                if rec["kind"] not in kinds or not self._relation_trains(entry["name"], rec):
                    continue
                ids = lookup(rec) if rec.get("image") else None
                self.sequences.append(
                    build_sequence(
                        self.backend, rec, tokens, ids, self.cfg.method.self_prompting, others=self.concepts
                    )
                )
        if not self.sequences:
            raise TrainingError("no training sequences: check data.tasks and the concept data")
        if self.cfg.method.gradient_checkpointing:
            self.backend.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            self.backend.model.train()  # HF only checkpoints in train mode; the model has no dropout

    def _relation_trains(self, name: str, record: dict) -> bool:
        """Whether a record trains here; a relation's other concept must be in the run (``concept.relations``)."""
        mentions = record.get("mentions") or []
        missing = [m for m in mentions if m not in self.concepts]
        if missing:
            if self.cfg.concept.relations == "later":
                if record.get("fact") not in self._left_for_later:
                    self._left_for_later.add(record.get("fact"))
                    logger.info("concept %s: %r left for `yochameleon relate`", name, record.get("fact"))
                return False
            names = ", ".join(f"<{m}>" for m in missing)
            raise TrainingError(
                f"concept {name!r} has the fact {record.get('fact')!r}, which names {names}: not trained in "
                f"this run (concepts: {', '.join(f'<{n}>' for n in self.concepts)}). Train them together "
                "(concept.extra), or set concept.relations=later and relate the concept files afterwards "
                "(yochameleon relate)"
            )
        for other in mentions:
            # Both concepts' files record the relation, whichever folder stated it.
            for a, b in ((name, other), (other, name)):
                facts = self._relations.setdefault(a, {}).setdefault(b, [])
                if record["fact"] not in facts:
                    facts.append(record["fact"])
        return True

    def _eval_set(self, records: list[dict], lookup):
        from yochameleon.train.selection import EvalSet, eval_set_from_records

        eval_dir = self.cfg.data.eval_dir
        if not eval_dir:
            return eval_set_from_records(records, lookup)
        from yochameleon.data.photos import load_image_file

        def encode(folder: Path) -> list[list[int]]:
            files = sorted(
                p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
            )
            if not files:
                return []
            return self.backend.encode_images([load_image_file(f) for f in files]).tolist()

        root = Path(eval_dir)
        es = EvalSet(encode(root / "photos"), encode(root / "negatives"))
        if not es:
            raise TrainingError(f"data.eval_dir {root} has no photos/ to select checkpoints on")
        return es

    def _params(self) -> list[torch.nn.Parameter]:
        return get_bank(self.backend).parameters()

    def _lr_lambda(self, total: int):
        return lr_lambda(self.cfg.optim, total)

    # ----- state ------------------------------------------------------------------------------
    def _state_tensors(self, optimizer) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in self.concepts:
            rows = concept_rows(self.backend, name)
            tensors[f"{name}/embed"] = rows["embed"]
            tensors[f"{name}/head"] = rows["head"]
        for i, p in enumerate(self._params()):
            st = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    tensors[f"optim/{i}/{key}"] = st[key]
            if "step" in st:
                tensors[f"optim/{i}/step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        return tensors

    def _restore(self, tensors: dict[str, torch.Tensor], optimizer) -> None:
        bank = get_bank(self.backend)
        with torch.no_grad():
            for name in self.concepts:
                bank.embedding.rows[name].copy_(tensors[f"{name}/embed"])
                bank.head.rows[name].copy_(tensors[f"{name}/head"])
        for i, p in enumerate(self._params()):
            if f"optim/{i}/exp_avg" in tensors:
                optimizer.state[p] = {
                    "step": tensors[f"optim/{i}/step"].reshape(()).clone(),
                    "exp_avg": tensors[f"optim/{i}/exp_avg"].to(p.device).clone(),
                    "exp_avg_sq": tensors[f"optim/{i}/exp_avg_sq"].to(p.device).clone(),
                }

    # ----- the loop ---------------------------------------------------------------------------
    def train(self, resume: bool = False) -> TrainResult:
        """Run (or resume) training and write the concept files to ``RUN/concepts/``."""
        from tqdm.auto import tqdm

        cfg, o = self.cfg, self.cfg.optim
        resolved = to_dict(cfg)
        # Read-only and before the lock: a refused start leaves the run directory untouched.
        old_meta = check_run_dir(self.run_dir, resolved, resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.run_dir).acquire() if self.is_main else None
        threads_before = torch.get_num_threads()
        try:
            threads = run_threads(old_meta, self.backend.device)
            torch.set_num_threads(threads)
            if self.is_main:
                remove_stale_tmp(self.run_dir)
                write_run_meta(self.run_dir, resolved, threads)
            ckpt = load_checkpoint(self.run_dir) if resume else None
            params = self._params()
            optimizer = torch.optim.AdamW(
                params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
            )
            lengths = [len(s) for s in self.sequences]
            world, rank = self.accelerator.num_processes, self.accelerator.process_index
            per_epoch = math.ceil(len(self.sequences) / (o.batch_size * world))
            steps_per_epoch = math.ceil(per_epoch / o.grad_accum)
            total = total_steps(len(self.sequences), o, world)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda(total))
            if ckpt is not None:
                tensors, state = ckpt
                self._restore(tensors, optimizer)
                self.step = state["step"]
                self.losses = state.get("losses", [])
                self.best = state.get("best")
                # Put the schedule where it was without replaying steps (no optimizer.step() ran).
                scheduler.last_epoch = self.step
                for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                    group["lr"] = base * scheduler.lr_lambdas[0](self.step)
                logger.info("resumed %s at step %d", self.run_dir, self.step)
            log = build_logger(cfg.logging, self.run_dir, self.is_main)
            log.log_config(to_dict(cfg))
            bar = tqdm(
                total=total,
                initial=self.step,
                desc="train",
                disable=not (self.is_main and cfg.logging.progress),
            )
            task_weights = cfg.method.task_weights
            label_weights = [labelled_weight(seq, task_weights) for seq in self.sequences]
            device = self.backend.device
            report = StepReporter(bar, log, cfg.logging.every, scheduler)
            while self.step < total:
                epoch = self.step // steps_per_epoch
                batches = length_grouped_batches(lengths, o.batch_size * world, cfg.seed + epoch)
                batches = rank_batches(batches, world, rank)
                # Resume arithmetic: every rank holds per_epoch batches in the same order (one per
                # global batch), so the micro-batch index of the first step not yet taken this epoch
                # is the same on every rank, and a resumed run continues exactly where it stopped.
                start = (self.step - epoch * steps_per_epoch) * o.grad_accum
                groups = [batches[i : i + o.grad_accum] for i in range(start, len(batches), o.grad_accum)]
                for group in groups:
                    if self.step >= total:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    step_loss, kinds_loss = 0.0, {}
                    n_tokens = 0
                    # Each micro-batch's loss is a mean over its labelled tokens. Weighting it by its
                    # share of the step's labelled tokens, summed over every rank, makes the step's
                    # gradient the mean over all of them, as one big batch would give.
                    weights = [sum(label_weights[i] for i in idx) for idx in group]
                    rank_weight = sum(weights)
                    step_weight = rank_weight
                    if world > 1:
                        mine = torch.tensor(rank_weight, dtype=torch.float64, device=device)
                        step_weight = float(self.accelerator.reduce(mine, reduction="sum"))
                    for idx, weight in zip(group, weights, strict=True):
                        batch = collate([self.sequences[i] for i in idx], self.backend.special.pad).to(device)
                        with self.accelerator.autocast():
                            loss, per_kind = label_only_loss(
                                self.backend, batch, task_weights, cfg.method.logits_chunk
                            )
                        if not torch.isfinite(loss):
                            self._stop_non_finite(optimizer, loss, log)
                        # x world: the gradient reduce below averages over the ranks.
                        (loss * (weight * world / step_weight)).backward()
                        step_loss += loss.item() * (weight / rank_weight)
                        kinds_loss.update(per_kind)
                        n_tokens += int(batch.attention_mask.sum())
                    if world > 1:
                        for p in params:
                            if p.grad is not None:
                                p.grad = self.accelerator.reduce(p.grad, reduction="mean")
                    grad_norm = optimizer_step(params, optimizer, scheduler, o.max_grad_norm)
                    self.step += 1
                    self.losses.append(step_loss)
                    report(self.step, epoch, step_loss, grad_norm, n_tokens, kinds_loss)
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self._evaluate(optimizer, log)
                    if self.is_main and (self.step % cfg.save_every == 0 or self.step == total):
                        self._save(optimizer)
            bar.close()
            if self.is_main:
                self._log_samples(log)
            files = self._write_concepts() if self.is_main else {}
            log.close()
            return TrainResult(self.run_dir, files, self.step, self.losses, self.best)
        finally:
            torch.set_num_threads(threads_before)
            if lock is not None:
                lock.release()

    def _save(self, optimizer, tag: str | None = None) -> Path:
        state = {"losses": self.losses, "best": self.best, "concepts": list(self.concepts)}
        return save_checkpoint(
            self.run_dir,
            self.step,
            self._state_tensors(optimizer),
            state,
            keep=self.cfg.keep_checkpoints,
            tag=tag,
        )

    def _stop_non_finite(self, optimizer, loss: torch.Tensor, log) -> None:
        # The rows have not been touched by this step yet, so they are the last good state.
        path = self._save(optimizer, tag="last_good") if self.is_main else None
        log.log({"non_finite_loss": float(loss)}, self.step)
        log.close()
        raise TrainingError(
            f"loss became {float(loss)} at step {self.step + 1}; stopped. The last good rows are "
            f"saved in {path}. Lower optim.lr or check the data."
        )

    def _evaluate(self, optimizer, log) -> None:
        from yochameleon.train.selection import selection_score

        scores = selection_score(self, self.eval_sets)
        log.log({f"eval_{k}": v for k, v in scores.items()}, self.step)
        if self.best is None or scores["score"] > self.best["score"]:
            self.best = {"step": self.step, **scores}
            if self.is_main:
                self._save(optimizer, tag="best")

    def _log_samples(self, log) -> None:
        """Generate a few images per concept and hand them to the loggers (W&B shows them)."""
        from yochameleon.errors import BackendError
        from yochameleon.infer import PersonalizedModel

        n = self.cfg.logging.sample_images
        if n <= 0 or "generation_real" not in self.cfg.data.tasks:
            return
        pm = PersonalizedModel(self.backend)
        for name in self.concepts:
            try:
                images = pm.generate_image(f"A photo of <{name}>.", n=n, seed=self.cfg.seed)
            except BackendError as exc:  # no VQ decoder: nothing to show
                logger.info("no sample images: %s", exc)
                return
            log.log_images(f"samples_{name}", images, self.step)

    def _write_concepts(self) -> dict[str, Path]:
        out = self.run_dir / "concepts"
        files = {}
        best = load_checkpoint(self.run_dir, "best") if self.best is not None else None
        if best is not None:
            tensors, _ = best
            bank = get_bank(self.backend)
            with torch.no_grad():
                for name in self.concepts:
                    bank.embedding.rows[name].copy_(tensors[f"{name}/embed"])
                    bank.head.rows[name].copy_(tensors[f"{name}/head"])
        bank = get_bank(self.backend)
        for name in self.concepts:
            # On the model too, so inference in this process sees the relations the files record.
            bank.relations[name] = self._relation_entries(name)
            st, _ = save_concept(self.backend, name, out / name, training_config=to_dict(self.cfg))
            files[name] = st
        return files

    def _relation_entries(self, name: str) -> list[dict[str, Any]]:
        """What ``name``'s concept file records about the relations this run trained."""
        from yochameleon.relations import parse_fact

        return [
            {
                "with": other,
                "facts": [parse_fact(f).to_dict() for f in facts],
                "source": "trained_together",
                "settings": {"run": str(self.run_dir), "steps": self.step},
            }
            for other, facts in self._relations.get(name, {}).items()
        ]


def _description(entry: dict[str, str]) -> str:
    """The ``concept.yaml`` description of a run's concept (``concept.init=description``)."""
    from yochameleon.data.concept_folder import CONCEPT_YAML, read_concept_yaml

    if not entry["concept_dir"]:
        raise TrainingError(
            f"concept.init=description reads concept {entry['name']!r}'s description from its concept "
            "folder, but the run names none (set concept.concept_dir)"
        )
    return str(read_concept_yaml(Path(entry["concept_dir"]) / CONCEPT_YAML).get("description", ""))
