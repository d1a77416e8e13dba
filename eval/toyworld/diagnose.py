"""Why a trained concept scores what it scores: the looks the quality benchmark's closing notes need.

A benchmark row says *that* a method misses; these say *why*, on the user's path (the base from disk and
the concept file training wrote):

* :func:`token_drift`: how far each group of learned rows (``<sks>``, generation, understanding; input
  embedding and output head) moved from the base's rows at the same ids, where training starts them.
  Rows that barely moved were never used by the loss.
* :func:`recognition_rates`: the "Yes" rate on the training photos beside new photos, twins and random
  scenes. High on training photos and low on new ones is memorisation; high everywhere is a concept
  that answers "Yes" whatever it sees.
* :func:`sample_answers`: what the open answers look like.
* :func:`loss_by_kind`: each task's training loss at the start and at the end of the run (from the
  run's ``metrics.jsonl``): a task whose loss never fell was never learned.

``toyworld bench --diagnose`` takes all four looks at every trained method it scores
(:func:`trained_diagnostics`) and writes them to ``diagnostics.json`` beside the report.

Example:
    >>> pm = PersonalizedModel.load("eval/toyworld/artifacts/base", ["run/concept/sks"], device="cpu")
    >>> token_drift("eval/toyworld/artifacts/base", "run/concept/sks")["u"]["embed"]
    0.83
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DIAGNOSTIC_QUESTIONS",
    "concept_diagnostics",
    "format_diagnostics",
    "loss_by_kind",
    "recognition_rates",
    "sample_answers",
    "token_drift",
    "trained_diagnostics",
]

# Open questions a trained concept should answer from its rows alone (no photo).
DIAGNOSTIC_QUESTIONS = ("What colour is <sks>?", "What shape is <sks>?", "Describe <sks>.")


def _groups(n_g: int, n_u: int, shared: bool) -> dict[str, slice]:
    """Row ranges of each token group in a concept file (ids are ``[sks, g..., u...]``)."""
    groups = {"sks": slice(0, 1), "g": slice(1, 1 + n_g)}
    if not shared and n_u:
        groups["u"] = slice(1 + n_g, 1 + n_g + n_u)
    return groups


@torch.no_grad()
def token_drift(base, concept_file: str | Path) -> dict[str, dict[str, float]]:
    """Relative distance of each learned row group from the base's rows at the concept's ids.

    Args:
        base: the base model directory, or a loaded backend (its frozen base rows are read, whatever
            concepts are attached, so the benchmark passes the model it already holds).
        concept_file: the concept file training wrote.

    Returns:
        ``{group: {"embed": d, "head": d}}`` with ``d = ||learned - base|| / ||base||`` over the group
        (``group`` is ``sks``, ``g`` and, unless the concept shares one set, ``u``). Training starts each
        row at the base's row for its id (:func:`yochameleon.concept.attach`), so 0 means "never moved".
    """
    from yochameleon.backends import load_backend
    from yochameleon.concept import read_concept_file

    meta, rows = read_concept_file(concept_file)
    backend = load_backend(str(base)) if isinstance(base, str | Path) else base
    ids = torch.tensor(meta.token_ids, dtype=torch.long)
    base = {
        "embed": backend.base_weight("embed").detach()[ids].float(),
        "head": backend.base_weight("head").detach()[ids].float(),
    }
    drift: dict[str, dict[str, float]] = {}
    for group, rows_of in _groups(meta.n_g, meta.n_u, meta.shared).items():
        drift[group] = {}
        for part in ("embed", "head"):
            start = base[part][rows_of]
            moved = (rows[part].float()[rows_of] - start).norm()
            drift[group][part] = float(moved / start.norm().clamp_min(1e-12))
    return drift


def recognition_rates(pm, groups: Mapping[str, Sequence[Image.Image]], concept: str | None = None) -> dict:
    """The "Yes" rate (likelihood mode, as the benchmark scores) of each group of photos."""
    return {
        name: float(np.mean([pm.recognize(image, concept) for image in images])) if images else float("nan")
        for name, images in groups.items()
    }


def sample_answers(
    pm, questions: Sequence[str], image: Image.Image | None = None, max_new_tokens: int = 24
) -> dict[str, str]:
    """Greedy answers to ``questions`` (about ``image`` when given), as a user would read them."""
    return {question: pm.ask(question, image=image, max_new_tokens=max_new_tokens) for question in questions}


def concept_diagnostics(
    base_dir: str | Path,
    concept_file: str | Path,
    photos: Mapping[str, Sequence[Image.Image]],
    questions: Sequence[str] = ("What colour is <sks>?", "Describe <sks>."),
    self_prompting: bool = True,
) -> dict:
    """Every look at one trained concept, loaded the way users load it.

    Args:
        base_dir: the base model directory.
        concept_file: the concept file training wrote (``.safetensors`` / ``.json`` stem or either file).
        photos: named groups, e.g. ``{"training": [...], "new": [...], "twins": [...], "random": [...]}``;
            the first photo of ``"new"`` (when given) is the one the image questions ask about.
        questions: open questions, asked without a photo.
        self_prompting: whether the concept was trained with self-prompting (see
            :class:`~yochameleon.infer.PersonalizedModel`).

    Returns:
        :func:`trained_diagnostics`' looks (without a run's losses) and ``"photo_answers"``.
    """
    from yochameleon.infer import PersonalizedModel

    pm = PersonalizedModel.load(str(base_dir), [concept_file], device="cpu", self_prompting=self_prompting)
    new = list(photos.get("new", ()))
    return trained_diagnostics(pm, concept_file, photos, questions=questions) | {
        "photo_answers": sample_answers(pm, ["Is <sks> in this photo?", "What is in this photo?"], new[0])
        if new
        else {},
    }


def loss_by_kind(metrics: str | Path, share: float = 0.1) -> dict[str, dict[str, float]]:
    """Each task's mean training loss over the first and the last ``share`` of the logged steps.

    Args:
        metrics: a run's ``metrics.jsonl`` (the trainer logs ``loss_<kind>`` per logged step).
        share: the fraction of logged steps averaged at each end (at least one step).

    Returns:
        ``{kind: {"first": loss, "last": loss, "steps": n}}`` for every kind the run logged.
    """
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    result: dict[str, dict[str, float]] = {}
    kinds = sorted({key[5:] for row in rows for key in row if key.startswith("loss_")})
    for kind in kinds:
        values = [row[f"loss_{kind}"] for row in rows if f"loss_{kind}" in row]
        k = max(1, round(share * len(values)))
        result[kind] = {
            "first": float(np.mean(values[:k])),
            "last": float(np.mean(values[-k:])),
            "steps": len(values),
        }
    return result


def trained_diagnostics(
    pm,
    concept_file: str | Path,
    photos: Mapping[str, Sequence[Image.Image]],
    metrics: str | Path | None = None,
    questions: Sequence[str] = DIAGNOSTIC_QUESTIONS,
) -> dict:
    """The four looks at one trained concept, with the concept already attached to ``pm``.

    Args:
        pm: a :class:`~yochameleon.infer.PersonalizedModel` with the concept loaded from its file
            (its backend's frozen rows are the start :func:`token_drift` measures from).
        concept_file: the concept file training wrote.
        photos: named photo groups (``training``, ``new``, ``twins``, ``random``).
        metrics: the run's ``metrics.jsonl``; its per-task losses are left out when missing.
        questions: open questions, asked without a photo.

    Returns:
        ``{"recognition", "token_drift", "answers", "loss_by_kind"}``.
    """
    metrics_path = Path(metrics) if metrics is not None else None
    return {
        "recognition": recognition_rates(pm, photos),
        "token_drift": token_drift(pm.backend, concept_file),
        "answers": sample_answers(pm, questions),
        "loss_by_kind": loss_by_kind(metrics_path)
        if metrics_path is not None and metrics_path.is_file()
        else {},
    }


def format_diagnostics(rows: Sequence[Mapping]) -> str:
    """A markdown table of :func:`trained_diagnostics` rows (each with ``method``, ``concept``, ``seed``).

    Columns: the "yes" rate per photo group, the mean input-row drift, and each task's loss
    first → last.
    """
    lines = [
        '| method | concept | seed | "yes": training / new / twins / random | input-row drift | loss first → last |',
        "|---|---|---:|---|---:|---|",
    ]
    for row in rows:
        rates = row["recognition"]
        yes = " / ".join(f"{rates[g]:.2f}" for g in ("training", "new", "twins", "random") if g in rates)
        drift = np.mean([group["embed"] for group in row["token_drift"].values()])
        losses = ", ".join(
            f"{kind} {v['first']:.2f} → {v['last']:.2f}" for kind, v in row["loss_by_kind"].items()
        )
        lines.append(
            f"| {row['method']} | {row['concept']} | {row['seed']} | {yes} | {drift:.2f} | {losses} |"
        )
    return "\n".join(lines)
