"""``make demo``: personalize a concept end to end on an embedded default, with no downloads.

By default the demo runs on the committed toy-world base (``eval/toyworld/artifacts``): a small
Chameleon-class model pretrained on this CPU, personalized to a development-seed concept (see
:mod:`yochameleon.eval.toyworld.demo`). With ``--model DIR`` (or ``--random-init``) it runs on that base
instead, with a concept and a negative pool made from photos that ship with scikit-image, a FAISS index,
``prepare``, training with ``recipes/tiny-cpu.yaml``, then recognition questions and generated images.
Every output path is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from yochameleon.config import recipe_path

RECIPE = recipe_path("tiny-cpu")  # shipped as package data, so a wheel install has it
# skimage.data photos: the concept is the cat; the others make the pool of negatives.
CONCEPT_PHOTO = "chelsea"
POOL_PHOTOS = [
    "astronaut",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "moon",
    "page",
    "text",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cell",
    "clock",
    "grass",
    "gravel",
    "brick",
    "colorwheel",
]


def _skimage(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def _views(image: Image.Image, n: int, seed: int) -> list[Image.Image]:
    """Different crops, scales, flips and lighting of one photo: stand-ins for "new photos"."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    out = []
    for _ in range(n):
        s = rng.uniform(0.7, 0.95)
        cw, ch = int(w * s), int(h * s)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        view = image.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            view = ImageOps.mirror(view)
        view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.85, 1.15))
        out.append(view)
    return out


def make_concept_folder(root: Path, seed: int = 0) -> Path:
    """A concept folder (4 photos + concept.yaml + qa.jsonl) of the scikit-image cat."""
    folder = root / "concept"
    photos = folder / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for i, view in enumerate(_views(_skimage(CONCEPT_PHOTO), 4, seed)):
        view.save(photos / f"photo_{i}.png")
    (folder / "concept.yaml").write_text(
        "name: sks\ncategory: cat\nis_person: false\n"
        "description: a tabby cat with green eyes and white whiskers\n"
        "facts:\n  - it is a tabby cat\n  - its eyes are green\n"
    )
    qa = [
        {"question": "What kind of animal is <sks>?", "answer": "<sks> is a cat."},
        {"question": "What colour are the eyes of <sks>?", "answer": "The eyes of <sks> are green."},
    ]
    (folder / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qa))
    return folder


def make_pool(root: Path, per_photo: int = 3, seed: int = 0) -> Path:
    """A negative / soft-positive pool: views of other scikit-image photos (and a few of other cats)."""
    pool = root / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    for j, name in enumerate(POOL_PHOTOS):
        try:
            image = _skimage(name)
        except Exception:  # some datasets need an optional download; skip them
            continue
        for i, view in enumerate(_views(image, per_photo, seed + j)):
            view.save(pool / f"{name}_{i}.png")
    return pool


def main(argv: list[str] | None = None) -> int:
    from yochameleon.backends.tiny import make_tiny
    from yochameleon.config import load_config
    from yochameleon.infer import PersonalizedModel
    from yochameleon.retrieval import TestEmbedder, build_index
    from yochameleon.train.config import TrainConfig
    from yochameleon.train.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--model", default=None, help="a base model directory to use instead of the toy base")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="use a freshly built random-init tiny model, not the toy base",
    )
    args = parser.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    if not args.model and not args.random_init:
        from yochameleon.eval.toyworld.demo import artifacts_ready, run_demo

        if artifacts_ready():
            run_demo(root / "toyworld")
            print(f"done in {time.perf_counter() - t0:.0f} s; everything is under {root / 'toyworld'}")
            return 0
        print(
            "the toy-world artifacts are missing (yochameleon toyworld build); using a random-init tiny model"
        )

    model_dir = Path(args.model) if args.model else root / "tiny-model"
    tiny_card = model_dir / "yochameleon_tiny.json"
    # make-tiny writes the card; the toy-world base writes one too, but it is pretrained.
    random_init = not (model_dir / "config.json").is_file() or (
        tiny_card.is_file() and json.loads(tiny_card.read_text()).get("size") != "toyworld"
    )
    if not (model_dir / "config.json").is_file():
        print(f"[1/6] building the random-init tiny model in {model_dir}")
        make_tiny(model_dir)
    else:
        print(f"[1/6] base model: {model_dir}")
    if random_init:
        print(
            "      note: a random-init model learns its training data but cannot tell photos apart or draw;\n"
            "      pass --model with a pretrained base (e.g. Anole-7B on a GPU) for meaningful answers and images"
        )
    concept_dir = make_concept_folder(root)
    pool = make_pool(root)
    print(
        f"[2/6] concept folder {concept_dir} ({len(list((concept_dir / 'photos').glob('*.png')))} photos), "
        f"pool {pool} ({len(list(pool.glob('*.png')))} images)"
    )
    index_dir = root / "index"
    build_index(pool, index_dir, TestEmbedder(), progress=False)
    print(f"[3/6] FAISS index of the pool: {index_dir}")

    run_dir = root / "run"
    overrides = [
        f"output_dir={run_dir}",
        f"model.name_or_path={model_dir}",
        f"concept.concept_dir={concept_dir}",
        f"concept.data_dir={root / 'data'}",
        f"data.index_dir={index_dir}",
        "data.reprepare=true",  # the demo owns its data folder: rebuild it if older settings made it
    ]
    cfg = load_config(TrainConfig, RECIPE, overrides)
    print(f"[4/6] training with {RECIPE.name} -> {run_dir}")
    trainer = Trainer(cfg)
    trainer.setup()
    result = trainer.train(resume=(run_dir / "checkpoints" / "latest").exists())
    concept_file = result.concept_files["sks"]
    print(
        f"      {result.steps} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; concept file {concept_file}"
    )

    pm = PersonalizedModel(trainer.backend)
    print("[5/6] recognition (Yes-vs-No likelihood):")
    for path in sorted((concept_dir / "photos").glob("*.png"))[:2] + sorted(pool.glob("*.png"))[:3]:
        answer = pm.ask("Is <sks> in this photo?", image=str(path), force_tokens=True, max_new_tokens=16)
        print(f"      {path.name:28s} recognized={pm.recognize(str(path))!s:5s}  answer: {answer!r}")
    gen_dir = root / "generated"
    paths = pm.generate_to_dir("A photo of <sks>.", gen_dir, n=4, seed=0)
    print(f"[6/6] generated images: {', '.join(str(p) for p in paths)}")
    print(f"done in {time.perf_counter() - t0:.0f} s; everything is under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
