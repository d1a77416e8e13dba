"""Reports: the paper-style table (Markdown + JSON) and PNG plots; the ``compare`` command."""

from __future__ import annotations

import json
from pathlib import Path

from yochameleon.eval.schema import METRICS, ConceptResult, load_summary, summarize, write_summary

TABLE_METRICS = (
    "recognition_weighted",
    "recognition_pos",
    "recognition_neg_hard",
    "recognition_neg_easy",
    "vqa",
    "text_qa",
    "clip_i",
    "gen_fidelity",
    "face_sim",
)


def _cell(stats: dict, metric: str) -> str:
    v = stats.get(metric)
    if v is None:
        return "–"
    ci = stats.get(metric + "_ci")
    return f"{v:.3f} ± {(ci[1] - ci[0]) / 2:.3f}" if ci else f"{v:.3f}"


def markdown_table(summary: dict) -> str:
    """Rows = methods, columns = prompt tokens and metrics (mean ± half the 95% CI)."""
    cols = [m for m in TABLE_METRICS if any(s.get(m) is not None for s in summary["methods"].values())]
    lines = ["| method | tokens | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for method, stats in summary["methods"].items():
        lines.append(
            f"| {method} | {stats.get('prompt_tokens', 0):.0f} | "
            + " | ".join(_cell(stats, m) for m in cols)
            + " |"
        )
    if summary.get("differences"):
        ref = summary.get("reference", "yochameleon")
        lines += [
            "",
            f"Paired differences vs `{ref}` (reference − method; 95% bootstrap CI):",
            "",
            "| method | metric | mean | CI | resolved |",
            "|---|---|---:|---|---|",
        ]
        for method, diffs in summary["differences"].items():
            for metric, d in diffs.items():
                if metric in TABLE_METRICS:
                    lines.append(
                        f"| {method} | {metric} | {d['mean']:+.3f} | [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] | "
                        f"{'no (crosses 0)' if d['crosses_zero'] else 'yes'} |"
                    )
    return "\n".join(lines)


def write_report(summary: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and PNG plots into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_summary(out / "report.json", summary)}
    (out / "report.md").write_text("# Results\n\n" + markdown_table(summary) + "\n")
    paths["md"] = out / "report.md"

    methods = list(summary["methods"])
    metrics = [m for m in TABLE_METRICS if any(summary["methods"][x].get(m) is not None for x in methods)]
    if metrics:
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(metrics) * max(1, len(methods)) / 2), 4))
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            st = summary["methods"][method]
            vals = [st.get(m) or 0.0 for m in metrics]
            err = [
                [(st.get(m) or 0) - (st.get(m + "_ci") or [st.get(m) or 0] * 2)[0] for m in metrics],
                [(st.get(m + "_ci") or [st.get(m) or 0] * 2)[1] - (st.get(m) or 0) for m in metrics],
            ]
            ax.bar(
                [j + i * width for j in range(len(metrics))], vals, width, yerr=err, capsize=2, label=method
            )
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(metrics))])
        ax.set_xticklabels(metrics, rotation=30, ha="right")
        ax.set_ylabel("score")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "metrics.png", dpi=120)
        plt.close(fig)
        paths["metrics_png"] = out / "metrics.png"
    points = [(m, s.get("prompt_tokens", 0), s.get("clip_i")) for m, s in summary["methods"].items()]
    points = [p for p in points if p[2] is not None]
    if points:
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, tokens, value in points:
            ax.scatter(max(tokens, 1), value)
            ax.annotate(name, (max(tokens, 1), value), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("prompt tokens about the concept")
        ax.set_ylabel("CLIP-I")
        fig.tight_layout()
        fig.savefig(out / "tokens_vs_clip_i.png", dpi=120)
        plt.close(fig)
        paths["tokens_png"] = out / "tokens_vs_clip_i.png"
    return paths


def compare(paths: list[str | Path]) -> dict:
    """Merge run summaries (or run directories holding ``report.json``) into one summary."""
    records, config = [], {}
    for p in paths:
        p = Path(p)
        data = load_summary(p / "report.json" if p.is_dir() else p)
        names = set(ConceptResult.__dataclass_fields__)
        records += [ConceptResult(**{k: v for k, v in r.items() if k in names}) for r in data["per_concept"]]
        config[str(p)] = data["config"]
    return summarize(records, config)


def _cmd_compare(args) -> None:
    summary = compare(args.inputs)
    paths = write_report(summary, args.out)
    print(markdown_table(summary))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in paths.items()))


def register(subparsers) -> None:
    """``yochameleon compare SUMMARY_OR_RUN_DIR ... --out DIR``."""
    p = subparsers.add_parser("compare", help="merge results into the paper-style table and plots")
    p.add_argument("inputs", nargs="+", help="summary JSON files or run directories with report.json")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_compare)


__all__ = ["markdown_table", "write_report", "compare", "register", "METRICS", "json"]
