"""The versioned JSONL manifest of a prepared concept (``DATA_DIR/manifest.jsonl``).

Line 1 is a header; every other line is one record.

Header::

    {"manifest_version": 1, "concept": "bo", "n_g": 16, "counts": {"recognition/pos": 200, ...},
     "created_with": "0.1.0"}

Record::

    {"id": "bo-00042", "concept": "bo",
     "task": "understanding" | "generation",
     "kind": "recognition" | "text_qa" | "generation_real" | "generation_soft",
     "question": "<image>Is <sks> in this photo?",   # <sks>, <image> are placeholders
     "answer": "Yes, <sks> is in this photo." | null,  # null for generation
     "image": "images/3fa2….png" | null,               # relative to DATA_DIR, never outside it
     "flip": false,                                     # horizontally flipped before VQ encoding
     "label": "pos" | "neg_hard" | "neg_easy" | null,  # recognition only
     "n_g": 16 | null,                                  # g-tokens of a generation target
     "prompt_form": "paper" | "code" | null,            # soft positives only
     "score": 0.83 | null}                              # retrieval similarity of a soft positive
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from yochameleon import __version__

MANIFEST = "manifest.jsonl"


def write_manifest(data_dir: str | Path, concept: str, n_g: int, records: list[dict]) -> dict:
    """Write the manifest atomically and return its header."""
    counts = Counter(f"{r['kind']}/{r['label']}" if r.get("label") else r["kind"] for r in records)
    header = {"manifest_version": 1, "concept": concept, "n_g": n_g, "counts": dict(sorted(counts.items())),
              "created_with": __version__}
    path = Path(data_dir) / MANIFEST
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps(header, ensure_ascii=False) + "\n")
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return header


def summary_table(header: dict, records: list[dict]) -> str:
    """Counts per kind and per soft-positive bin (by number of g-tokens), as a text table."""
    lines = [f"concept {header['concept']} (n_g={header['n_g']})", f"{'kind':28s} {'count':>6s}"]
    for key, n in header["counts"].items():
        lines.append(f"{key:28s} {n:6d}")
    soft = Counter(r["n_g"] for r in records if r["kind"] == "generation_soft")
    if soft:
        lines.append("soft positives per bin (g-tokens: count)")
        lines.append("  " + "  ".join(f"{k}:{soft[k]}" for k in sorted(soft)))
    lines.append(f"{'total':28s} {len(records):6d}")
    return "\n".join(lines)
