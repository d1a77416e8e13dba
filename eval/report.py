"""Reports: the paper-style table (Markdown + JSON), PNG plots, and the ``yochameleon compare`` command.

``write_report(summary, out_dir)`` writes::

    out_dir/report.json           the summary (schema in yochameleon.eval.schema)
    out_dir/report.md             rows = methods, columns = prompt tokens + metrics (mean ± CI half-width)
    out_dir/metrics.png           grouped bars of the main metrics with 95% CI error bars
    out_dir/tokens_vs_clip_i.png  prompt tokens vs CLIP-I, when some method has CLIP-I
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from yochameleon.eval.schema import (
    DEFAULT_REFERENCE,
    IMAGE_METRICS,
    SchemaError,
    load_summary,
    records_of,
    summarize,
    validate_summary,
    write_summary,
)

# Column order of the table: the headline numbers first, recognition details after.
TABLE_METRICS = (
    "recognition_weighted",
    "vqa",
    "text_qa",
    "clip_i",
    "clip_t",
    "face_sim",
    "gen_fidelity",
    "recognition_pos",
    "recognition_neg_hard",
    "recognition_neg_easy",
)
# The bar chart leaves out the recognition breakdown to stay readable.
PLOT_METRICS = ("recognition_weighted", "vqa", "text_qa", "clip_i", "clip_t", "face_sim", "gen_fidelity")
LABELS = {
    "recognition_weighted": "Recognition",
    "recognition_pos": "Rec. pos",
    "recognition_neg_hard": "Rec. neg (hard)",
    "recognition_neg_easy": "Rec. neg (easy)",
    "vqa": "VQA",
    "text_qa": "Text QA",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "face_sim": "Face sim",
    "gen_fidelity": "Gen. fidelity",
}


def _present(summary: Mapping[str, Any], metrics: Sequence[str]) -> list[str]:
    """The metrics some method has a value for."""
    return [m for m in metrics if any(s.get(m) is not None for s in summary["methods"].values())]


def _cell(stats: Mapping[str, Any], metric: str, best: bool) -> str:
    value = stats.get(metric)
    if value is None:
        return "–"
    ci = stats.get(metric + "_ci")
    text = f"{value:.3f} ± {(ci[1] - ci[0]) / 2:.3f}" if ci else f"{value:.3f}"
    return f"**{text}**" if best else text


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The paper-style table: rows = methods, columns = prompt tokens and metrics.

    Cells are ``mean ± half the width of the 95% CI`` (just the mean when there is no CI, i.e. a single
    concept and seed); ``–`` where a metric does not apply; the best mean of a column is bold when
    several methods have one. When the summary's ``config.timings.per_concept`` holds wall times (the
    toy-world benchmark's), a ``fit s`` column gives each method's mean seconds per concept and seed
    to train (or encode). A line per image metric names the model that computed it (see
    ``embedders`` in :mod:`yochameleon.eval.schema`). Paired differences vs the reference method
    follow when present.
    """
    cols = _present(summary, TABLE_METRICS)
    best = {}
    for m in cols:
        values = [s[m] for s in summary["methods"].values() if s.get(m) is not None]
        best[m] = max(values) if len(values) > 1 else None
    # Wall time per concept (a benchmark's config.timings.per_concept), beside the quality numbers.
    timings = ((summary.get("config") or {}).get("timings") or {}).get("per_concept") or {}
    fit = " fit s |" if timings else ""
    lines = [
        f"| method | tokens |{fit} " + " | ".join(LABELS[m] for m in cols) + " | n |",
        "|---|---:|" + ("---:|" if timings else "") + "---:|" * len(cols) + "---:|",
    ]
    for method, stats in summary["methods"].items():
        cells = [_cell(stats, m, stats.get(m) is not None and stats.get(m) == best[m]) for m in cols]
        seconds = ""
        if timings:
            t = timings.get(method)
            seconds = f" {t['fit_mean']:.1f} |" if t else " – |"
        lines.append(
            f"| {method} | {stats.get('prompt_tokens', 0):.0f} |{seconds} "
            + " | ".join(cells)
            + f" | {stats['n']} |"
        )
    embedders = summary.get("embedders") or {}
    named = [m for m in cols if m in IMAGE_METRICS]
    if named:
        lines.append("")
        lines += [
            f"{LABELS[m]} computed with {embedders.get(m, 'an embedder the results do not name')}."
            for m in named
        ]
    differences = summary.get("differences") or {}
    rows = [
        (method, metric, d)
        for method, diffs in differences.items()
        for metric in TABLE_METRICS
        if (d := diffs.get(metric)) is not None
    ]
    if rows:
        ref = summary.get("reference") or DEFAULT_REFERENCE
        lines += [
            "",
            f"Paired differences, `{ref}` minus method, over shared (concept, seed) pairs (95% bootstrap CI):",
            "",
            "| method | metric | difference | CI | pairs | resolved |",
            "|---|---|---:|---|---:|---|",
        ]
        for method, metric, d in rows:
            lines.append(
                f"| {method} | {LABELS[metric]} | {d['mean']:+.3f} | [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] | "
                f"{d.get('n', '')} | {'no (CI crosses 0)' if d.get('crosses_zero') else 'yes'} |"
            )
    return "\n".join(lines)


