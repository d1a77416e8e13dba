"""Evaluation: model-agnostic metrics, the shared results schema and reports.

Importing this package is cheap (numpy only); matplotlib loads when a report is written. The harness
(``yochameleon.eval.harness``) and the benchmarks import models and are not re-exported here.
"""

from yochameleon.eval.metrics import (
    LABELS,
    MetricError,
    bootstrap_ci,
    choice_matches,
    clip_i,
    clip_i_with,
    clip_t,
    clip_t_with,
    face_similarity,
    logits_identical_except,
    mc_prompt,
    mcqa_accuracy,
    paired_bootstrap_diff,
    parse_yes_no,
    recognition_scores,
    score_choice,
    shuffle_options,
    yes_no_from_logprobs,
)
from yochameleon.eval.report import compare, markdown_table, write_report
from yochameleon.eval.schema import (
    METRICS,
    SCHEMA_VERSION,
    ConceptResult,
    SchemaError,
    load_summary,
    summarize,
    validate_summary,
    write_summary,
)

__all__ = [
    "LABELS",
    "METRICS",
    "SCHEMA_VERSION",
    "ConceptResult",
    "MetricError",
    "SchemaError",
    "bootstrap_ci",
    "choice_matches",
    "clip_i",
    "clip_i_with",
    "clip_t",
    "clip_t_with",
    "compare",
    "face_similarity",
    "load_summary",
    "logits_identical_except",
    "markdown_table",
    "mc_prompt",
    "mcqa_accuracy",
    "paired_bootstrap_diff",
    "parse_yes_no",
    "recognition_scores",
    "score_choice",
    "shuffle_options",
    "summarize",
    "validate_summary",
    "write_report",
    "write_summary",
    "yes_no_from_logprobs",
]
