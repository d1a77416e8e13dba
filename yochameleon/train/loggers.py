"""Metric loggers behind one small interface: JSONL (default), stdout, W&B, and a no-op.

Switching is a one-word change in the recipe (``logging.loggers: [jsonl, wandb]``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from yochameleon.errors import ConfigError


class MetricLogger(Protocol):
    """What every logger implements."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_images(self, name: str, images: list, step: int) -> None: ...

    def close(self) -> None: ...


class NoOpLogger:
    """Logging off: every call does nothing."""

    def log(self, metrics, step):
        pass

    def log_config(self, config):
        pass

    def log_images(self, name, images, step):
        pass

    def close(self):
        pass


class JsonlLogger(NoOpLogger):
    """Appends one JSON object per call to ``RUN/metrics.jsonl`` (flushed, survives a kill)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")

    def log(self, metrics, step):
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self._fh.flush()

    def log_images(self, name, images, step):
        # Images are saved beside the metrics; the JSONL line points at them.
        out = self.path.parent / "samples"
        out.mkdir(exist_ok=True)
        paths = []
        for i, im in enumerate(images):
            p = out / f"{name}_step{step:06d}_{i}.png"
            im.save(p)
            paths.append(str(p.relative_to(self.path.parent)))
        self.log({f"{name}_images": paths}, step)

    def close(self):
        self._fh.close()


class StdoutLogger(NoOpLogger):
    """One dense line per call."""

    def log(self, metrics, step):
        body = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        print(f"step {step} {body}", file=sys.stdout, flush=True)


class WandbLogger(NoOpLogger):
    """Weights & Biases. ``mode`` is online/offline/disabled; ``WANDB_MODE`` in the environment wins."""

    def __init__(
        self, project: str, entity: str | None, run_name: str | None, mode: str, run_dir: str | Path
    ) -> None:
        try:
            import wandb
        except ImportError as exc:  # pragma: no cover - wandb is a dependency
            raise ConfigError(
                "logging.loggers includes wandb but wandb is not installed: pip install wandb"
            ) from exc
        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=run_name,
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE", mode),
            reinit="finish_previous",
        )

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_config(self, config):
        self.run.config.update(config, allow_val_change=True)

    def log_images(self, name, images, step):
        self.run.log({name: [self._wandb.Image(im) for im in images]}, step=step)

    def close(self):
        self.run.finish()


class MultiLogger(NoOpLogger):
    """Fans every call out to several loggers."""

    def __init__(self, loggers: list) -> None:
        self.loggers = loggers

    def log(self, metrics, step):
        for lg in self.loggers:
            lg.log(metrics, step)

    def log_config(self, config):
        for lg in self.loggers:
            lg.log_config(config)

    def log_images(self, name, images, step):
        for lg in self.loggers:
            lg.log_images(name, images, step)

    def close(self):
        for lg in self.loggers:
            lg.close()


def build_logger(cfg, run_dir: str | Path, is_main: bool = True) -> MetricLogger:
    """The logger(s) named in a :class:`~yochameleon.train.config.LoggingConfig`; no-op off rank 0."""
    if not is_main or not cfg.loggers:
        return NoOpLogger()
    made = []
    for name in cfg.loggers:
        if name == "jsonl":
            made.append(JsonlLogger(Path(run_dir) / "metrics.jsonl"))
        elif name == "stdout":
            made.append(StdoutLogger())
        elif name == "wandb":
            made.append(
                WandbLogger(cfg.wandb_project, cfg.wandb_entity, cfg.wandb_run_name, cfg.wandb_mode, run_dir)
            )
    return MultiLogger(made)
