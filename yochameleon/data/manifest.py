"""The versioned JSONL manifest of a prepared concept (``DATA_DIR/manifest.jsonl``).

Line 1 is a header; every other line is one record. Schema, version 2:

Header::

    {"manifest_version": 2,            # int; readers refuse other versions
     "concept": "bo",                  # the concept's name
     "n_g": 16,                        # generation tokens of the concept
     "counts": {"recognition/pos": 200, "recognition/neg_hard": 100, "recognition/neg_easy": 100,
                "text_qa": 50, "generation_real": 67, "generation_soft": 1000},   # per kind[/label]
     "settings": {"concept.n_g": 16, "concept.concept_dir": "/abs/bo", "data.index_dir": "/abs/index",
                  "data.n_recognition": 200, ...},   # the recipe keys the records were built with
     "created_with": "0.1.0"}          # yochameleon version that wrote it

``settings`` holds every recorded key of :class:`~yochameleon.data.config.DataConfig` (paths made
absolute); training compares it with its recipe and refuses a folder prepared otherwise. Version 1
had no ``settings``.

Record (every field present; ``null`` where it does not apply)::

    {"id": "bo-00042",                                  # unique within the manifest
     "concept": "bo",                                   # equals the header's concept
     "task": "understanding" | "generation",
     "kind": "recognition" | "text_qa" | "relation" | "generation_real" | "generation_soft",
     "question": "<image>Is <sks> in this photo?",      # <sks>, <image> are placeholders
     "answer": "Yes, <sks> is in this photo." | null,   # null exactly for generation
     "image": "images/3fa2….png" | null,                # relative to DATA_DIR, must stay inside it
     "flip": false,                                      # flip horizontally before VQ encoding
     "label": "pos" | "neg_hard" | "neg_easy" | null,   # recognition only
     "n_g": 16 | null,                                   # g-tokens of a generation prompt/target
     "prompt_form": "paper" | "code" | null,             # soft positives only
     "score": 0.83 | null,                               # soft positives: retrieval similarity
     "mentions": ["mắm"] | null,                         # relation only: the other concepts named
     "fact": "<bo> is the brother of <mắm>" | null}      # relation only: the fact it comes from

A relation record names its own concept ``<sks>`` and the others ``<NAME>`` (see
:mod:`yochameleon.relations`). Records written before relations existed lack the last two fields;
they read as ``null``.

Recognition answers start with "Yes," (``pos``) or "No," (negatives). Real photos use the full
``n_g``; a soft positive uses ``1 <= n_g < header n_g``.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yochameleon import __version__
from yochameleon.data.records import Record, record_key
from yochameleon.errors import DataError

MANIFEST = "manifest.jsonl"
MANIFEST_VERSION = 2
HEADER_FIELDS = ("manifest_version", "concept", "n_g", "counts", "settings", "created_with")


@dataclass
class Manifest:
    """A read (validated) manifest.

    Attributes:
        header: the header object.
        records: the records, in file order.
        data_dir: the data directory it was read from (``None`` if built in memory).
    """

    header: dict
    records: list[Record] = field(default_factory=list)
    data_dir: Path | None = None

    @property
    def concept(self) -> str:
        return self.header["concept"]

    @property
    def n_g(self) -> int:
        return self.header["n_g"]

    @property
    def counts(self) -> dict[str, int]:
        return self.header["counts"]

    def record_dicts(self) -> list[dict]:
        """The records as plain dicts (the trainer's input format)."""
        return [r.to_dict() for r in self.records]

    def image_path(self, record: Record) -> Path:
        """Absolute path of a record's image."""
        if self.data_dir is None or record.image is None:
            raise DataError(f"record {record.id} has no image in a data directory")
        return self.data_dir / record.image


def count_records(records: list[Record] | list[dict]) -> dict[str, int]:
    """Counts per ``kind`` (and ``kind/label`` for recognition), sorted by key."""
    return dict(sorted(Counter(record_key(r) for r in records).items()))


def _as_records(records: list[Record] | list[dict]) -> list[Record]:
    return [r if isinstance(r, Record) else Record.from_dict(r) for r in records]


def _check_inside(root: Path, image: str, where: str) -> Path:
    path = (root / image).resolve()
    if root not in path.parents:
        raise DataError(f"{where}: image {image!r} resolves outside the data directory {root}; refusing it")
    return path


def _check_records(records: list[Record], concept: str, n_g: int, where: str) -> None:
    ids: set[str] = set()
    for r in records:
        if r.id in ids:
            raise DataError(f"{where}: duplicate record id {r.id!r}")
        ids.add(r.id)
        if r.concept != concept:
            raise DataError(
                f"{where}: record {r.id} is for concept {r.concept!r}, the manifest for {concept!r}"
            )
        if r.kind == "generation_real" and r.n_g != n_g:
            raise DataError(f"{where}: real-photo record {r.id} uses {r.n_g} g-tokens, the concept has {n_g}")
        if r.kind == "generation_soft" and not r.n_g < n_g:
            raise DataError(
                f"{where}: soft positive {r.id} uses {r.n_g} g-tokens; it must be fewer than {n_g}"
            )


def write_manifest(
    data_dir: str | Path,
    concept: str,
    n_g: int,
    records: list[Record] | list[dict],
    settings: dict[str, Any] | None = None,
) -> dict:
    """Validate ``records`` and write ``DATA_DIR/manifest.jsonl`` atomically; return the header.

    Args:
        data_dir: the data directory.
        concept: the concept's name.
        n_g: generation tokens of the concept.
        records: the records.
        settings: the recipe keys the records were built with
            (:func:`~yochameleon.data.config.prepared_settings`); empty for hand-built manifests,
            which training then refuses as prepared with unknown settings.

    Raises:
        DataError: an invalid record, duplicate ids, a record of another concept, or an image path
            outside the data directory.
    """
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    recs = _as_records(records)
    _check_records(recs, concept, n_g, str(root / MANIFEST))
    for r in recs:
        if r.image is not None:
            _check_inside(root.resolve(), r.image, f"record {r.id}")
    header = {
        "manifest_version": MANIFEST_VERSION,
        "concept": concept,
        "n_g": n_g,
        "counts": count_records(recs),
        "settings": dict(settings or {}),
        "created_with": __version__,
    }
    path = root / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(json.dumps(header, ensure_ascii=False) + "\n")
            for rec in recs:
                fh.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return header


def read_header(data_dir: str | Path) -> dict:
    """The header of ``DATA_DIR/manifest.jsonl`` as written, of any version, without reading records.

    Raises:
        DataError: no manifest, or a first line that is not a JSON object.
    """
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} does not exist; run `yochameleon prepare` first")
    with path.open(encoding="utf-8") as fh:
        first = fh.readline()
    try:
        header = json.loads(first)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:1: the header is not valid JSON ({exc.msg})") from exc
    if not isinstance(header, dict):
        raise DataError(f"{path}:1: the header must be an object")
    return header


