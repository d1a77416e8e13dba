"""The one results schema shared by ``yochameleon eval``, ``compare`` and the toy-world benchmark.

Per-concept record (:class:`ConceptResult`)::

    {"method": "yochameleon", "concept": "bo", "seed": 0,
     "recognition_pos": 0.9, "recognition_neg_hard": 0.7, "recognition_neg_easy": 1.0,
     "recognition_weighted": 0.875, "vqa": 0.6, "text_qa": 0.7, "clip_i": 0.78, "clip_t": null,
     "face_sim": null, "gen_fidelity": 0.4, "prompt_tokens": 33}

Metrics are in [0, 1] except ``clip_i``/``clip_t``/``face_sim`` (cosines, [-1, 1]); ``null`` where a
metric does not apply (e.g. ``face_sim`` for objects, generation metrics for a method that cannot draw).

Summary (:func:`summarize`)::

    {"schema_version": 1,
     "methods": {METHOD: {METRIC: mean, METRIC + "_ci": [lo, hi], ..., "n": records}},
     "differences": {METHOD: {METRIC: {"mean": d, "ci": [lo, hi], "crosses_zero": bool}}},  # vs reference
     "reference": "yochameleon",
     "per_concept": [ConceptResult, ...],
     "config": {...}}

Means skip nulls; a metric that is null everywhere has a null mean and CI. Differences are paired on
(concept, seed) against the reference method with a bootstrap CI.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from yochameleon.errors import ConfigError

SCHEMA_VERSION = 1
METRICS = (
    "recognition_pos",
    "recognition_neg_hard",
    "recognition_neg_easy",
    "recognition_weighted",
    "vqa",
    "text_qa",
    "clip_i",
    "clip_t",
    "face_sim",
    "gen_fidelity",
)
COSINES = ("clip_i", "clip_t", "face_sim")


@dataclass
class ConceptResult:
    """One method on one concept with one seed."""

    method: str
    concept: str
    seed: int = 0
    recognition_pos: float | None = None
    recognition_neg_hard: float | None = None
    recognition_neg_easy: float | None = None
    recognition_weighted: float | None = None
    vqa: float | None = None
    text_qa: float | None = None
    clip_i: float | None = None
    clip_t: float | None = None
    face_sim: float | None = None
    gen_fidelity: float | None = None
    prompt_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.method or not self.concept:
            raise ConfigError("a result needs a method and a concept")
        for name in METRICS:
            v = getattr(self, name)
            if v is None:
                continue
            lo = -1.0 if name in COSINES else 0.0
            if not (isinstance(v, (int, float)) and math.isfinite(v) and lo - 1e-9 <= v <= 1 + 1e-9):
                raise ConfigError(f"{self.method}/{self.concept}: {name}={v!r} is outside [{lo}, 1]")


def summarize(
    records: list[ConceptResult],
    config: dict | None = None,
    reference: str = "yochameleon",
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Means, bootstrap CIs and paired differences vs ``reference`` (see the module docstring)."""
    from yochameleon.eval.metrics import bootstrap_ci, paired_bootstrap_diff

    methods: dict[str, dict] = {}
    by_method: dict[str, list[ConceptResult]] = {}
    for r in records:
        by_method.setdefault(r.method, []).append(r)
    for method, rows in by_method.items():
        out: dict = {"n": len(rows), "prompt_tokens": sum(r.prompt_tokens for r in rows) / len(rows)}
        for m in METRICS:
            vals = [getattr(r, m) for r in rows if getattr(r, m) is not None]
            out[m] = sum(vals) / len(vals) if vals else None
            out[m + "_ci"] = list(bootstrap_ci(vals, n_boot, seed)) if len(vals) > 1 else None
        methods[method] = out
    differences: dict[str, dict] = {}
    if reference in by_method:
        ref = {(r.concept, r.seed): r for r in by_method[reference]}
        for method, rows in by_method.items():
            if method == reference:
                continue
            diffs = {}
            for m in METRICS:
                pairs = [
                    (getattr(ref[(r.concept, r.seed)], m), getattr(r, m))
                    for r in rows
                    if (r.concept, r.seed) in ref
                ]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                if pairs:
                    diffs[m] = paired_bootstrap_diff(
                        [a for a, _ in pairs], [b for _, b in pairs], n_boot, seed
                    )
            differences[method] = diffs
    return {
        "schema_version": SCHEMA_VERSION,
        "methods": methods,
        "differences": differences,
        "reference": reference,
        "per_concept": [asdict(r) for r in records],
        "config": config or {},
    }


def write_summary(path: str | Path, summary: dict) -> Path:
    """Write a summary JSON (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(p)
    return p


def load_summary(path: str | Path) -> dict:
    """Read and validate a summary JSON.

    Raises:
        ConfigError: missing file, wrong schema version, missing keys or invalid records.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"results file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p} is not valid JSON: {exc}") from exc
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{p}: schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    for key in ("methods", "per_concept", "config"):
        if key not in data:
            raise ConfigError(f"{p}: missing key {key!r}")
    names = {f.name for f in fields(ConceptResult)}
    for rec in data["per_concept"]:
        ConceptResult(**{k: v for k, v in rec.items() if k in names})
    return data
