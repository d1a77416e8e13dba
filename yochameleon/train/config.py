"""The training recipe schema. Every recipe in ``recipes/`` is a YAML view of :class:`TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from yochameleon.concept import normalize_name
from yochameleon.data.config import TASKS, DataConfig
from yochameleon.errors import ConfigError


@dataclass
class ModelConfig:
    """The frozen base model.

    Args:
        name_or_path: a Hugging Face id or a local directory (``make-tiny`` output included).
        dtype: dtype of the frozen weights.
        quantization: ``4bit`` / ``8bit`` through bitsandbytes, or null.
        device: ``cpu``, ``cuda``, ``cuda:1``…; ignored under ``accelerate launch``.
    """

    name_or_path: str = "leloy/Anole-7b-v0.1-hf"
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    quantization: Literal["4bit", "8bit"] | None = None
    device: str = "auto"


CONCEPT_INITS = ("base", "description", "file")


@dataclass
class ConceptConfig:
    """Which concept(s) to train and their token layout.

    Args:
        name: concept name; several concepts are listed in ``extra``.
        concept_dir: the user's concept folder (photos/, concept.yaml, qa.jsonl).
        data_dir: where ``prepare`` writes records and images; defaults to ``RUN/data/NAME``.
        n_g: generation tokens.
        n_u: understanding tokens (0 with ``shared``).
        shared: one token set for both tasks (Yo'LLaVA-style and the "shared" ablation).
        extra: more concepts trained in the same run on the same frozen model, as
            ``[{name, concept_dir, data_dir}]``.
        init: where the concept's rows start. ``"base"`` (the original method): the base model's
            rows of the ids the concept takes. ``"description"``: the latent tokens' input rows are
            the embeddings of the words of ``concept.yaml``'s description, in turn, so that the
            personalized prompt ``<sks> is <g…><u…>.`` first reads like ``<sks> is a brown dog.``
            (a textual-inversion style start; every concept of the run needs a description).
            ``"file"``: the rows of a concept file (``init_from``), e.g. one ``yochameleon encode``
            wrote (a warm start) or a trained one.
        relations: what to do with a fact naming a concept that is not trained in this run
            (``concept.yaml`` ``facts: ["<bo> is the brother of <mắm>"]`` with no ``mắm`` here):
            ``strict`` refuses the run, naming it; ``later`` leaves its records out, for a joint
            step on the two concept files afterwards (``yochameleon relate``).
        init_from: the concept file (``NAME.safetensors``) the rows start from; setting it alone
            selects ``init="file"``. Its token layout must be this recipe's (checked here) and its
            base model the run's (checked when the model is loaded). Each ``extra`` concept then names
            its own file as ``init_from``.
    """

    name: str = "sks"
    concept_dir: str = ""
    data_dir: str | None = None
    n_g: int = 16
    n_u: int = 16
    shared: bool = False
    extra: list[dict[str, str]] = field(default_factory=list)
    init: str = "base"
    relations: Literal["strict", "later"] = "strict"
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.init not in CONCEPT_INITS:
            raise ConfigError(f"concept.init must be one of {list(CONCEPT_INITS)}, got {self.init!r}")
        if self.shared and self.n_u:
            raise ConfigError("concept.shared uses one token set of n_g tokens; set concept.n_u=0")
        for item in self.extra:
            unknown = set(item) - {"name", "concept_dir", "data_dir", "init_from"}
            if unknown or "name" not in item:
                raise ConfigError(
                    f"concept.extra items need name (and concept_dir/data_dir/init_from); got {item}"
                )
        if self.init_from and self.init == "base":
            self.init = "file"  # ``concept.init_from=FILE`` alone is the warm start
        if self.init == "file":
            self._check_init_files()
        elif self.init_from or any(item.get("init_from") for item in self.extra):
            raise ConfigError(
                f"concept.init_from starts the rows from a file; it cannot go with init={self.init!r}"
            )
        # Names are compared and written to file names in NFC form (see concept.normalize_name).
        self.name = normalize_name(self.name) if isinstance(self.name, str) else self.name
        self.extra = [
            {**item, "name": normalize_name(item["name"])} if isinstance(item["name"], str) else item
            for item in self.extra
        ]

    def _check_init_files(self) -> None:
        """Every concept names a readable concept file with this recipe's token layout."""
        from yochameleon.concept import read_concept_file
        from yochameleon.errors import ConceptError

        files = [("concept.init_from", self.init_from)] + [
            (f"concept.extra[{item['name']}].init_from", item.get("init_from")) for item in self.extra
        ]
        for key, path in files:
            if not path:
                raise ConfigError(f"concept.init=file needs {key}=CONCEPT_FILE (a .safetensors concept file)")
            try:
                meta, _ = read_concept_file(path)
            except ConceptError as exc:
                raise ConfigError(f"{key}: {exc}") from exc
            if (meta.n_g, meta.n_u, meta.shared) != (self.n_g, self.n_u, self.shared):
                raise ConfigError(
                    f"{key}: {path} has n_g={meta.n_g}, n_u={meta.n_u}, shared={meta.shared}, but this "
                    f"recipe's concepts have n_g={self.n_g}, n_u={self.n_u}, shared={self.shared}; set "
                    "concept.n_g / concept.n_u to the file's, or encode/train the file with this recipe's"
                )


@dataclass
class OptimConfig:
    """AdamW over the concept rows only.

    Args:
        lr: learning rate (paper code 1e-3; the paper text says 1e-4).
        schedule: ``constant`` or ``cosine`` (with ``warmup_steps``).
        batch_size: samples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        max_grad_norm: clip the rows' gradient norm before the step (0 disables).
        epochs: passes over the records; ``max_steps`` caps optimizer steps when set.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    epochs: int = 15
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError("optim.lr must be positive")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise ConfigError("optim.batch_size, optim.grad_accum and optim.epochs must be >= 1")
        if len(self.betas) != 2:
            raise ConfigError("optim.betas must have two values")


@dataclass
class MethodConfig:
    """The personalization method's switches.

    Args:
        self_prompting: answers first emit their task's token set (u-tokens / g-tokens).
        task_weights: optional loss weight per record kind (default: every token counts once).
        gradient_checkpointing: recompute activations in backward to save memory.
        logits_chunk: positions per chunk of the label-only cross-entropy.
    """

    self_prompting: bool = True
    task_weights: dict[str, float] = field(default_factory=dict)
    gradient_checkpointing: bool = False
    logits_chunk: int = 1024

    def __post_init__(self) -> None:
        bad = [k for k in self.task_weights if k not in TASKS]
        if bad:
            raise ConfigError(f"method.task_weights keys must be in {list(TASKS)}, got {bad}")


@dataclass
class LoggingConfig:
    """Where metrics go.

    Args:
        loggers: any of ``jsonl`` (default, ``RUN/metrics.jsonl``), ``stdout``, ``wandb``; empty = off.
        every: log every N optimizer steps.
        wandb_project / wandb_entity / wandb_run_name / wandb_mode: W&B settings
            (``online``, ``offline`` or ``disabled``; ``WANDB_MODE`` overrides).
        progress: show the training progress bar (benchmarks that train many methods turn it off).
    """

    loggers: list[Literal["jsonl", "stdout", "wandb"]] = field(default_factory=lambda: ["jsonl"])
    every: int = 1
    wandb_project: str = "yochameleon"
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    sample_images: int = 2
    progress: bool = True


def default_data_dir(output_dir: str | Path, name: str) -> str:
    """Where a run prepares and reads concept ``name``'s data when ``data_dir`` is not given."""
    return str(Path(output_dir) / "data" / name)


@dataclass
class TrainConfig:
    """A whole training run: ``yochameleon train RECIPE.yaml [key.sub=value ...]``."""

    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    eval_every: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2

    def concept_entries(self) -> list[dict[str, str]]:
        """Every concept of the run as ``{name, concept_dir, data_dir, init_from}``, ``concept.extra`` included.

        ``data_dir`` defaults to ``OUTPUT_DIR/data/NAME``, where ``prepare`` writes and training reads.
        """
        c = self.concept
        entries = [
            {"name": c.name, "concept_dir": c.concept_dir, "data_dir": c.data_dir, "init_from": c.init_from},
            *c.extra,
        ]
        return [
            {
                "name": e["name"],
                "concept_dir": e.get("concept_dir") or "",
                "data_dir": e.get("data_dir") or default_data_dir(self.output_dir, e["name"]),
                "init_from": e.get("init_from") or "",
            }
            for e in entries
        ]
