"""Methods that start from a concept encoder: zero-shot concepts and the warm start.

* ``yochameleon_zeroshot``: the encoder writes the concept's rows from its photos in one forward
  pass (:func:`~yochameleon.encoder.encode_concept`, what ``yochameleon encode`` runs); no training.
* ``yochameleon_warmstart``: ``yochameleon`` trained from the encoded rows (``concept.init_from``)
  for a fifth of the recipe's optimizer steps (:func:`warm_steps`).

Both are scored as :class:`~yochameleon.baselines.trained.TrainedTokens` are: the concept file is
loaded back and every question goes through :class:`~yochameleon.infer.PersonalizedModel`, so the
numbers are those of ``yochameleon ask`` with the encoded (or warm-started) file. Both need the
encoder file (``encoder=``): it is trained on one base model and refused on another.
"""

from __future__ import annotations

import math
from pathlib import Path

from yochameleon.baselines.base import ConceptData, Method
from yochameleon.baselines.trained import TrainedTokens
from yochameleon.concept import load_concept, normalize_name
from yochameleon.errors import ConfigError
from yochameleon.infer import PersonalizedModel

ZEROSHOT = "yochameleon_zeroshot"
WARMSTART = "yochameleon_warmstart"
ENCODER_METHODS = (ZEROSHOT, WARMSTART)
# The warm start trains for 1/WARM_FRACTION of the steps the recipe would train for.
WARM_FRACTION = 5


def warm_steps(recipe_steps: int) -> int:
    """Optimizer steps of a warm start: ``max(1, ceil(recipe_steps / 5))``.

    ``recipe_steps`` is what the recipe alone would run for this concept
    (:func:`~yochameleon.train.trainer.total_steps`: steps per epoch times ``optim.epochs``,
    capped at ``optim.max_steps``); rounding up keeps at least a fifth.
    """
    return max(1, math.ceil(recipe_steps / WARM_FRACTION))


def _encoder_path(name: str, encoder: str | Path | None) -> Path:
    if not encoder:
        raise ConfigError(
            f"method {name!r} needs a concept encoder (encoder=PATH, `--encoder` on the command line); "
            "train one with `yochameleon encoder train` or `yochameleon toyworld encoder`"
        )
    return Path(encoder)


def _encode(method: Method, concept: ConceptData, encoder: Path, out_dir: Path) -> Path:
    from yochameleon.encoder import encode_concept

    name = normalize_name(concept.name)
    return encode_concept(encoder, method.backend, concept.photos, name, out_dir / name)


class ZeroShot(TrainedTokens):
    """``yochameleon_zeroshot``: the concept file the encoder writes from the concept's photos.

    Args:
        backend: the frozen base model (the encoder's own).
        encoder: the encoder file (``.safetensors``, ``.json`` or their stem).
        train: ignored (accepted so that callers can pass every trained method the same options).
    """

    def __init__(self, backend, encoder: str | Path | None = None, train: dict | None = None) -> None:
        super().__init__(backend, "yochameleon", train)
        self.name = ZEROSHOT
        self.encoder = _encoder_path(ZEROSHOT, encoder)

    def fit(self, concept: ConceptData, workdir: Path) -> None:
        from yochameleon.encoder import read_encoder_file

        Method.fit(self, concept, workdir)
        meta, _ = read_encoder_file(self.encoder)
        # The encoder was trained with (or without) self-prompting; its concepts answer the same way.
        self.self_prompting = bool(meta.training_config.get("method", {}).get("self_prompting", True))
        self.concept_file = _encode(self, concept, self.encoder, Path(workdir) / self.name)
        self.tokens = load_concept(self.backend, self.concept_file)
        self.model = PersonalizedModel(self.backend, self_prompting=self.self_prompting)


class WarmStart(TrainedTokens):
    """``yochameleon_warmstart``: ``yochameleon`` from the encoded rows, for a fifth of the steps.

    The recipe (``train``) is used as ``yochameleon`` uses it, with ``concept.init_from`` set to the
    encoded file and ``optim.max_steps`` set to :func:`warm_steps` of the steps the recipe would
    take on this concept's data (same batches, same order, the run just stops early). The encoder's
    token layout must be the recipe's (``concept.n_g`` / ``n_u`` / ``shared``).

    Args:
        backend: the frozen base model (the encoder's own).
        encoder: the encoder file.
        train: the :class:`~yochameleon.train.config.TrainConfig` mapping (recipe).

    Attributes:
        encoded_file: the encoded concept file training started from.
        recipe_steps, steps: the steps the recipe would take, and the steps taken.
    """

    def __init__(self, backend, encoder: str | Path | None = None, train: dict | None = None) -> None:
        super().__init__(backend, "yochameleon", train)
        self.name = WARMSTART
        self.encoder = _encoder_path(WARMSTART, encoder)
        self.encoded_file: Path | None = None
        self.recipe_steps = self.steps = 0

    def config(self, concept: ConceptData, workdir: Path):
        from yochameleon.config import from_dict, to_dict
        from yochameleon.train.config import TrainConfig

        cfg = to_dict(super().config(concept, workdir))
        cfg["concept"].update({"init": "file", "init_from": str(self.encoded_file)})
        return from_dict(TrainConfig, cfg)

    def fit(self, concept: ConceptData, workdir: Path) -> None:
        self.encoded_file = _encode(self, concept, self.encoder, Path(workdir) / self.name / "encoded")
        super().fit(concept, workdir)

    def _plan(self, trainer) -> None:
        from yochameleon.train.trainer import total_steps

        o = trainer.cfg.optim
        self.recipe_steps = total_steps(len(trainer.sequences), o, trainer.accelerator.num_processes)
        self.steps = warm_steps(self.recipe_steps)
        o.max_steps = self.steps


def check_encoder_layout(encoder: str | Path, n_g: int, n_u: int, shared: bool) -> None:
    """Refuse an encoder whose concepts do not have the recipe's token layout (read from its sidecar).

    Raises:
        ConceptError: a missing or malformed encoder file.
        ConfigError: another layout (both are named).
    """
    from yochameleon.encoder import read_encoder_file

    meta, _ = read_encoder_file(encoder)
    if (meta.n_g, meta.n_u, meta.shared) != (n_g, n_u, shared):
        raise ConfigError(
            f"encoder {encoder} writes concepts with n_g={meta.n_g}, n_u={meta.n_u}, shared={meta.shared}; "
            f"the recipe has n_g={n_g}, n_u={n_u}, shared={shared}: train the encoder with the recipe's layout"
        )


__all__ = [
    "ENCODER_METHODS",
    "WARMSTART",
    "ZEROSHOT",
    "WarmStart",
    "ZeroShot",
    "check_encoder_layout",
    "warm_steps",
]
