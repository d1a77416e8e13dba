"""The user's concept folder: ``photos/``, optional ``concept.yaml`` and ``qa.jsonl``.

```
my-dog/
  photos/*.png|jpg    3–10 photos
  concept.yaml        name, category, is_person, description, facts (all optional)
  qa.jsonl            {"question": "...", "answer": "..."} per line; "<sks>" names the concept
```

Also imports the Yo'LLaVA / Yo'Chameleon layouts (a folder of photos named after the concept, with
the QA and caption JSON files keyed by concept name) into this layout.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from yochameleon.concept import validate_concept_name
from yochameleon.data.photos import Photo, PhotoReport, load_photos
from yochameleon.errors import ConceptError, DataError

ALLOWED_KEYS = {"name", "category", "is_person", "description", "facts"}


@dataclass
class ConceptFolder:
    """A loaded, validated concept folder."""

    root: Path
    name: str
    photos: list[Photo]
    report: PhotoReport
    category: str = "object"
    is_person: bool = False
    description: str = ""
    facts: list[str] = field(default_factory=list)
    qa: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path, min_photos: int = 3) -> ConceptFolder:
        """Load and validate ``path``.

        Raises:
            DataError: missing folder or photos, too few usable photos, malformed YAML / JSONL.
        """
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"concept folder {root} does not exist")
        meta: dict = {}
        yml = root / "concept.yaml"
        if yml.is_file():
            try:
                meta = yaml.safe_load(yml.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise DataError(f"{yml} is not valid YAML: {exc}") from exc
            if not isinstance(meta, dict):
                raise DataError(f"{yml} must be a mapping")
            unknown = set(meta) - ALLOWED_KEYS
            if unknown:
                raise DataError(f"{yml}: unknown keys {sorted(unknown)}; allowed: {sorted(ALLOWED_KEYS)}")
        name = str(meta.get("name") or root.name)
        try:
            validate_concept_name(name)
        except ConceptError as exc:
            raise DataError(f"{root}: {exc}") from exc
        facts = meta.get("facts") or []
        if not isinstance(facts, list) or not all(isinstance(f, str) for f in facts):
            raise DataError(f"{yml}: facts must be a list of strings")
        report = load_photos(root / "photos", min_photos=min_photos)
        return cls(root, name, report.photos, report, str(meta.get("category") or "object"),
                   bool(meta.get("is_person", False)), str(meta.get("description") or ""), facts,
                   read_qa(root / "qa.jsonl"))


def read_qa(path: Path) -> list[tuple[str, str]]:
    """Question/answer pairs from a JSONL file (missing file: none). Errors name the line."""
    if not path.is_file():
        return []
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise DataError(f"{path}:{n}: each line needs string fields 'question' and 'answer'")
        pairs.append((row["question"], row["answer"]))
    return pairs


def import_yollava(photo_dir: str | Path, out_dir: str | Path, name: str, text_qa_json: str | Path | None = None,
                   captions_json: str | Path | None = None) -> Path:
    """Import a Yo'LLaVA / Yo'Chameleon concept into our folder layout.

    Args:
        photo_dir: the dataset's folder of training photos for this concept.
        out_dir: the concept folder to write.
        name: the concept's key in the JSON files (e.g. ``"bo"``).
        text_qa_json: the text-QA file (``{name: {"0": {question, option: {A, B}, correct_answer}}}``);
            each item becomes a QA pair with the correct option's text as the answer.
        captions_json: the detailed-captions file (``{name: caption}``); becomes the description.
    """
    out = Path(out_dir)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    src = Path(photo_dir)
    if not src.is_dir():
        raise DataError(f"photo folder {src} does not exist")
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            shutil.copy2(p, out / "photos" / p.name)
    meta = {"name": name}
    if captions_json:
        caps = json.loads(Path(captions_json).read_text(encoding="utf-8"))
        if name in caps:
            meta["description"] = str(caps[name]).replace("sks", "<sks>")
    (out / "concept.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    if text_qa_json:
        items = json.loads(Path(text_qa_json).read_text(encoding="utf-8")).get(name, {})
        lines = []
        for item in items.values():
            answer = item["option"][item["correct_answer"]]
            lines.append(json.dumps({"question": item["question"].replace("sks", "<sks>"), "answer": answer}))
        (out / "qa.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    return out
