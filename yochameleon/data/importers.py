"""Import the Yo'LLaVA and Yo'Chameleon dataset layouts into a concept folder.

**Yo'LLaVA layout**: ``DATASET/train/<name>/*.png`` (sub-folders such as ``negative_example/`` are
ignored), plus optional JSON files keyed by concept name:

* text QA ``{name: {"0": {"question": "... sks ...", "option": {"A": .., "B": ..}, "correct_answer": "A"}}}``
  (``options`` is accepted too): each item becomes a ``qa.jsonl`` pair answered with the correct
  option's text;
* detailed captions ``{name: "<sks> is ..."}``: becomes ``description`` in ``concept.yaml``.

The bare word ``sks`` in these files is the concept's identifier and becomes ``<sks>``.

**Yo'Chameleon training JSON** (LLaVA style)::

    [{"image": ["/abs/path/0.png"], "conversations": [{"from": "human", "value": ".."},
                                                     {"from": "bot", "value": ".."}]}, ...]

Positives are the images of recognition entries answered "Yes…" and of real-photo generation
entries (a bot turn of ``<image>`` whose prompt starts with the identifier and uses the most
generation tokens); soft positives and negatives are not imported (they are mined again). Text-only
entries (no ``<image>`` in either turn) become QA pairs. The identifier is ``<sks>`` or a reserved
token (``<reserved16200>`` in the released files). The released files hold the authors' absolute
paths; pass ``image_root`` to find the images under another folder by their trailing path parts.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path

import yaml

from yochameleon.data.photos import IMAGE_SUFFIXES, file_sha256
from yochameleon.errors import DataError
from yochameleon.prompts import IMAGE, SKS

logger = logging.getLogger(__name__)

# The bare identifier word used by the Yo'LLaVA files, not already inside <...>.
_BARE_SKS = re.compile(r"(?<![<\w])sks(?![>\w])")


def _sks_placeholder(text: str) -> str:
    return _BARE_SKS.sub(SKS, text)


def _read_json(path: str | Path, what: str):
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {p} is not valid JSON: {exc}") from exc


def _prepare_out(out_dir: str | Path, overwrite: bool) -> Path:
    out = Path(out_dir)
    photos = out / "photos"
    if photos.is_dir() and any(photos.iterdir()) and not overwrite:
        raise DataError(f"{out} already holds photos; pass overwrite=True to replace them")
    if photos.is_dir() and overwrite:
        shutil.rmtree(photos)
    photos.mkdir(parents=True, exist_ok=True)
    return out


def _copy_photos(paths: list[Path], out: Path) -> int:
    """Copy photos into ``out/photos`` once per distinct content; names stay unique."""
    seen: set[str] = set()
    n = 0
    for src in paths:
        digest = file_sha256(src)
        if digest in seen:
            continue
        seen.add(digest)
        shutil.copy2(src, out / "photos" / f"{n:03d}_{src.name}")
        n += 1
    return n


def _write_meta(out: Path, meta: dict, qa: list[tuple[str, str]]) -> None:
    (out / "concept.yaml").write_text(
        yaml.safe_dump(meta, allow_unicode=True, sort_keys=False), encoding="utf-8"
    )
    lines = [json.dumps({"question": q, "answer": a}, ensure_ascii=False) for q, a in qa]
    (out / "qa.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _validate(out: Path) -> Path:
    from yochameleon.data.concept_folder import ConceptFolder  # late: concept_folder imports this module

    ConceptFolder.load(out)
    return out


def yollava_text_qa(data: dict, name: str, source: str = "text QA") -> list[tuple[str, str]]:
    """``(question, answer)`` pairs of one concept from a Yo'LLaVA text-QA mapping.

    Raises:
        DataError: the concept is missing or an item is malformed (the message names the item).
    """
    if not isinstance(data, dict) or name not in data:
        known = sorted(data)[:10] if isinstance(data, dict) else []
        raise DataError(f"{source} has no concept {name!r} (first concepts: {known})")
    items = data[name]
    if isinstance(items, dict):
        items = list(items.items())
    elif isinstance(items, list):
        items = list(enumerate(items))
    else:
        raise DataError(f"{source}[{name!r}] must be a mapping or list of questions")
    pairs = []
    for key, item in items:
        where = f"{source}[{name!r}][{key!r}]"
        if not isinstance(item, dict):
            raise DataError(f"{where} must be an object with question, option and correct_answer")
        options = item.get("option", item.get("options"))
        question, correct = item.get("question"), item.get("correct_answer")
        if not isinstance(question, str) or not isinstance(options, dict) or correct not in options:
            raise DataError(
                f"{where} needs a question, an option mapping and a correct_answer that names an option"
            )
        question = _sks_placeholder(question)
        if SKS not in question:
            raise DataError(f"{where}: the question does not mention the concept (sks): {question!r}")
        pairs.append((question, str(options[correct])))
    return pairs


def _yollava_photo_dir(source: Path, name: str) -> Path:
    for candidate in (source / "train" / name, source / name, source):
        if candidate.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in candidate.iterdir()):
            return candidate
    raise DataError(
        f"no photos of {name!r} found in {source} (looked in train/{name}/, {name}/ and the folder itself)"
    )


def import_yollava(
    photo_dir: str | Path,
    out_dir: str | Path,
    name: str,
    text_qa_json: str | Path | None = None,
    captions_json: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Import one Yo'LLaVA / Yo'Chameleon dataset concept into a concept folder.

    Args:
        photo_dir: the concept's training-photo folder, or the dataset root (``train/<name>/`` is
            found), or a folder holding ``<name>/``.
        out_dir: the concept folder to write.
        name: the concept's key in the JSON files (e.g. ``"bo"``); also the concept name.
        text_qa_json: the text-QA file; its items become ``qa.jsonl`` pairs.
        captions_json: the detailed-captions file; the concept's caption becomes the description.
        overwrite: replace photos already in ``out_dir``.

    Returns:
        ``out_dir``, validated by loading it as a concept folder.

    Raises:
        DataError: missing photos or files, unknown concept, malformed JSON, too few usable photos.
    """
    src = Path(photo_dir)
    if not src.is_dir():
        raise DataError(f"photo folder {src} does not exist")
    photos_src = _yollava_photo_dir(src, name)
    qa = (
        yollava_text_qa(_read_json(text_qa_json, "text-QA file"), name, str(text_qa_json))
        if text_qa_json
        else []
    )
    meta: dict = {"name": name}
    if captions_json:
        caps = _read_json(captions_json, "captions file")
        if not isinstance(caps, dict) or not isinstance(caps.get(name), str):
            raise DataError(f"captions file {captions_json} has no caption for {name!r}")
        meta["description"] = _sks_placeholder(caps[name])
    out = _prepare_out(out_dir, overwrite)
    files = [p for p in sorted(photos_src.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    _copy_photos(files, out)
    _write_meta(out, meta, qa)
    return _validate(out)


def _resolve_image(raw: str, json_dir: Path, image_root: Path | None) -> Path | None:
    """Find an image named in a training JSON: as given, next to the JSON, or under ``image_root``."""
    p = Path(raw)
    candidates = [p] if p.is_absolute() else [json_dir / p, p]
    if image_root is not None:
        parts = [x for x in p.parts if x not in ("/", ".", "..")]
        # Longest trailing part first: ".../yochameleon-data/train/bo/0.png" -> "train/bo/0.png" -> ...
        candidates += [image_root.joinpath(*parts[k:]) for k in range(len(parts))]
    return next((c for c in candidates if c.is_file()), None)


def _turns(entry: dict, where: str) -> tuple[str, str, list[str]]:
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be an object with 'image' and 'conversations'")
    images = entry.get("image", [])
    if isinstance(images, str):
        images = [images]
    conv = entry.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(t, dict) for t in conv):
        raise DataError(f"{where}: 'conversations' must be a list of human/bot turns")
    human = next((t.get("value") for t in conv if t.get("from") in ("human", "user")), None)
    bot = next((t.get("value") for t in conv if t.get("from") in ("bot", "gpt", "assistant")), None)
    if not isinstance(human, str) or not isinstance(bot, str) or not all(isinstance(i, str) for i in images):
        raise DataError(f"{where}: needs a human and a bot turn with string values and string image paths")
    return human, bot, images


def import_yochameleon_json(
    json_files: list[str | Path],
    out_dir: str | Path,
    name: str,
    identifier: str | None = None,
    image_root: str | Path | None = None,
    description: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Import a concept from Yo'Chameleon training JSON files (recognition, text QA, generation).

    Args:
        json_files: the concept's JSON files (e.g. ``recognition.json``, ``text_conversation.json``,
            ``1000.json``).
        out_dir: the concept folder to write.
        name: the concept's name.
        identifier: the concept's identifier in the files; default: ``<sks>``, or the reserved token
            that opens the real-photo generation prompts (``<reserved16200>``).
        image_root: where to look for images whose recorded path does not exist here.
        description: optional description for ``concept.yaml``.
        overwrite: replace photos already in ``out_dir``.

    Returns:
        ``out_dir``, validated by loading it as a concept folder.

    Raises:
        DataError: malformed files, no positives found, or too few usable photos.
    """
    root = Path(image_root) if image_root is not None else None
    raw_entries: list[tuple[str, str, list[str], Path]] = []
    for jf in json_files:
        data = _read_json(jf, "training JSON")
        if not isinstance(data, list):
            raise DataError(f"training JSON {jf} must be a list of entries")
        for i, entry in enumerate(data):
            human, bot, images = _turns(entry, f"{jf}[{i}]")
            raw_entries.append((human, bot, images, Path(jf).parent))

    if identifier is None:
        # The released files mix <sks> (recognition, QA) with a reserved token that opens the
        # real-photo generation prompts ("<reserved16200> is ..."): take the most common opener.
        openers = Counter(
            m.group(1)
            for h, b, *_ in raw_entries
            if b.strip() == IMAGE
            if (m := re.match(r"\s*(<[^>]+>) is ", h))
        )
        identifier = openers.most_common(1)[0][0] if openers else SKS
    entries = [
        (h.replace(identifier, SKS), b.replace(identifier, SKS), imgs, d) for h, b, imgs, d in raw_entries
    ]

    def g_count(human: str) -> int:
        return len(re.findall(r"<[^>]+>", human.split(".")[0].replace(SKS, "")))

    # Real photos: generation prompts that open with the identifier and use the most g-tokens
    # (soft positives use fewer, or the "A photo of <g..>." form).
    real_gen = [
        (h, imgs, d) for h, b, imgs, d in entries if b.strip() == IMAGE and h.lstrip().startswith(SKS)
    ]
    most = max((g_count(h) for h, *_ in real_gen), default=0)
    positives_raw = [(img, d) for h, imgs, d in real_gen if g_count(h) == most for img in imgs]
    qa: list[tuple[str, str]] = []
    for human, bot, images, d in entries:
        if bot.strip() == IMAGE:
            continue
        if IMAGE in human:
            if bot.lstrip().lower().startswith("yes"):
                positives_raw += [(img, d) for img in images]
            continue
        pair = (human.strip(), bot.strip())
        if SKS in pair[0] and pair not in qa:
            qa.append(pair)

    found, missing = [], []
    for raw, d in positives_raw:
        path = _resolve_image(raw, d, root)
        (found if path else missing).append(path or raw)
    if missing:
        logger.warning(
            "%d positive images listed in the JSON were not found (first: %s); pass image_root",
            len(missing),
            missing[0],
        )
    if not found:
        raise DataError(
            f"no positive images found in {[str(j) for j in json_files]} "
            f"({len(missing)} listed but missing; pass image_root to locate them)"
        )
    out = _prepare_out(out_dir, overwrite)
    _copy_photos(found, out)
    meta = {"name": name}
    if description:
        meta["description"] = description
    _write_meta(out, meta, qa)
    return _validate(out)
