"""The results schema, shared by ``yochameleon eval``, ``yochameleon compare`` and the toy-world benchmark.

This module is the only writer of result files; everything else builds :class:`ConceptResult` records
and calls :func:`summarize` and :func:`write_summary`.

Per-concept record
------------------
One method, on one concept, with one seed (:class:`ConceptResult`)::

    {"method": "yochameleon", "concept": "bo", "seed": 0,
     "recognition_pos": 0.9, "recognition_neg_hard": 0.7, "recognition_neg_easy": 1.0,
     "recognition_weighted": 0.875, "vqa": 0.6, "text_qa": 0.7,
     "clip_i": 0.78, "clip_t": 0.31, "face_sim": null, "gen_fidelity": 0.4,
     "prompt_tokens": 33, "embedders": {"clip_i": "OpenCLIP ViT-H-14 (pretrained laion2b_s32b_b79k)"}}

============================  =========  ===========================================================
field                         range      meaning
============================  =========  ===========================================================
``method``                    str        method name (``none``, ``text_prompt``, ``yochameleon``, ...)
``concept``                   str        concept name
``seed``                      int        evaluation / training seed
``recognition_pos``           [0, 1]     accuracy on photos of the concept ("Yes" expected)
``recognition_neg_hard``      [0, 1]     accuracy on look-alike photos ("No" expected)
``recognition_neg_easy``      [0, 1]     accuracy on unrelated photos ("No" expected)
``recognition_weighted``      [0, 1]     0.5 * pos + 0.5 * mean of the negative accuracies present
``vqa``                       [0, 1]     visual multiple-choice accuracy (options shuffled by seed)
``text_qa``                   [0, 1]     text-only multiple-choice accuracy
``clip_i``                    [-1, 1]    cosine of generated images to the mean real-photo embedding
``clip_t``                    [-1, 1]    cosine of generated images to their prompts
``face_sim``                  [-1, 1]    ArcFace similarity (person concepts with a face model only)
``gen_fidelity``              [0, 1]     fraction of generated images a scorer accepts (toy world)
``prompt_tokens``             int >= 0   prompt tokens spent on the concept (0 for ``none``)
``embedders``                 object     image metric -> the model that scored it (optional; see below)
============================  =========  ===========================================================

``embedders`` names the embedder (or scorer) behind each image metric of the record, as
:func:`yochameleon.retrieval.describe_embedder` writes it: CLIP-I from an OpenCLIP model reads
``OpenCLIP <model> (<weights>)``, and the test embedder says that it is not CLIP. Records written
before the field existed have none.

A metric is ``null`` where it does not apply (``face_sim`` for a dog, generation metrics for a method
that cannot draw, ``recognition_neg_hard`` without look-alikes). See :mod:`yochameleon.eval.metrics`
for how each metric is computed.

Summary file
------------
:func:`summarize` turns records into the file that :func:`write_summary` writes::

    {"schema_version": 1,
     "methods": {
        "yochameleon": {"n": 8, "prompt_tokens": 33.0,
                        "recognition_weighted": 0.81, "recognition_weighted_ci": [0.74, 0.88],
                        "vqa": null, "vqa_ci": null, ...},   # every METRIC and METRIC + "_ci"
        ...},
     "reference": "yochameleon",
     "differences": {
        "text_prompt": {"recognition_weighted": {"mean": 0.25, "ci": [0.2, 0.3], "n": 8,
                                                 "crosses_zero": false}, ...},
        ...},
     "per_concept": [record, ...],
     "embedders": {"clip_i": "OpenCLIP ViT-H-14 (pretrained laion2b_s32b_b79k)"},
     "config": {...}}

- ``methods``: per method (in order of first appearance), ``n`` records, the mean ``prompt_tokens``
  and, per metric, the mean over records where it is not null and a 95% percentile-bootstrap CI of
  that mean. A metric null everywhere has a null mean and a null CI; with a single value the CI is
  null too (one number says nothing about spread).
- ``differences`` (present when the reference method is among the records): per other method and
  metric, the paired difference **reference minus method** over the (concept, seed) pairs where both
  have a value, with a bootstrap CI. A positive mean says the reference is better; ``crosses_zero``
  says the data do not settle it. ``reference`` names the reference method (``null`` when absent).
- ``per_concept``: every record, as above, so summaries can be merged (``yochameleon compare``).
- ``embedders``: per image metric, the one embedder every record that names one used. Numbers from
  two embedders live in two spaces, so :func:`summarize` refuses records that disagree (and
  ``yochameleon compare`` refuses to merge such runs). Optional when reading older files.
- ``config``: free-form JSON describing the run (model, test directory, seeds, ...).

:func:`load_summary` refuses a file with another ``schema_version``, a missing key or an invalid
record, naming the problem.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

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
COSINE_METRICS = ("clip_i", "clip_t", "face_sim")
# Metrics computed by a model of their own (an embedder or a scorer), which a record names.
IMAGE_METRICS = ("clip_i", "clip_t", "face_sim", "gen_fidelity")
COSINES = COSINE_METRICS  # older name
SUMMARY_KEYS = ("schema_version", "methods", "per_concept", "config")
DEFAULT_REFERENCE = "yochameleon"


class SchemaError(ConfigError):
    """A result record or summary file does not follow the results schema."""


def _is_number(v: Any) -> bool:
    # numbers.Real also admits numpy scalars (np.float32 from an embedder); bools are not metrics.
    return (
        isinstance(v, numbers.Real)
        and not isinstance(v, bool)
        and type(v).__name__ != "bool_"
        and math.isfinite(v)
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v).__name__ != "bool_"


@dataclass
class ConceptResult:
    """One method on one concept with one seed; metrics are ``None`` where they do not apply.

    Raises:
        SchemaError: (in ``__post_init__``) an empty method or concept name, a non-integer seed or
            token count, a metric that is not a finite number in its range, or ``embedders`` that
            name something other than an image metric.
    """

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
    embedders: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("method", "concept"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise SchemaError(f"a result needs a non-empty {name} name, got {value!r}")
        where = f"{self.method}/{self.concept}"
        if not _is_int(self.seed):
            raise SchemaError(f"{where}: seed must be an integer, got {self.seed!r}")
        if not _is_int(self.prompt_tokens) or self.prompt_tokens < 0:
            raise SchemaError(
                f"{where}: prompt_tokens must be a non-negative integer, got {self.prompt_tokens!r}"
            )
        self.seed, self.prompt_tokens = int(self.seed), int(self.prompt_tokens)
        for name in METRICS:
            value = getattr(self, name)
            if value is None:
                continue
            lo = -1.0 if name in COSINE_METRICS else 0.0
            # A hair of slack: cosines computed in float32 can land at 1.0000001.
            if not (_is_number(value) and lo - 1e-6 <= value <= 1 + 1e-6):
                raise SchemaError(f"{where}: {name}={value!r} is outside [{lo:g}, 1] or not a number")
            setattr(self, name, float(value))
        if not isinstance(self.embedders, Mapping) or not all(
            key in IMAGE_METRICS and isinstance(value, str) and value.strip()
            for key, value in self.embedders.items()
        ):
            raise SchemaError(
                f"{where}: embedders must map image metrics {list(IMAGE_METRICS)} to model names, "
                f"got {self.embedders!r}"
            )
        self.embedders = dict(self.embedders)

    @property
    def key(self) -> tuple[str, str, int]:
        """``(method, concept, seed)``, unique within a summary."""
        return (self.method, self.concept, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ConceptResult:
        """Build a record from its JSON form.

        Raises:
            SchemaError: not a mapping, unknown or missing required fields, or invalid values.
        """
        if not isinstance(record, Mapping):
            raise SchemaError(f"a result record must be a JSON object, got {type(record).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(record) - names)
        if unknown:
            raise SchemaError(f"result record has unknown fields {unknown}; known: {sorted(names)}")
        missing = [k for k in ("method", "concept") if k not in record]
        if missing:
            raise SchemaError(f"result record lacks {missing}: {dict(record)!r}")
        return cls(**record)


def _as_record(r: ConceptResult | Mapping[str, Any]) -> ConceptResult:
    return r if isinstance(r, ConceptResult) else ConceptResult.from_dict(r)


def summarize(
    records: Iterable[ConceptResult | Mapping[str, Any]],
    config: Mapping[str, Any] | None = None,
    reference: str | None = DEFAULT_REFERENCE,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Means, bootstrap CIs and paired differences vs ``reference`` (format in the module docstring).

    Args:
        records: :class:`ConceptResult` records (or their dict form).
        config: run description stored under ``config``.
        reference: the method the others are compared with; ``None`` skips differences.
        n_boot, seed, alpha: bootstrap settings (see :func:`yochameleon.eval.metrics.bootstrap_ci`).

    Raises:
        SchemaError: no records, an invalid record, two records for the same (method, concept, seed),
            or records that name different embedders for one image metric.
    """
    from yochameleon.eval.metrics import bootstrap_ci, paired_bootstrap_diff

    rows = [_as_record(r) for r in records]
    if not rows:
        raise SchemaError("no results to summarize")
    seen: set[tuple[str, str, int]] = set()
    by_method: dict[str, list[ConceptResult]] = {}
    for r in rows:
        if r.key in seen:
            raise SchemaError(f"two results for method {r.method!r}, concept {r.concept!r}, seed {r.seed}")
        seen.add(r.key)
        by_method.setdefault(r.method, []).append(r)

    methods: dict[str, dict[str, Any]] = {}
    for method, group in by_method.items():
        stats: dict[str, Any] = {
            "n": len(group),
            "prompt_tokens": sum(r.prompt_tokens for r in group) / len(group),
        }
        for metric in METRICS:
            values = [getattr(r, metric) for r in group if getattr(r, metric) is not None]
            stats[metric] = sum(values) / len(values) if values else None
            stats[metric + "_ci"] = (
                list(bootstrap_ci(values, n_boot, seed, alpha)) if len(values) > 1 else None
            )
        methods[method] = stats

    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "methods": methods,
        "reference": reference if reference in by_method else None,
        "per_concept": [r.to_dict() for r in rows],
        "embedders": _one_embedder_per_metric(rows),
        "config": dict(config or {}),
    }
    if reference in by_method:
        ref = {(r.concept, r.seed): r for r in by_method[reference]}
        differences: dict[str, dict[str, Any]] = {}
        for method, group in by_method.items():
            if method == reference:
                continue
            diffs = {}
            for metric in METRICS:
                pairs = [
                    (getattr(ref[(r.concept, r.seed)], metric), getattr(r, metric))
                    for r in group
                    if (r.concept, r.seed) in ref
                ]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                if pairs:
                    diffs[metric] = paired_bootstrap_diff(
                        [a for a, _ in pairs], [b for _, b in pairs], n_boot, seed, alpha
                    )
            differences[method] = diffs
        summary["differences"] = differences
    validate_summary(summary)
    return summary


