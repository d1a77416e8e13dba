"""The one data config: how a concept folder becomes training records (a recipe's ``data`` section).

``yochameleon prepare RECIPE.yaml`` and the trainer read the same section, and the record builder
takes it whole, so a setting has one name and one default everywhere. The settings that shape the
records are written into the manifest header by ``prepare``; training on a data folder whose
recorded settings differ from the recipe is refused with the differing keys listed (or, with
``data.reprepare=true``, the folder is prepared again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from yochameleon.errors import ConfigError

# The record kinds; ``data.tasks`` picks among them at training time.
TASKS = ("recognition", "text_qa", "relation", "generation_real", "generation_soft")

# DataConfig fields that change which records ``prepare`` writes. The others only steer training
# (``tasks``, ``eval_dir``), storage (``link_images``), a check (``min_photos``) or this very check.
RECORDED_FIELDS = (
    "index_dir",
    "n_recognition",
    "hard_fraction",
    "n_hard_negatives",
    "n_easy_negatives",
    "n_soft_positives",
    "n_real_min",
    "soft_prompt_form",
    "flip",
    "text_qa_repeats",
    "seed",
)


@dataclass
class DataConfig:
    """How training records are built from a concept folder, and which of them train.

    Fields marked *recorded* shape the records: ``prepare`` writes them into the manifest header.

    Args:
        index_dir: (recorded) a FAISS index (``yochameleon index``) of the negative / soft-positive
            pool; without one, no retrieved data is used.
        tasks: which record kinds to train on (every kind is prepared).
        n_recognition: (recorded) recognition positives, cycled over the photos; the negatives get as
            many in all.
        hard_fraction: (recorded) share of the negatives taken from the hard negatives when there
            are both kinds.
        n_hard_negatives: (recorded) retrieved nearest pool images used as hard negatives.
        n_easy_negatives: (recorded) random pool images used as easy negatives.
        n_soft_positives: (recorded) L, the number of most-similar pool images used as soft positives.
        n_real_min: (recorded) fewest real-photo generation records.
        soft_prompt_form: (recorded) ``paper`` (``<sks> is <g1..gm>. A photo of <sks>.``) or ``code``
            (``A photo of <g1..gm>.``).
        flip: (recorded) horizontal-flip augmentation.
        text_qa_repeats: (recorded) each text question/answer pair is asked once per photo, for at
            most this many photos; raise it to weigh text QA against recognition.
        seed: (recorded) seed of the record sampling and of the random negatives.
        min_photos: fewest usable photos a concept folder must have.
        link_images: hard-link images into the data folder when possible (else copy).
        eval_dir: optional folder of held-out photos (``photos/`` and ``negatives/``) for checkpoint
            selection; without it the training positives are used.
        reprepare: when a prepared folder's recorded settings differ from these, prepare it again
            instead of refusing to train.

    Raises:
        ConfigError: (from ``__post_init__``) a value out of range or an unknown task.
    """

    index_dir: str | None = None
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    n_recognition: int = 200
    hard_fraction: float = 0.5
    n_hard_negatives: int = 100
    n_easy_negatives: int = 100
    n_soft_positives: int = 1000
    n_real_min: int = 0
    soft_prompt_form: Literal["paper", "code"] = "paper"
    flip: bool = True
    text_qa_repeats: int = 5
    seed: int = 0
    min_photos: int = 3
    link_images: bool = True
    eval_dir: str | None = None
    reprepare: bool = False

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"data.tasks must be a non-empty subset of {list(TASKS)}, got {self.tasks}")
        if self.text_qa_repeats < 1:
            raise ConfigError(f"data.text_qa_repeats must be at least 1, got {self.text_qa_repeats}")
        if self.min_photos < 1:
            raise ConfigError(f"data.min_photos must be at least 1, got {self.min_photos}")
        counts = ("n_recognition", "n_hard_negatives", "n_easy_negatives", "n_real_min")
        negative = [f"data.{name}" for name in counts if getattr(self, name) < 0]
        if negative:
            raise ConfigError(f"{', '.join(negative)} must be >= 0")
        if self.n_soft_positives < 1:
            raise ConfigError(f"data.n_soft_positives must be at least 1, got {self.n_soft_positives}")
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise ConfigError(f"data.hard_fraction must be in [0, 1], got {self.hard_fraction}")
        if self.soft_prompt_form not in ("paper", "code"):
            raise ConfigError(f"data.soft_prompt_form must be paper or code, got {self.soft_prompt_form!r}")


def prepared_settings(data: DataConfig, n_g: int, concept_dir: str | Path | None = None) -> dict[str, Any]:
    """The settings a data folder is prepared with, as recipe keys: the manifest header's ``settings``.

    Paths are made absolute, so the same folder named from two working directories compares equal.

    Args:
        data: the recipe's data section.
        n_g: the concept's generation tokens (``concept.n_g``).
        concept_dir: the concept folder, when the recipe names one.
    """
    settings: dict[str, Any] = {"concept.n_g": n_g}
    if concept_dir:
        settings["concept.concept_dir"] = str(Path(concept_dir).resolve())
    for name in RECORDED_FIELDS:
        value = getattr(data, name)
        if name == "index_dir" and value:
            value = str(Path(value).resolve())
        settings[f"data.{name}"] = value
    return settings


def settings_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """One line per recipe key whose value differs from the one a folder was prepared with.

    A key the recipe leaves out (``concept.concept_dir`` when only ``data_dir`` is given) is not
    compared; a key the folder did not record counts as different.
    """
    lines = []
    for key, value in wanted.items():
        if key not in recorded:
            lines.append(f"{key}: not recorded in the folder, the recipe says {value!r}")
        elif recorded[key] != value:
            lines.append(f"{key}: prepared with {recorded[key]!r}, the recipe says {value!r}")
    return lines


__all__ = ["RECORDED_FIELDS", "TASKS", "DataConfig", "prepared_settings", "settings_differences"]
