"""The user's concept folder: ``photos/``, optional ``concept.yaml`` and ``qa.jsonl``.

```
my-dog/
  photos/*.png|jpg|jpeg|webp   3–10 photos (bad files are skipped and reported, see data.photos)
  concept.yaml                 name, category, is_person, description, facts (all optional)
  qa.jsonl                     {"question": "...", "answer": "..."} per line; "<sks>" names the concept
```

``concept.yaml`` fields: ``name`` (str, default: the folder name; letters, digits, ``-_.``),
``category`` (str, e.g. ``dog``; default ``object``), ``is_person`` (bool), ``description`` (str) and
``facts`` (list of str; a fact may name the concept as ``<sks>`` or ``<NAME>`` and other concepts as
``<NAME>``: ``"<bo> is the brother of <mắm>"``, see :mod:`yochameleon.relations`). Every question in
``qa.jsonl`` must mention the concept as ``<sks>``.
The Yo'LLaVA and Yo'Chameleon dataset layouts import into this layout (see ``data.importers``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from yochameleon.concept import validate_concept_name
from yochameleon.data.importers import import_yochameleon_json, import_yollava
from yochameleon.data.photos import Photo, PhotoReport, load_photos
from yochameleon.errors import ConceptError, DataError
from yochameleon.prompts import SKS

logger = logging.getLogger(__name__)

ALLOWED_KEYS = {"name", "category", "is_person", "description", "facts"}
PHOTOS = "photos"
CONCEPT_YAML = "concept.yaml"
QA_JSONL = "qa.jsonl"
# The method is designed for a handful of photos; more still work but are reported.
RECOMMENDED_MAX_PHOTOS = 10

__all__ = ["ConceptFolder", "read_qa", "read_concept_yaml", "import_yollava", "import_yochameleon_json"]


@dataclass
class ConceptFolder:
    """A loaded, validated concept folder.

    Attributes:
        root: the folder.
        name: the concept's name (``concept.yaml`` ``name``, else the folder name).
        photos: the usable photos.
        report: what was skipped while loading photos, and why.
        category: what the concept is (``dog``, ``mug``, ``person``…).
        is_person: whether the concept is a person (selects the default QA questions).
        description: free text about the concept (may use ``<sks>``).
        facts: short free-text facts about the concept.
        qa: ``(question, answer)`` pairs from ``qa.jsonl``.
    """

    root: Path
    name: str
    photos: list[Photo]
    report: PhotoReport
    category: str = "object"
    is_person: bool = False
    description: str = ""
    facts: list[str] = field(default_factory=list)
    qa: list[tuple[str, str]] = field(default_factory=list)

    @property
    def photo_paths(self) -> list[Path]:
        """Paths of the usable photos."""
        return [p.path for p in self.photos]

    @classmethod
    def load(cls, path: str | Path, min_photos: int = 3) -> ConceptFolder:
        """Load and validate the concept folder at ``path``.

        Raises:
            DataError: missing folder or ``photos/``, too few usable photos, malformed
                ``concept.yaml`` or ``qa.jsonl`` (the message names the file, key or line).
        """
        root = Path(path)
        if not root.exists():
            raise DataError(f"concept folder {root} does not exist")
        if not root.is_dir():
            raise DataError(f"concept folder {root} is not a folder")
        photos_dir = root / PHOTOS
        if not photos_dir.is_dir():
            raise DataError(
                f"concept folder {root} has no {PHOTOS}/ folder; put 3–10 photos of the concept there"
            )
        meta = read_concept_yaml(root / CONCEPT_YAML)
        name = meta.get("name", root.resolve().name)
        try:
            name = validate_concept_name(name)  # NFC: a folder named on macOS may spell it decomposed
        except ConceptError as exc:
            raise DataError(f"{root}: {exc}") from exc
        qa = read_qa(root / QA_JSONL)
        report = load_photos(photos_dir, min_photos=min_photos, root=root)
        if len(report.photos) > RECOMMENDED_MAX_PHOTOS:
            logger.warning(
                "%s has %d photos; the method is designed for 3–%d (all are used)",
                root,
                len(report.photos),
                RECOMMENDED_MAX_PHOTOS,
            )
        return cls(
            root=root,
            name=name,
            photos=report.photos,
            report=report,
            category=meta.get("category", "object"),
            is_person=meta.get("is_person", False),
            description=meta.get("description", ""),
            facts=meta.get("facts", []),
            qa=qa,
        )


def read_concept_yaml(path: Path) -> dict:
    """The validated fields of ``concept.yaml`` (missing file: no fields).

    Raises:
        DataError: invalid YAML, not a mapping, unknown keys or wrongly typed values.
    """
    if not path.is_file():
        return {}
    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid YAML: {exc}") from exc
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise DataError(f"{path} must be a mapping of {sorted(ALLOWED_KEYS)}, got {type(meta).__name__}")
    unknown = set(map(str, meta)) - ALLOWED_KEYS
    if unknown:
        raise DataError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(ALLOWED_KEYS)}")
    for key in ("name", "category", "description"):
        if key in meta and not isinstance(meta[key], str):
            raise DataError(f"{path}: {key} must be a string, got {meta[key]!r}")
    if "category" in meta and not meta["category"].strip():
        raise DataError(f"{path}: category must not be empty")
    if "is_person" in meta and not isinstance(meta["is_person"], bool):
        raise DataError(f"{path}: is_person must be true or false, got {meta['is_person']!r}")
    facts = meta.get("facts", [])
    if facts is None:
        facts = []
    if not isinstance(facts, list) or not all(isinstance(f, str) and f.strip() for f in facts):
        raise DataError(f"{path}: facts must be a list of non-empty strings")
    meta["facts"] = [f.strip() for f in facts]
    return meta


def read_qa(path: Path) -> list[tuple[str, str]]:
    """Question/answer pairs from a JSONL file (missing file: none). Errors name the line.

    Raises:
        DataError: a line is not JSON, lacks string ``question``/``answer``, has empty text, or a
            question does not mention the concept as ``<sks>``.
    """
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from exc
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("question"), str)
            or not isinstance(row.get("answer"), str)
        ):
            raise DataError(f"{path}:{n}: each line needs string fields 'question' and 'answer'")
        question, answer = row["question"].strip(), row["answer"].strip()
        if not question or not answer:
            raise DataError(f"{path}:{n}: question and answer must not be empty")
        if SKS not in question:
            raise DataError(
                f"{path}:{n}: the question must name the concept as {SKS} (e.g. 'What colour is {SKS}?')"
            )
        pairs.append((question, answer))
    return pairs