def _one_embedder_per_metric(rows: list[ConceptResult]) -> dict[str, str]:
    """The embedder of each image metric over ``rows``.

    Raises:
        SchemaError: two records name different embedders for one metric (their numbers are not comparable).
    """
    chosen: dict[str, tuple[str, ConceptResult]] = {}
    for r in rows:
        for metric, name in r.embedders.items():
            first = chosen.setdefault(metric, (name, r))
            if first[0] != name:
                raise SchemaError(
                    f"{metric} of {r.key} was computed with {name}, but {first[1].key} with {first[0]}; "
                    "scores from two embedders cannot be compared: evaluate both with the same one"
                )
    return {metric: name for metric, (name, _) in chosen.items()}


def _check_ci(where: str, ci: Any) -> None:
    if ci is None:
        return
    if not (isinstance(ci, list) and len(ci) == 2 and all(_is_number(x) for x in ci) and ci[0] <= ci[1]):
        raise SchemaError(f"{where}: a CI must be null or [lo, hi] with lo <= hi, got {ci!r}")


def validate_summary(summary: Any, source: str = "summary") -> None:
    """Check a summary against the schema.

    Raises:
        SchemaError: a wrong ``schema_version``, a missing key, a method entry without every metric and
            its CI, a malformed difference, or an invalid per-concept record; the message names it.
    """
    if not isinstance(summary, Mapping):
        raise SchemaError(f"{source}: a summary must be a JSON object, got {type(summary).__name__}")
    if summary.get("schema_version") != SCHEMA_VERSION:
        raise SchemaError(
            f"{source}: schema_version {summary.get('schema_version')!r}, expected {SCHEMA_VERSION} "
            "(re-run the evaluation with this version of yochameleon)"
        )
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise SchemaError(f"{source}: missing key(s) {missing}")
    if not isinstance(summary["methods"], Mapping) or not isinstance(summary["config"], Mapping):
        raise SchemaError(f"{source}: 'methods' and 'config' must be JSON objects")
    if not isinstance(summary["per_concept"], list):
        raise SchemaError(f"{source}: 'per_concept' must be a list of records")
    embedders = summary.get("embedders", {})
    if not isinstance(embedders, Mapping) or not all(
        key in IMAGE_METRICS and isinstance(value, str) for key, value in embedders.items()
    ):
        raise SchemaError(f"{source}: 'embedders' must map image metrics to model names, got {embedders!r}")
    for method, stats in summary["methods"].items():
        if not isinstance(stats, Mapping):
            raise SchemaError(f"{source}: methods[{method!r}] must be a JSON object")
        need = ["n", "prompt_tokens", *METRICS, *(m + "_ci" for m in METRICS)]
        absent = [k for k in need if k not in stats]
        if absent:
            raise SchemaError(f"{source}: methods[{method!r}] lacks {absent}")
        for metric in METRICS:
            if stats[metric] is not None and not _is_number(stats[metric]):
                raise SchemaError(f"{source}: methods[{method!r}][{metric!r}] must be a number or null")
            _check_ci(f"{source}: methods[{method!r}][{metric + '_ci'!r}]", stats[metric + "_ci"])
    for method, diffs in (summary.get("differences") or {}).items():
        for metric, d in diffs.items():
            where = f"{source}: differences[{method!r}][{metric!r}]"
            if not isinstance(d, Mapping) or not {"mean", "ci"} <= set(d) or not _is_number(d["mean"]):
                raise SchemaError(f"{where} must hold a numeric 'mean' and a 'ci'")
            _check_ci(where, d["ci"])
    for i, record in enumerate(summary["per_concept"]):
        try:
            ConceptResult.from_dict(record)
        except SchemaError as exc:
            raise SchemaError(f"{source}: per_concept[{i}]: {exc}") from exc


def write_summary(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """Validate and write a summary JSON atomically (a crash never leaves half a file).

    Raises:
        SchemaError: the summary does not follow the schema.
    """
    validate_summary(summary)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    tmp.replace(p)
    return p


def load_summary(path: str | Path) -> dict[str, Any]:
    """Read and validate a summary JSON.

    Raises:
        SchemaError: missing file, invalid JSON, wrong schema version, missing keys or invalid records.
    """
    p = Path(path)
    if not p.is_file():
        raise SchemaError(f"results file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{p} is not valid JSON: {exc}") from exc
    validate_summary(data, str(p))
    return data


def records_of(summary: Mapping[str, Any]) -> list[ConceptResult]:
    """The per-concept records of a (validated) summary."""
    return [ConceptResult.from_dict(r) for r in summary["per_concept"]]


__all__ = [
    "COSINE_METRICS",
    "ConceptResult",
    "DEFAULT_REFERENCE",
    "IMAGE_METRICS",
    "METRICS",
    "SCHEMA_VERSION",
    "SchemaError",
    "load_summary",
    "records_of",
    "summarize",
    "validate_summary",
    "write_summary",
]
