"""An independent attribute and mark classifier for toy-world photos (the generation-fidelity judge).

Small CNNs in three steps: a full-resolution segmenter votes for the object's box, the box is corrected
in a canonical crop, and a classifier reading that crop has one head per nameable factor (shape, colour,
pattern; size reads the box side) and one head per mark-grid cell. A cell head chooses among ``"none"`` and the mark colours, so the predicted mark set is the set of
cells not predicted ``"none"``. A photo shows an identity *correctly* only when it matches the identity's
signature: all four factors and the set of mark colours read from the cells (a colour the identity
lacks, or one of its colours missing, is wrong; a mark read in another cell, or over two cells, is not,
since identities differ by their set of mark colours).

The scorer trains on freshly rendered photos of random identities that are never dev or held-out
identities, so its gate numbers on held-out identities measure generalisation, not memory.

Example:
    >>> scorer = train_scorer(seed=0, steps=800)
    >>> scorer.identity_correct(photos, concept)
    [True, True, False, True]
    >>> scorer.save("artifacts/scorer")  # scorer.safetensors + scorer.json
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from yochameleon.errors import YoChameleonError

from .world import (
    FACTOR_VALUES,
    MARK_COLOURS,
    SIZES,
    Identity,
    Mark,
    ToyWorld,
    ToyWorldError,
    WorldConfig,
)

__all__ = ["Scorer", "ScorerConfig", "ScorerError", "evaluate_scorer", "train_scorer"]

_FORMAT_VERSION = 1
NO_MARK = "none"
FACTORS: tuple[str, ...] = tuple(FACTOR_VALUES)  # the nameable factors, in the world's order
_CELL_VALUES: tuple[str, ...] = (NO_MARK, *MARK_COLOURS)


class ScorerError(YoChameleonError):
    """The scorer got bad input, a bad configuration, or a file it cannot load."""


@dataclass(frozen=True)
class ScorerConfig:
    """Architecture and training settings.

    Attributes:
        image_size: side of the photos the scorer reads (others are resized to it).
        mark_grid: mark grid of the world it judges.
        width: channels of the first conv stage (then 2x and 4x).
        crop_size: side of the canonical crop the classifier reads (a multiple of 4).
        crop_margin: the crop covers the found box widened by this factor (context for its edges).
        box_jitter: classification trains on boxes moved by up to this share of their side (and resized
            by as much), so a slightly wrong box still reads right.
        refine_jitter: box correction trains on boxes this wrong (the segmenter's rough boxes).
        refine_steps: box corrections applied at inference before classifying.
        seg_weight: weight of the segmentation loss against the classification loss.
        hidden: width of the shared layer before the heads.
        batch_size: freshly rendered photos per step.
        lr: peak AdamW learning rate (linear warm-up, cosine decay to 2% of it).
        weight_decay: AdamW weight decay.
        max_distractors: training photos get 0..max_distractors distractors.
        noise_std: up to this much Gaussian pixel noise (0–255 scale) is added in training, and a blur
            on ``blur_prob`` of photos, so that decoded model outputs (slightly soft and noisy) read right.
        blur_prob: share of training photos blurred.
        world_seed: which world's dev/held-out identities training must avoid.
    """

    image_size: int = 32
    mark_grid: int = 4
    width: int = 16
    hidden: int = 256
    crop_size: int = 24
    crop_margin: float = 1.25
    box_jitter: float = 0.04
    refine_jitter: float = 0.15
    refine_steps: int = 2
    seg_weight: float = 4.0
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_distractors: int = 2
    noise_std: float = 6.0
    blur_prob: float = 0.25
    world_seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % 8 != 0 or self.image_size < 24:
            raise ScorerError(f"image_size must be a multiple of 8 and >= 24, got {self.image_size}")
        if not 2 <= self.mark_grid <= 12:
            raise ScorerError(f"mark_grid must be in [2, 12], got {self.mark_grid}")
        if not 0 <= self.box_jitter <= 0.2 or not 0 <= self.refine_jitter <= 0.3 or self.seg_weight < 0:
            raise ScorerError(
                f"box_jitter must be in [0, 0.2], refine_jitter in [0, 0.3], seg_weight >= 0: {self}"
            )
        if not 0 <= self.refine_steps <= 5:
            raise ScorerError(f"refine_steps must be in [0, 5], got {self.refine_steps}")
        if self.crop_size % 4 != 0 or self.crop_size < 8 or not 1.0 <= self.crop_margin <= 2.0:
            raise ScorerError(f"crop_size must be a multiple of 4 >= 8 and crop_margin in [1, 2], got {self}")
        for name in ("width", "hidden", "batch_size"):
            if getattr(self, name) < 1:
                raise ScorerError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ScorerError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.max_distractors < 0 or self.noise_std < 0 or not 0 <= self.blur_prob <= 1:
            raise ScorerError("max_distractors and noise_std must be >= 0 and blur_prob in [0, 1]")

    @property
    def n_cells(self) -> int:
        return self.mark_grid * self.mark_grid


def _conv(c_in: int, c_out: int, dilation: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class _ScorerNet(nn.Module):
    """Find the object, cut it out into a canonical frame, then classify.

    Marks are defined relative to the object's bounding box, so reading them from a whole photo means
    learning translation- and scale-relative geometry, which a small CNN learns slowly. Instead a
    full-resolution segmenter (dilated convs: a receptive field wider than any object, so it can tell the
    object from the smaller distractors) finds the object's pixels, the box follows from the mask's soft
    extents, and the classifier sees the box resampled to ``crop_size`` pixels, where every mark cell sits
    at a fixed place. Size is read from the box side.
    """

    def __init__(self, config: ScorerConfig) -> None:
        super().__init__()
        w = config.width
        self.config = config
        self.segmenter = nn.Sequential(
            *_conv(3, w), *_conv(w, w, 2), *_conv(w, 2 * w, 4), *_conv(2 * w, w, 8), nn.Conv2d(w, 5, 1)
        )
        self.classifier = nn.Sequential(
            *_conv(3, w),
            *_conv(w, w),
            nn.MaxPool2d(2),
            *_conv(w, 2 * w),
            *_conv(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w),
            nn.Flatten(),
            nn.Linear(4 * w * (config.crop_size // 4) ** 2, config.hidden),
            nn.ReLU(inplace=True),
        )
        self.factor_heads = nn.ModuleDict(
            {f: nn.Linear(config.hidden, len(FACTOR_VALUES[f])) for f in FACTORS if f != "size"}
        )
        # Size depends on the box side only; a small MLP carves it into the classes.
        self.size_head = nn.Sequential(nn.Linear(1, 16), nn.ReLU(inplace=True), nn.Linear(16, len(SIZES)))
        self.cell_head = nn.Linear(config.hidden, config.n_cells * len(_CELL_VALUES))
        self.box_head = nn.Linear(config.hidden, 3)
        # The size head reads the box side relative to the mean size class.
        world = WorldConfig(image_size=config.image_size, n_pretrain=0)
        self._reference_px = float(np.mean([world.size_px(size) for size in SIZES]))

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel maps ``(N, 5, H, W)``: object logit, then distances to the box's left, top, right and
        bottom edges (in units of the image side)."""
        return self.segmenter(x)

    def boxes_from_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Boxes ``(N, 3)`` = ``(cx, cy, side)`` in pixels: the object pixels' box votes, weighted by confidence.

        Every pixel that sees the object votes for its box, so a few pixels wrongly claimed next to it
        (a close distractor) barely move the average, unlike a box taken from the mask's extent.
        """
        n = self.config.image_size
        prob = torch.sigmoid(maps[:, 0])
        weight = prob * (prob > 0.5)
        dist = maps[:, 1:] * n
        xs = (torch.arange(n, dtype=maps.dtype) + 0.5).view(1, 1, n)
        ys = xs.view(1, n, 1)
        edges = torch.stack([xs - dist[:, 0], ys - dist[:, 1], xs + dist[:, 2], ys + dist[:, 3]], dim=1)
        total = weight.sum(dim=(1, 2))
        x0, y0, x1, y1 = ((edges * weight[:, None]).sum(dim=(2, 3)) / total.clamp_min(1e-6)[:, None]).unbind(
            1
        )
        cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, ((x1 - x0) + (y1 - y0)) / 2
        # Nothing found: look at the whole photo (its predictions are then meaningless but harmless).
        empty = (total < 1.0) | (side < 2.0)
        cx = torch.where(empty, torch.full_like(cx, n / 2), cx)
        cy = torch.where(empty, torch.full_like(cy, n / 2), cy)
        side = torch.where(empty, torch.full_like(side, n / self.config.crop_margin), side)
        return torch.stack([cx, cy, side], dim=1)

    def crop(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Resample each box (widened by ``crop_margin``) to ``crop_size`` pixels."""
        n = self.config.image_size
        scale = self.config.crop_margin * boxes[:, 2] / n
        theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype)
        theta[:, 0, 0] = scale
        theta[:, 1, 1] = scale
        theta[:, 0, 2] = 2 * boxes[:, 0] / n - 1
        theta[:, 1, 2] = 2 * boxes[:, 1] / n - 1
        size = self.config.crop_size
        grid = F.affine_grid(theta, [x.shape[0], 3, size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def classify(self, x: torch.Tensor, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.classifier(self.crop(x, boxes))
        out = {f: head(h) for f, head in self.factor_heads.items()}
        out["size"] = self.size_head(((boxes[:, 2:3] / self._reference_px) - 1.0) * 8.0)
        out["cells"] = self.cell_head(h).view(-1, self.config.n_cells, len(_CELL_VALUES))
        out["box_delta"] = self.box_head(h)
        return out

    @staticmethod
    def refine(boxes: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Apply a predicted correction ``(dx / side, dy / side, log side ratio)`` to boxes."""
        side = boxes[:, 2]
        return torch.stack(
            [boxes[:, 0] + delta[:, 0] * side, boxes[:, 1] + delta[:, 1] * side, side * delta[:, 2].exp()],
            dim=1,
        )

    def locate(self, x: torch.Tensor) -> torch.Tensor:
        """The object's box ``(N, 3)``: voted from the segment maps, then corrected in the canonical crop."""
        boxes = self.boxes_from_maps(self.segment(x))
        # The canonical crop is where a box is easiest to correct precisely; correct it, then classify.
        for _ in range(self.config.refine_steps):
            boxes = self.refine(boxes, self.classify(x, boxes)["box_delta"])
        return boxes

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.classify(x, self.locate(x) if boxes is None else boxes)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _colour_set(colours) -> tuple[str, ...]:
    """Mark colour names as a set in the palette's order (the form of ``Identity.mark_colours``)."""
    colours = set(colours)
    unknown = colours - set(MARK_COLOURS)
    if unknown:
        raise ScorerError(f"unknown mark colours {sorted(unknown)}; choose from {list(MARK_COLOURS)}")
    return tuple(c for c in MARK_COLOURS if c in colours)


def _signature(pred: dict) -> tuple:
    """A prediction in the form of ``Identity.signature``."""
    return (*(pred[f] for f in FACTORS), pred["mark_colours"])


def _identity_targets(identities: Sequence[Identity], grid: int) -> dict[str, torch.Tensor]:
    targets = {f: torch.tensor([FACTOR_VALUES[f].index(getattr(i, f)) for i in identities]) for f in FACTORS}
    cells = torch.zeros(len(identities), grid * grid, dtype=torch.long)
    for n, identity in enumerate(identities):
        for mark in identity.marks:
            cells[n, mark.row * grid + mark.col] = _CELL_VALUES.index(mark.colour)
    targets["cells"] = cells
    return targets


class Scorer:
    """A trained attribute/mark classifier.

    Args:
        config: the architecture it was built with.
        model: the network (weights already loaded).
        meta: training facts stored with it (seed, steps, seconds, world seed).
    """

    def __init__(
        self, config: ScorerConfig, model: _ScorerNet | None = None, meta: dict | None = None
    ) -> None:
        self.config = config
        self.model = model if model is not None else _ScorerNet(config)
        self.model.eval()
        self.meta = dict(meta or {})

    # ---- input ------------------------------------------------------------------------------------------
    def _batch(self, images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
        n = self.config.image_size
        if isinstance(images, np.ndarray):
            if images.ndim != 4 or images.shape[1:] != (n, n, 3) or images.dtype != np.uint8:
                raise ScorerError(
                    f"image arrays must be uint8 (N, {n}, {n}, 3), got {images.dtype} {images.shape}"
                )
            return images
        arrays = []
        for k, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ScorerError(f"image {k} is a {type(image).__name__}, not a PIL image")
            image = image.convert("RGB")
            if image.size != (n, n):
                image = image.resize((n, n), Image.BILINEAR)  # decoded outputs may come at another size
            arrays.append(np.asarray(image, dtype=np.uint8))
        return np.stack(arrays) if arrays else np.zeros((0, n, n, 3), dtype=np.uint8)

    @torch.no_grad()
    def _logits(
        self,
        images: Sequence[Image.Image] | np.ndarray,
        chunk: int = 512,
        boxes_from: Sequence[Image.Image] | np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        batch = self._batch(images)
        reference = None if boxes_from is None else self._batch(boxes_from)
        if reference is not None and len(reference) != len(batch):
            raise ScorerError(f"boxes_from has {len(reference)} images for {len(batch)} images")
        outs: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(batch), chunk):
            boxes = None
            if reference is not None:
                boxes = self.model.locate(_to_tensor(reference[start : start + chunk]))
            logits = self.model(_to_tensor(batch[start : start + chunk]), boxes)
            for key, value in logits.items():
                outs.setdefault(key, []).append(value.argmax(-1).numpy())
        if not outs:
            return {k: np.zeros((0,), dtype=np.int64) for k in (*FACTORS, "cells")}
        return {k: np.concatenate(v) for k, v in outs.items()}

    # ---- predictions ------------------------------------------------------------------------------------
    def predict(
        self,
        images: Sequence[Image.Image] | np.ndarray,
        boxes_from: Sequence[Image.Image] | np.ndarray | None = None,
    ) -> list[dict]:
        """Read every head.

        Args:
            images: PIL images (any size; resized to ``config.image_size``) or a uint8 ``(N, H, W, 3)`` array.
            boxes_from: optional photos, one per image, in which the object is located instead (e.g. the
                originals of reconstructions: marks are then read at the object's true place, so a blurred
                outline cannot move the mark cells).

        Returns:
            One dict per image: ``shape``, ``colour``, ``pattern``, ``size`` (value names), ``marks``
            (``{(row, col): colour}`` for every cell not predicted empty) and ``mark_colours`` (the set of
            those colours, in the palette's order).

        Raises:
            ScorerError: on anything that is not an image.
        """
        idx = self._logits(images, boxes_from=boxes_from)
        grid = self.config.mark_grid
        results = []
        for n in range(len(idx["cells"])):
            pred = {f: FACTOR_VALUES[f][int(idx[f][n])] for f in FACTORS}
            pred["marks"] = {
                divmod(cell, grid): _CELL_VALUES[int(value)]
                for cell, value in enumerate(idx["cells"][n])
                if value
            }
            pred["mark_colours"] = _colour_set(pred["marks"].values())
            results.append(pred)
        return results

    def predict_identities(self, images: Sequence[Image.Image] | np.ndarray) -> list[Identity | None]:
        """The identity each image shows, or ``None`` where the marks read are not 1–2 distinct colours."""
        out: list[Identity | None] = []
        for pred in self.predict(images):
            marks = tuple(Mark(r, c, colour) for (r, c), colour in pred["marks"].items())
            try:
                out.append(Identity(pred["shape"], pred["colour"], pred["pattern"], pred["size"], marks))
            except ToyWorldError:
                out.append(None)
        return out

    def identity_correct(self, images: Sequence[Image.Image] | np.ndarray, identity: Identity) -> list[bool]:
        """Whether each image shows ``identity``: its four factors and its set of mark colours.

        Mark cells do not count (a flipped photo moves them, and twins differ by colour), so a photo is
        right when every factor head agrees and the cells read exactly the identity's mark colours.

        Raises:
            ScorerError: on a bad image or a target that is not an :class:`Identity`.
        """
        if not isinstance(identity, Identity):
            raise ScorerError(f"target must be an Identity, got {type(identity).__name__}")
        return [_signature(pred) == identity.signature for pred in self.predict(images)]

    def attribute_accuracy(
        self,
        images: Sequence[Image.Image] | np.ndarray,
        attributes: Mapping[str, str] | Sequence[Mapping[str, str]],
    ) -> float:
        """Mean correctness over images and the named factors (e.g. text-to-image attribute accuracy).

        Args:
            images: photos to judge.
            attributes: ``{factor: value}`` applied to every image (as in a caption), or one such dict per
                image. Factors: ``shape``, ``colour``, ``pattern``, ``size``; a ``marks`` entry (mark
                colour names) counts as one more factor, right only if exactly those colours are read.

        Returns:
            The accuracy in ``[0, 1]``.

        Raises:
            ScorerError: on an unknown factor or value, an empty dict, no images, or a per-image list of
                another length.
        """
        hits = self.attribute_hits(images, attributes)
        return sum(map(sum, hits)) / sum(map(len, hits))

    def attribute_hits(
        self,
        images: Sequence[Image.Image] | np.ndarray,
        attributes: Mapping[str, str] | Sequence[Mapping[str, str]],
    ) -> list[list[bool]]:
        """Per image, whether each named factor is read as asked (arguments as :meth:`attribute_accuracy`).

        Returns:
            One list per image, one entry per factor of its dict, in the dict's order.

        Raises:
            ScorerError: as :meth:`attribute_accuracy`.
        """
        preds = self.predict(images)
        if not preds:
            raise ScorerError("attribute_accuracy needs at least one image")
        per_image = [attributes] * len(preds) if isinstance(attributes, Mapping) else list(attributes)
        if len(per_image) != len(preds):
            raise ScorerError(f"got {len(per_image)} attribute dicts for {len(preds)} images")
        hits: list[list[bool]] = []
        for pred, wanted in zip(preds, per_image):
            if not wanted:
                raise ScorerError("attribute dicts must name at least one factor")
            row: list[bool] = []
            for factor, value in wanted.items():
                if factor == "marks":
                    row.append(pred["mark_colours"] == _colour_set(value))
                elif factor in FACTOR_VALUES:
                    if value not in FACTOR_VALUES[factor]:
                        raise ScorerError(
                            f"unknown {factor} {value!r}; choose from {list(FACTOR_VALUES[factor])}"
                        )
                    row.append(pred[factor] == value)
                else:
                    raise ScorerError(f"unknown factor {factor!r}; choose from {[*FACTORS, 'marks']}")
            hits.append(row)
        return hits

    # ---- files ------------------------------------------------------------------------------------------
    @staticmethod
    def _paths(path: str | Path) -> tuple[Path, Path]:
        stem = Path(path)
        if stem.suffix in (".safetensors", ".json"):
            stem = stem.with_suffix("")
        return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``<path>.safetensors`` (weights) and ``<path>.json`` (config, vocabularies, meta)."""
        weights, meta_path = self._paths(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().clone() for k, v in self.model.state_dict().items()}
        save_file(state, str(weights))
        info = {
            "format_version": _FORMAT_VERSION,
            "config": asdict(self.config),
            "factor_values": {f: list(v) for f, v in FACTOR_VALUES.items()},
            "cell_values": list(_CELL_VALUES),
            "meta": self.meta,
        }
        meta_path.write_text(json.dumps(info, indent=2) + "\n")
        return weights, meta_path

    @classmethod
    def load(cls, path: str | Path) -> Scorer:
        """Load a scorer written by :meth:`save`.

        Raises:
            ScorerError: if a file is missing, or was written for another vocabulary or format.
        """
        weights, meta_path = cls._paths(path)
        if not weights.is_file() or not meta_path.is_file():
            raise ScorerError(f"scorer files not found: {weights} and {meta_path}")
        try:
            info = json.loads(meta_path.read_text())
            config = ScorerConfig(**info["config"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ScorerError(f"{meta_path} is not a scorer description: {err}") from err
        if info.get("format_version") != _FORMAT_VERSION:
            raise ScorerError(
                f"{meta_path} has format {info.get('format_version')}, expected {_FORMAT_VERSION}"
            )
        expected = {f: list(v) for f, v in FACTOR_VALUES.items()}
        if info.get("factor_values") != expected or info.get("cell_values") != list(_CELL_VALUES):
            raise ScorerError(f"{meta_path} was trained on another toy-world vocabulary")
        model = _ScorerNet(config)
        try:
            model.load_state_dict(load_file(str(weights)))
        except RuntimeError as err:
            raise ScorerError(f"{weights} does not match its config: {err}") from err
        return cls(config, model, info.get("meta"))


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------
@dataclass
class _Renderer:
    world: ToyWorld
    config: ScorerConfig
    rng: np.random.Generator

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Identity]]:
        """Photos, object masks, boxes ``(cx, cy, side)`` and identities of ``n`` random objects."""
        identities = [self.world.random_identity(self.rng) for _ in range(n)]
        images, masks, boxes = [], [], []
        for identity in identities:
            distractors = int(self.rng.integers(0, self.config.max_distractors + 1))
            image, mask, box = self.world.render_annotated(identity, self.rng, distractors=distractors)
            images.append(image)
            masks.append(mask)
            boxes.append(box)
        return np.stack(images), np.stack(masks), np.asarray(boxes, dtype=np.float32), identities


def _augment(x: torch.Tensor, config: ScorerConfig, generator: torch.Generator) -> torch.Tensor:
    # Soften and jitter like a VQ reconstruction would, so decoded generations are judged fairly.
    n = x.shape[0]
    if config.blur_prob > 0:
        kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
        pick = (torch.rand(n, 1, 1, 1, generator=generator) < config.blur_prob).float()
        x = pick * blurred + (1 - pick) * x
    if config.noise_std > 0:
        sigma = torch.rand(n, 1, 1, 1, generator=generator) * (config.noise_std / 127.5)
        x = x + sigma * torch.randn(x.shape, generator=generator)
    return x


def _loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = sum(F.cross_entropy(out[f], targets[f]) for f in FACTORS)
    # Cells: summed over the grid, so a single wrong cell costs as much as a wrong factor.
    cells = F.cross_entropy(out["cells"].flatten(0, 1), targets["cells"].flatten(), reduction="sum")
    return loss + cells / out["cells"].shape[0]


def _segmentation_loss(maps: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor, n: int) -> torch.Tensor:
    """Object-mask BCE plus, on object pixels, an L1 loss on the distances to the box's four edges."""
    bce = F.binary_cross_entropy_with_logits(maps[:, 0], masks)
    xs = (torch.arange(n, dtype=maps.dtype) + 0.5).view(1, 1, n)
    ys = xs.view(1, n, 1)
    half = boxes[:, 2].view(-1, 1, 1) / 2
    cx, cy = boxes[:, 0].view(-1, 1, 1), boxes[:, 1].view(-1, 1, 1)
    target = (
        torch.stack(
            [
                (xs - (cx - half)).expand_as(masks),
                (ys - (cy - half)).expand_as(masks),
                ((cx + half) - xs).expand_as(masks),
                ((cy + half) - ys).expand_as(masks),
            ],
            dim=1,
        )
        / n
    )
    inside = (masks > 0.5).to(maps.dtype)[:, None]
    l1 = ((maps[:, 1:] - target).abs() * inside).sum() / inside.sum().clamp_min(1.0) / 4
    return bce + 10.0 * l1


def _jitter(boxes: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    # The classifier trains on slightly wrong boxes so that the segmenter's small errors do not matter.
    noise = (torch.rand(boxes.shape, generator=generator) * 2 - 1) * amount
    side = boxes[:, 2]
    return torch.stack(
        [boxes[:, 0] + noise[:, 0] * side, boxes[:, 1] + noise[:, 1] * side, side * (1 + noise[:, 2])], dim=1
    )


def _train(
    seed: int, steps: int, config: ScorerConfig, world: ToyWorld, progress: bool
) -> tuple[_ScorerNet, float]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    renderer = _Renderer(world, config, np.random.default_rng([seed, 0x5C0]))
    model = _ScorerNet(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, min(100, steps // 10))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc="scorer", disable=not progress)
    for step in bar:
        arrays, masks, true_boxes, identities = renderer.batch(config.batch_size)
        x = _augment(_to_tensor(arrays), config, generator)
        maps = model.segment(x)
        seg_loss = _segmentation_loss(
            maps, torch.from_numpy(masks), torch.from_numpy(true_boxes), config.image_size
        )
        truth = torch.from_numpy(true_boxes)
        # Box correction learns from rough boxes: the segmenter's own (later on) or widely jittered truth.
        rough = _jitter(truth, config.refine_jitter, generator)
        if step >= steps // 3:
            found = model.boxes_from_maps(maps.detach())
            use_found = (torch.rand(len(rough), 1, generator=generator) < 0.5).float()
            rough = use_found * found + (1 - use_found) * rough
        delta = model.classify(x, rough)["box_delta"]
        target = torch.stack(
            [
                (truth[:, 0] - rough[:, 0]) / rough[:, 2],
                (truth[:, 1] - rough[:, 1]) / rough[:, 2],
                torch.log(truth[:, 2] / rough[:, 2]),
            ],
            dim=1,
        )
        refine_loss = F.smooth_l1_loss(delta * 10, target * 10)
        # Classification reads nearly right boxes, as it will after refinement.
        out = model.classify(x, _jitter(truth, config.box_jitter, generator))
        cls_loss = _loss(out, _identity_targets(identities, config.mark_grid)) + refine_loss
        loss = cls_loss + config.seg_weight * seg_loss
        if not torch.isfinite(loss):
            raise ScorerError(f"scorer loss became non-finite at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model, time.perf_counter() - start


def train_scorer(
    seed: int = 0,
    steps: int = 800,
    *,
    config: ScorerConfig | None = None,
    world: ToyWorld | None = None,
    progress: bool = True,
    num_threads: int | None = None,
) -> Scorer:
    """Train a scorer on freshly rendered photos of random (never dev or held-out) identities.

    Args:
        seed: seeds weights, scenes and augmentation.
        steps: optimizer steps of ``config.batch_size`` new photos each.
        config: architecture and training settings; the default matches the default 32 px world.
        world: the world to render; built from ``config`` (image size, grid, world seed) if None.
        progress: show a tqdm bar.
        num_threads: torch CPU threads while training (restored afterwards); ``1`` is often fastest on a
            small, busy machine because this model is too small to amortise thread synchronisation.

    Returns:
        The trained scorer, in eval mode, with ``meta`` holding seed, steps and training seconds.

    Raises:
        ScorerError: if ``steps < 1`` or ``world`` disagrees with ``config`` on image size or grid.
    """
    config = config or ScorerConfig()
    if steps < 1:
        raise ScorerError(f"steps must be at least 1, got {steps}")
    if num_threads is not None and num_threads < 1:
        raise ScorerError(f"num_threads must be at least 1, got {num_threads}")
    if world is None:
        world = ToyWorld(
            config.world_seed,
            WorldConfig(image_size=config.image_size, mark_grid=config.mark_grid, n_pretrain=0),
        )
    if (world.config.image_size, world.config.mark_grid) != (config.image_size, config.mark_grid):
        raise ScorerError(
            f"world renders {world.config.image_size}px / grid {world.config.mark_grid}, "
            f"scorer expects {config.image_size}px / grid {config.mark_grid}"
        )
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        model, seconds = _train(seed, steps, config, world, progress)
    finally:
        torch.set_num_threads(previous_threads)
    meta = {"seed": seed, "steps": steps, "train_seconds": round(seconds, 1), "world_seed": world.world_seed}
    return Scorer(config, model, meta)


def evaluate_scorer(
    scorer: Scorer,
    world: ToyWorld,
    *,
    split: str = "heldout",
    photos_per_identity: int = 10,
    random_scenes_per_identity: int = 10,
    seed: int = 1234,
) -> dict[str, float]:
    """Measure the scorer's gates on freshly rendered photos of one split's identities.

    Returns:
        ``identity_acc`` (share of positives judged exactly right; gate >= 0.95),
        ``random_scene_rate`` (share of random scenes judged to be the target; gate near 0),
        ``twin_rate`` (share of twins judged to be the target), ``mark_acc`` and per-factor accuracies.

    Raises:
        ScorerError: on an unknown or empty split.
    """
    if split not in world.splits or not world.splits[split]:
        raise ScorerError(f"split {split!r} is unknown or empty")
    rng = np.random.default_rng([seed, 0xE7A1])
    hits = {"identity": 0, "random": 0, "twin": 0, "marks": 0, **{f: 0 for f in FACTORS}}
    n_pos = n_neg = 0
    for identity in world.splits[split]:
        photos = [
            world.render(identity, rng, distractors=int(rng.integers(0, 3)))
            for _ in range(photos_per_identity)
        ]
        hits["identity"] += sum(scorer.identity_correct(photos, identity))
        for pred in scorer.predict(photos):
            hits["marks"] += int(pred["mark_colours"] == identity.mark_colours)
            for f in FACTORS:
                hits[f] += int(pred[f] == getattr(identity, f))
        scenes = [world.random_scene(rng, exclude=[identity])[0] for _ in range(random_scenes_per_identity)]
        twins = [world.render(world.twin(identity, rng), rng) for _ in range(random_scenes_per_identity)]
        hits["random"] += sum(scorer.identity_correct(scenes, identity))
        hits["twin"] += sum(scorer.identity_correct(twins, identity))
        n_pos += photos_per_identity
        n_neg += random_scenes_per_identity
    result = {
        "identity_acc": hits["identity"] / n_pos,
        "random_scene_rate": hits["random"] / max(1, n_neg),
        "twin_rate": hits["twin"] / max(1, n_neg),
        "mark_acc": hits["marks"] / n_pos,
    }
    result.update({f"{f}_acc": hits[f] / n_pos for f in FACTORS})
    return result