def _bar_chart(summary: Mapping[str, Any], path: Path, plt: Any) -> bool:
    methods = list(summary["methods"])
    metrics = _present(summary, PLOT_METRICS)
    if not metrics:
        return False
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(metrics) * len(methods) + 2), 4.2))
    for i, method in enumerate(methods):
        stats = summary["methods"][method]
        xs, heights, low, high = [], [], [], []
        for j, m in enumerate(metrics):
            if stats.get(m) is None:
                continue  # not applicable: no bar rather than a misleading zero
            ci = stats.get(m + "_ci") or [stats[m], stats[m]]
            xs.append(j + (i - (len(methods) - 1) / 2) * width)
            heights.append(stats[m])
            low.append(stats[m] - ci[0])
            high.append(ci[1] - stats[m])
        if xs:
            ax.bar(xs, heights, width, yerr=[low, high], capsize=2, label=method)
    # Headroom above the tallest error bar so the legend does not cover the bars.
    extremes = [
        v
        for st in summary["methods"].values()
        for m in metrics
        for v in (st.get(m + "_ci") or [st.get(m)] * 2)
        if v is not None
    ]
    ax.set_ylim(min(0.0, min(extremes) - 0.05), max(1.0, max(extremes)) * 1.18)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([LABELS[m] for m in metrics], rotation=20, ha="right")
    ax.set_ylabel("score (error bars: 95% CI)")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Metrics by method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _tokens_scatter(summary: Mapping[str, Any], path: Path, plt: Any) -> bool:
    points = [(m, s["prompt_tokens"], s["clip_i"], s.get("clip_i_ci")) for m, s in summary["methods"].items()]
    points = [p for p in points if p[2] is not None]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, tokens, value, ci in points:
        x = max(tokens, 1.0)  # log axis: a method with no prompt sits at 1
        err = [[value - ci[0]], [ci[1] - value]] if ci else None
        ax.errorbar([x], [value], yerr=err, fmt="o", capsize=3)
        ax.annotate(name, (x, value), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.margins(x=0.2)  # room for the labels of the outermost points
    ax.set_xlabel("prompt tokens about the concept (0 plotted at 1)")
    ax.set_ylabel("CLIP-I")
    ax.set_title("Prompt tokens vs. CLIP image similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(summary: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``out_dir``.

    Returns:
        The written paths: ``json``, ``md`` and, when there was something to plot, ``metrics_png``
        and ``tokens_png``.

    Raises:
        SchemaError: the summary does not follow the schema.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    validate_summary(summary)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_summary(out / "report.json", summary)}
    config = summary.get("config") or {}
    notes = [
        "",
        "Cells: mean ± half-width of the 95% bootstrap CI over concepts and seeds (no CI with one record); "
        "– = not applicable. Tokens: prompt tokens spent on the concept.",
    ]
    if (config.get("timings") or {}).get("per_concept"):
        notes.append(
            "fit s: mean wall seconds per concept and seed to fit the method (train it, or encode the "
            "concept); the full breakdown is in the summary's config.timings.per_concept."
        )
    if config:
        notes += [
            "",
            "Config: " + ", ".join(f"`{k}`={v}" for k, v in config.items() if not isinstance(v, dict)),
        ]
    (out / "report.md").write_text("# Results\n\n" + markdown_table(summary) + "\n" + "\n".join(notes) + "\n")
    paths["md"] = out / "report.md"
    if _bar_chart(summary, out / "metrics.png", plt):
        paths["metrics_png"] = out / "metrics.png"
    if _tokens_scatter(summary, out / "tokens_vs_clip_i.png", plt):
        paths["tokens_png"] = out / "tokens_vs_clip_i.png"
    return paths


def compare(
    paths: Sequence[str | Path], reference: str | None = DEFAULT_REFERENCE, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Merge several summaries into one, recomputing means, CIs and differences over all records.

    Args:
        paths: summary JSON files, or run directories holding ``report.json``.
        reference: the method the others are compared with.
        n_boot, seed: bootstrap settings.

    Returns:
        A summary whose ``config`` maps each input path to its config.

    Raises:
        SchemaError: no inputs, an unreadable or invalid summary, or the same (method, concept, seed)
            in two inputs (named).
    """
    if not paths:
        raise SchemaError("compare needs at least one summary file or run directory")
    records, config, origin = [], {}, {}
    for p in map(Path, paths):
        file = p / "report.json" if p.is_dir() else p
        data = load_summary(file)
        for record in records_of(data):
            if record.key in origin:
                raise SchemaError(
                    f"{record.key} appears in both {origin[record.key]} and {file}; pass each run once"
                )
            origin[record.key] = file
            records.append(record)
        config[str(file)] = data["config"]
    return summarize(records, config, reference=reference, n_boot=n_boot, seed=seed)


__all__ = [
    "LABELS",
    "PLOT_METRICS",
    "TABLE_METRICS",
    "compare",
    "contact_sheet",
    "markdown_table",
    "write_report",
]


def contact_sheet(rows: Sequence[Sequence], scale: int = 4, pad: int = 2):
    """Rows of images on a white sheet, each tile the first image's size times ``scale``.

    Nearest-neighbour upscaling keeps small (toy-world, 32-64 px) images readable. Rows may differ in
    length (a missing generation leaves a gap).

    Args:
        rows: PIL images, one list per row; at least one image.
        scale: tile side as a multiple of the first image's width.
        pad: white pixels between and around tiles.

    Returns:
        The sheet, an RGB PIL image.
    """
    from PIL import Image

    first = next((image for row in rows for image in row), None)
    if first is None:
        raise ValueError("a contact sheet needs at least one image")
    side = first.size[0] * scale
    width = max(len(row) for row in rows) * (side + pad) + pad
    sheet = Image.new("RGB", (width, len(rows) * (side + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = image.convert("RGB").resize((side, side), Image.NEAREST)
            sheet.paste(tile, (pad + c * (side + pad), pad + r * (side + pad)))
    return sheet