def read_manifest(data_dir: str | Path, check_images: bool = True) -> Manifest:
    """Read and validate ``DATA_DIR/manifest.jsonl``.

    Args:
        data_dir: the data directory.
        check_images: also require every record image to exist.

    Raises:
        DataError: missing or malformed manifest (the message names the line), an unsupported
            version, counts that do not match the records (a truncated file), an image path that
            resolves outside the data directory, or a missing image.
    """
    root = Path(data_dir).resolve()
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} does not exist; run `yochameleon prepare` first")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not any(line.strip() for line in lines):
        raise DataError(f"{path} is empty; run `yochameleon prepare` again")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:1: the header is not valid JSON ({exc.msg})") from exc
    if not isinstance(header, dict):
        raise DataError(f"{path}:1: the header must be an object")
    if header.get("manifest_version") != MANIFEST_VERSION:
        raise DataError(
            f"{path}: unsupported manifest_version {header.get('manifest_version')!r} "
            f"(this version of yochameleon reads {MANIFEST_VERSION}); run `yochameleon prepare` again"
        )
    missing = [k for k in HEADER_FIELDS if k not in header]
    if missing:
        raise DataError(f"{path}:1: the header lacks {missing}")
    records = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            records.append(Record.from_dict(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        except (DataError, TypeError) as exc:
            raise DataError(f"{path}:{n}: {exc}") from exc
    _check_records(records, header["concept"], header["n_g"], str(path))
    if count_records(records) != header["counts"]:
        raise DataError(
            f"{path}: the records ({count_records(records)}) do not match the header counts "
            f"({header['counts']}); the file is incomplete — run `yochameleon prepare` again"
        )
    for r in records:
        if r.image is not None:
            image = _check_inside(root, r.image, f"{path}: record {r.id}")
            if check_images and not image.is_file():
                raise DataError(f"{path}: record {r.id}: image {r.image} is missing from the data directory")
    return Manifest(header, records, root)


def summary_table(manifest: Manifest | dict, records: list[Record] | list[dict] | None = None) -> str:
    """Counts per kind and per soft-positive bin as a text table.

    Args:
        manifest: a :class:`Manifest`, or a header dict (then pass ``records``).
        records: the records when ``manifest`` is a header.
    """
    if isinstance(manifest, Manifest):
        header, recs = manifest.header, manifest.records
    else:
        header, recs = manifest, _as_records(records or [])
    lines = [
        f"concept {header['concept']} (n_g={header['n_g']}, manifest v{header['manifest_version']})",
        f"  {'kind':28s} {'count':>6s}",
    ]
    for key, n in header["counts"].items():
        lines.append(f"  {key:28s} {n:6d}")
    lines.append(f"  {'total':28s} {sum(header['counts'].values()):6d}")
    bins: dict[int, list[float]] = defaultdict(list)
    for r in recs:
        if r.kind == "generation_soft":
            bins[r.n_g].append(r.score)
    if bins:
        lines.append(
            f"  soft positives per bin: {'g-tokens':>8s} {'count':>6s} {'min score':>10s} {'max score':>10s}"
        )
        for m in sorted(bins):
            s = bins[m]
            lines.append(f"  {'':23s} {m:8d} {len(s):6d} {min(s):10.4f} {max(s):10.4f}")
    return "\n".join(lines)
