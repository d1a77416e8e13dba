"""The evaluation harness: one method, one concept, one test directory -> a :class:`ConceptResult`.

Test directory layout::

    TEST_DIR/
      positives/*.png         the concept in new photos
      negatives_hard/*.png    look-alikes (optional)
      negatives_easy/*.png    anything else (optional)
      vqa.json                [{"image": "positives/a.png", "question": "...", "options": [...], "answer": "..."}]
      text_qa.json            [{"question": "... <sks> ...", "options": [...], "answer": "..."}]

``answer`` is an option key or the option's text. Every method is scored the same way: recognition
by Yes-vs-No likelihood after the method's own prompt, multiple choice by a greedy answer scored on
option text (order shuffled per seed), generation by CLIP-I through the retrieval embedder (an
OpenCLIP model, named in each record's ``embedders``) and, optionally, a fidelity scorer. Trained
methods answer through :class:`~yochameleon.infer.PersonalizedModel` loaded from their concept file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from yochameleon.baselines.base import Method
from yochameleon.data.photos import IMAGE_SUFFIXES, load_rgb
from yochameleon.errors import DataError
from yochameleon.eval.metrics import clip_i, mc_prompt, recognition_scores, score_choice, shuffle_options
from yochameleon.eval.schema import ConceptResult
from yochameleon.prompts import recognition_question


@dataclass
class TestSet:
    """A loaded test directory."""

    root: Path
    recognition: list[tuple[Path, str]]
    vqa: list[dict]
    text_qa: list[dict]

    @classmethod
    def load(cls, root: str | Path) -> TestSet:
        """Read and check a test directory.

        Raises:
            DataError: missing or empty directory, a malformed QA file, QA items that reference
                images the directory does not have or that resolve outside it (they are named).
        """
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"test directory {root} does not exist")
        rec = []
        for sub, label in (
            ("positives", "pos"),
            ("negatives_hard", "neg_hard"),
            ("negatives_easy", "neg_easy"),
        ):
            folder = root / sub
            if folder.is_dir():
                rec += [(p, label) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        vqa, text_qa = _read_items(root / "vqa.json"), _read_items(root / "text_qa.json")
        if not rec and not vqa and not text_qa:
            raise DataError(
                f"test directory {root} is empty: expected positives/, negatives_*/, vqa.json or text_qa.json"
            )
        _check_inside(root, [it["image"] for it in vqa if it.get("image")], root / "vqa.json")
        missing = sorted({it["image"] for it in vqa if not (root / it.get("image", "")).is_file()})
        if missing:
            raise DataError(
                f"{root / 'vqa.json'} references images that do not exist: {', '.join(missing[:5])}"
            )
        return cls(root, rec, vqa, text_qa)

    @classmethod
    def from_yollava(
        cls,
        dataset_root: str | Path,
        name: str,
        visual_qa_json: str | Path | None = None,
        text_qa_json: str | Path | None = None,
        max_negatives: int = 100,
    ) -> TestSet:
        """The Yo'LLaVA benchmark layout: ``ROOT/test/NAME/*`` are positives, other concepts' test
        photos are negatives, and the visual / text QA JSON files are keyed by concept name.

        Raises:
            DataError: the concept's test folder is missing, or a QA file names images that do not exist.
        """
        root = Path(dataset_root)
        test = root / "test"
        own = test / name
        if not own.is_dir():
            raise DataError(f"{own} does not exist: expected the Yo'LLaVA layout ROOT/test/{name}/")
        photos = lambda d: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)  # noqa: E731
        rec = [(p, "pos") for p in photos(own)]
        others = [p for d in sorted(test.iterdir()) if d.is_dir() and d.name != name for p in photos(d)]
        rec += [(p, "neg_easy") for p in others[:max_negatives]]
        vqa = []
        if visual_qa_json:
            for path, item in (
                json.loads(Path(visual_qa_json).read_text(encoding="utf-8")).get(name, {}).items()
            ):
                rel = path.split("/test/", 1)[-1]
                vqa.append(
                    {
                        "image": str((test / rel).resolve()),
                        "question": item["question"],
                        "options": item["options"],
                        "answer": item["correct_answer"],
                    }
                )
        text_qa = []
        if text_qa_json:
            for item in json.loads(Path(text_qa_json).read_text(encoding="utf-8")).get(name, {}).values():
                question = item["question"].replace("<sks>", "sks").replace("sks", "<sks>")
                text_qa.append(
                    {"question": question, "options": item["option"], "answer": item["correct_answer"]}
                )
        _check_inside(test, [it["image"] for it in vqa], Path(str(visual_qa_json)))
        missing = sorted({it["image"] for it in vqa if not Path(it["image"]).is_file()})
        if missing:
            raise DataError(f"{visual_qa_json} references images that do not exist: {', '.join(missing[:5])}")
        return cls(root, rec, vqa, text_qa)


def _check_inside(root: Path, images: list[str], where: Path) -> None:
    """Refuse image paths that resolve outside ``root`` (``../x.png``, absolute paths, symlinks out),
    as manifest paths are refused outside their data directory."""
    bound = root.resolve()
    outside = [image for image in images if bound not in (bound / image).resolve().parents]
    if outside:
        raise DataError(
            f"{where}: image {outside[0]!r} resolves outside the test directory {root}; refusing it"
            + (f" (and {len(outside) - 1} more)" if len(outside) > 1 else "")
        )


def _read_items(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and {"question", "options", "answer"} <= set(i) for i in items
    ):
        raise DataError(f"{path} must be a list of {{question, options, answer}} items")
    return items


def evaluate(
    method: Method,
    test: TestSet,
    concept: str,
    seed: int = 0,
    real_photos: list[Path] | None = None,
    embedder=None,
    n_images: int = 4,
    fidelity: Callable[[list], float] | None = None,
    fidelity_name: str | None = None,
    image_dir: str | Path | None = None,
) -> ConceptResult:
    """Score a fitted method on a test set.

    Args:
        method: a fitted :class:`Method`.
        test: the test set.
        concept: the concept's name (recorded in the result).
        seed: option-shuffling and sampling seed.
        real_photos: the concept's training photos, the CLIP-I reference (generation is skipped without them).
        embedder: the embedder of CLIP-I (see :func:`yochameleon.retrieval.resolve_embedder`); the
            record names it.
        n_images: images to generate.
        fidelity: optional scorer ``images -> fraction correct`` (the toy world's identity scorer).
        fidelity_name: what the record calls the fidelity scorer (not recorded when ``None``).
        image_dir: where the generated images are saved (``00.png``, ...), so they can be looked at;
            not saved when ``None``.
    """
    from yochameleon.retrieval import describe_embedder

    result = {
        "method": method.name,
        "concept": concept,
        "seed": seed,
        "prompt_tokens": method.prompt_tokens(),
        "embedders": {},
    }
    if test.recognition:
        preds = []
        for i, (path, _) in enumerate(test.recognition):
            yes, no = method.yes_no(f"<image>{recognition_question(i)}", load_rgb(path))
            preds.append(yes > no)
        scores = recognition_scores(preds, [lab for _, lab in test.recognition])
        result.update({k: v for k, v in scores.items() if k != "recognition_unparsed"})
    for key, items in (("vqa", test.vqa), ("text_qa", test.text_qa)):
        if not items:
            continue
        right = 0
        for item in items:
            mc = shuffle_options(item, seed)
            image = load_rgb(test.root / item["image"]) if item.get("image") else None
            text = mc_prompt(mc) if image is None else "<image>" + mc_prompt(mc)
            right += score_choice(method.answer(text, image), mc["options"], mc["correct"])
        result[key] = right / len(items)
    if real_photos and (embedder is not None or fidelity is not None):
        images = method.generate_images("A photo of <sks>.", n=n_images, seed=seed)
        if image_dir is not None:
            Path(image_dir).mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(Path(image_dir) / f"{i:02d}.png")
        if embedder is not None:
            result["clip_i"] = clip_i(
                embedder.embed_images(images, progress=False),
                embedder.embed_images([load_rgb(p) for p in real_photos], progress=False),
            )
            result["embedders"]["clip_i"] = describe_embedder(embedder.identity)
        if fidelity is not None:
            result["gen_fidelity"] = float(fidelity(images))
            if fidelity_name:
                result["embedders"]["gen_fidelity"] = fidelity_name
    return ConceptResult(**result)
