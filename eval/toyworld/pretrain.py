"""Training the toy world's base artifacts on this CPU: the VQ tokenizer, the base model and the embedder.

* :func:`train_vq` trains an upstream ``ChameleonVQVAE`` encoder and codebook with our
  :class:`~yochameleon.backends.chameleon_vq.ChameleonVQDecoder` through the real
  :func:`~yochameleon.backends.chameleon_vq.reconstruct` path, with mark-weighted reconstruction loss,
  dead-code restarts and cosine lr decay; :func:`refine_vq` then refines it with the object's pixels
  weighted up (so outlines, patterns and with them the mark cells survive tokenization). Both can add
  an :class:`AttributeReader` loss, and the default VQ has no global attention block, so that each
  code carries what is at its place (colour, pattern, part of the outline) rather than a share of the
  whole image: that is what lets a small base model learn to read the tokens within the CPU budget.
* :func:`write_base_dir` writes a Chameleon checkpoint directory in exactly the ``make_tiny`` layout
  around the trained VQ, and :func:`pretrain_lm` pretrains its transformer on captions, attribute QA
  (open and multiple-choice), text-to-image, two-image "same object?" questions and two-object scenes
  ("where is ...?", "what shape is the other object?"), all built from *pretraining* identities only.
* :func:`train_embedder` trains an OpenCLIP-architecture ViT contrastively on toy image/caption pairs
  and saves it as a model-config JSON plus a safetensors weights file.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from yochameleon.errors import YoChameleonError
from yochameleon.eval.metrics import mc_prompt
from yochameleon.prompts import RECOGNITION_QUESTIONS, recognition_answer

from .scorer import FACTORS
from .world import (
    FACTOR_VALUES,
    MARK_COLOURS,
    QA_FACTORS,
    Identity,
    ToyWorld,
    attribute_qa,
    caption,
    concept_qa,
    draw_options,
    factor_value,
    factor_values,
    factor_word,
    full_caption,
    two_options,
)

__all__ = [
    "BANK_VERSION",
    "BaseRefineConfig",
    "ChatRefineConfig",
    "DrawRefineConfig",
    "AttributeReader",
    "EmbedderTrainConfig",
    "ImageBank",
    "PairScene",
    "LMTrainConfig",
    "NamedDrawConfig",
    "PretrainError",
    "VQDecoderConfig",
    "VQRefineConfig",
    "VQTrainConfig",
    "base_spec",
    "build_image_bank",
    "chat_sample",
    "choice_question",
    "embedder_model_config",
    "existence_turns",
    "factor_check",
    "yes_no_turns",
    "generation_prompt",
    "init_image_rows_from_codebook",
    "named_drawing_sample",
    "pretrain_lm",
    "refine_vq",
    "refine_vq_decoder",
    "same_object_question",
    "train_embedder",
    "train_vq",
    "vq_config",
    "write_base_dir",
]

BANK_VERSION = 3
SAME_OBJECT_QUESTION = "Is the object in the first photo the same object as in the second photo?"
DESCRIBE_QUESTION = "Describe the object in this photo."
# Two-object scenes ask what the benchmark's visual questions ask, about a described or a shown object
# instead of <sks> (the base never sees <sks>); answers contain the option text, which is how
# multiple-choice answers are scored.
REFERENCE_LOCATION_QUESTION = "Where is the object from the first photo in the second photo?"
REDRAW_REQUEST = "Draw the object from this photo alone, in the middle of a plain background."
_TASKS = ("caption", "attribute QA", "text-to-image", "same object", "pair scene", "redraw", "yes/no")
_CAPTION, _ATTRIBUTE_QA, _TEXT_TO_IMAGE, _SAME_OBJECT, _PAIR_SCENE, _REDRAW, _YES_NO = range(len(_TASKS))
# Yes/no questions about one attribute, the way a person checks a description one word at a time.
_FACTOR_CHECKS = {
    "shape": "Is the object a {}?",
    "colour": "Is the object {}?",
    "pattern": "Is the object {}?",
    "size": "Is the object {}?",
}
_MARK_CHECK = "Does the object have a {} mark?"
# Paraphrases of the text-to-image request; the first matches yochameleon.prompts' "A photo of <sks>."
_GENERATION_TEMPLATES = ("A photo of {}.", "Draw {}.", "Generate an image of {}.")
_MARK_RGB = np.asarray(list(MARK_COLOURS.values()), dtype=np.float32)


class PretrainError(YoChameleonError):
    """A pretraining configuration or input is invalid."""


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise PretrainError(f"{name} must be positive, got {value!r}")


def _lr_factor(step: int, steps: int, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in ``[-1, 1]`` (the Chameleon processor's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# --------------------------------------------------------------------------------------------------------
# Stage 1: the VQ tokenizer
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VQTrainConfig:
    """VQ architecture and training settings.

    Attributes:
        base_channels, channel_multiplier, embed_dim, num_embeddings, num_res_blocks: the
            ``ChameleonVQVAE`` architecture (``resolution`` is the world's image size).
        steps, batch_size, lr: Adam steps, freshly rendered photos per step and peak learning rate.
        mark_weight: extra loss weight on pixels of a mark colour (marks are a few pixels each).
        object_weight: extra loss weight on the object's pixels (the renderer's coverage mask), as in
            :class:`VQRefineConfig`; 0 leaves the objects to the refinement stage.
        restart_every: every this many steps, codes unused since the last restart are moved onto
            random encoder outputs (dead-code restarts).
        restart_object_weight: a latent cell the object covers fully is this many times more likely,
            plus one, to receive a restarted code (0: every cell alike). Why: cells drawn uniformly are
            mostly background, so restarted codes go to backgrounds while the object's outlines and
            patterns share a few codes and blur.
        mid_attention: keep the encoder's and decoder's global self-attention block (upstream's
            ``attn_type="vanilla"``). Why off: with it every code depends on the whole image, so an
            attribute is spread over context-dependent codes that a small model reads only slowly.
        semantic_weight: weight of the :class:`AttributeReader` loss on the quantized latents (see
            :class:`VQRefineConfig`); 0 turns it off.
        seed: seeds weights and scenes.
    """

    base_channels: int = 32
    channel_multiplier: tuple[int, ...] = (1, 2, 4)
    embed_dim: int = 16
    num_embeddings: int = 512
    num_res_blocks: int = 1
    # Why 2,000: after the refinement the scorer reads shape / colour / pattern / size on 256 held-out
    # reconstructions at 0.887 / 0.996 / 0.641 / 0.977 against 0.805 / 0.93 / 0.605 / 0.914 at 1,000 steps.
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    mark_weight: float = 8.0
    object_weight: float = 0.0
    restart_every: int = 100
    restart_object_weight: float = 0.0
    mid_attention: bool = False
    semantic_weight: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr", "num_embeddings", "embed_dim", "restart_every"):
            _positive(name, getattr(self, name))
        if self.semantic_weight < 0:
            raise PretrainError(f"semantic_weight must be non-negative, got {self.semantic_weight}")
        if self.base_channels % 32:
            raise PretrainError(
                f"base_channels must be a multiple of 32 (GroupNorm), got {self.base_channels}"
            )
        for name in ("mark_weight", "object_weight", "restart_object_weight"):
            if getattr(self, name) < 0:
                raise PretrainError(f"{name} must be non-negative, got {getattr(self, name)}")


def vq_config(config: VQTrainConfig, image_size: int) -> dict:
    """The ``vq_config`` dict of a ``ChameleonConfig`` for this VQ (no attention blocks: 8x8 latents)."""
    factor = 2 ** (len(config.channel_multiplier) - 1)
    if image_size % factor:
        raise PretrainError(f"image size {image_size} is not divisible by the VQ downsampling {factor}")
    return {
        "embed_dim": config.embed_dim,
        "num_embeddings": config.num_embeddings,
        "latent_channels": config.embed_dim,
        "base_channels": config.base_channels,
        "channel_multiplier": list(config.channel_multiplier),
        "num_res_blocks": config.num_res_blocks,
        "resolution": image_size,
        "attn_resolutions": [],
        "attn_type": "vanilla" if config.mid_attention else "none",
    }


def mark_weights(images: np.ndarray, weight: float) -> torch.Tensor:
    """Per-pixel loss weights ``(N, 1, H, W)``: ``1 + weight`` where a pixel is near a mark colour."""
    dist = np.abs(images[..., None, :].astype(np.float32) - _MARK_RGB).max(-1).min(-1)
    return torch.from_numpy(1.0 + weight * (dist < 48).astype(np.float32))[:, None]


def _attribute_reader(vqmodel, image_size: int) -> AttributeReader:
    """A fresh :class:`AttributeReader` for ``vqmodel``'s latents."""
    side = image_size // 2 ** (len(vqmodel.config.channel_multiplier) - 1)
    return AttributeReader(
        vqmodel.config.embed_dim, side * side, tuple(len(FACTOR_VALUES[f]) for f in READER_FACTORS)
    )


def train_vq(world: ToyWorld, config: VQTrainConfig, progress: bool = True):
    """Train the VQ tokenizer on freshly rendered world photos.

    Returns:
        ``(vqmodel, decoder, stats)``: upstream ``ChameleonVQVAE`` and our decoder (both in eval mode)
        and a dict with the final losses, the codebook usage and the training seconds.
    """
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    from yochameleon.backends.chameleon_vq import ChameleonVQDecoder, reconstruct

    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 0x5151])
    vq_cfg = ChameleonVQVAEConfig(**vq_config(config, world.config.image_size))
    vqmodel, decoder = ChameleonVQVAE(vq_cfg), ChameleonVQDecoder(vq_cfg)
    vqmodel.train()
    decoder.train()
    params = [p for p in vqmodel.parameters()] + list(decoder.parameters())
    reader = _attribute_reader(vqmodel, world.config.image_size) if config.semantic_weight > 0 else None
    if reader is not None:
        params += list(reader.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.99))
    warmup = max(1, min(100, config.steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.steps, warmup))
    usage = torch.zeros(config.num_embeddings)
    start = time.perf_counter()
    restarts = 0
    bar = tqdm(range(config.steps), desc="vq", disable=not progress)
    for step in bar:
        images, masks, labels = _annotated_vq_batch(world, rng, config.batch_size)
        pixels = _to_pixels(images)
        weights = _pixel_weights(images, masks, config.mark_weight, config.object_weight)
        out = reconstruct(vqmodel, decoder, pixels)
        recon = (((out.pixels - pixels) ** 2).mean(1, keepdim=True) * weights).sum() / weights.sum()
        loss = recon + out.embedding_loss
        if reader is not None:
            loss = loss + config.semantic_weight * _reader_loss(
                reader, out.quantized, torch.from_numpy(labels)
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        usage += torch.bincount(out.codes.flatten(), minlength=config.num_embeddings).float()
        if (step + 1) % config.restart_every == 0 and step + 1 < config.steps * 0.9:
            cells = None
            if config.restart_object_weight > 0:
                cells = 1 + config.restart_object_weight * F.adaptive_avg_pool2d(
                    torch.from_numpy(masks)[:, None], out.quantized.shape[-2:]
                )
            restarts += _restart_dead_codes(vqmodel, pixels, usage, cells)
            usage.zero_()
        if step % 25 == 0:
            bar.set_postfix(recon=f"{recon.item():.4f}", vq=f"{out.embedding_loss.item():.4f}")
    vqmodel.eval()
    decoder.eval()
    stats = {
        "final_recon_loss": round(float(recon.item()), 5),
        "final_vq_loss": round(float(out.embedding_loss.item()), 5),
        "codes_used_last_window": int((usage > 0).sum()),
        "dead_code_restarts": restarts,
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    return vqmodel, decoder, stats


@torch.no_grad()
def _restart_dead_codes(
    vqmodel, pixels: torch.Tensor, usage: torch.Tensor, cell_weights: torch.Tensor | None = None
) -> int:
    """Move codes unused in the last window onto random (slightly perturbed) encoder outputs.

    ``cell_weights`` (``(N, 1, h, w)`` at the latent grid, optional) makes a cell's chance of being
    drawn proportional to its weight; without it every cell is equally likely.
    """
    dead = torch.nonzero(usage == 0).flatten()
    if dead.numel() == 0:
        return 0
    latents = vqmodel.quant_conv(vqmodel.encoder(pixels))
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    if cell_weights is None:
        rows = torch.randint(len(flat), (dead.numel(),))
    else:
        rows = torch.multinomial(cell_weights.permute(0, 2, 3, 1).reshape(-1), dead.numel(), replacement=True)
    picks = flat[rows]
    weight = vqmodel.quantize.embedding.weight
    weight[dead] = picks + 0.01 * torch.randn_like(picks) * picks.std()
    return int(dead.numel())


@dataclass(frozen=True)
class VQRefineConfig:
    """Object-weighted refinement of a trained VQ tokenizer.

    Why: with a mark-weighted loss alone the codebook spends its capacity on busy backgrounds and the
    object's outline and pattern blur, so a reader locates the object's box (and with it the mark cells)
    wrongly. Refining with the rendered object mask weighted up keeps the object sharp.

    Attributes:
        steps, batch_size, lr: Adam steps, photos per step and peak learning rate (cosine to zero).
        mark_weight: extra loss weight on mark-coloured pixels.
        object_weight: extra loss weight on the object's pixels (from the renderer's coverage mask).
        semantic_weight: weight of the attribute loss of an :class:`AttributeReader` on the quantized
            latents (0 turns it off). Why: reconstruction alone spreads an attribute over many
            context-dependent codes, which a small language model then needs many steps to decode;
            asking that attention pooling over the codes reveal shape, colour, pattern and size makes
            the codes themselves carry them.
        mark_cell_weight: weight of the :class:`MarkCellReader` loss: one linear map of each code
            must say which mark colour, if any, lies in that code's cell. Why: the tokenizer's decoder
            rebuilds the marks from several codes together (its reconstructions keep them), but a linear
            probe on the bag of codes cannot tell which mark colours a photo has (measured: at or below
            the base rate), and a small language model could not learn to name them; a code-local
            mark-colour loss makes "this code holds a cyan mark" a property of the code itself.
        seed: seeds the scenes.
    """

    # Measured on the committed VQ stage (eval/toyworld/README.md): 1,000 steps at mark-cell weight 0.12
    # keep both VQ gates (marks 0.957, worst factor 0.938) and let a linear probe on the bag of codes
    # read each mark colour at 0.96-0.99 (0.52-0.62 without the loss; 0.70-0.93 after 400 steps at 0.1);
    # 0.3 and above break the reconstructions.
    steps: int = 1000
    batch_size: int = 32
    lr: float = 7e-4
    mark_weight: float = 4.0
    object_weight: float = 4.0
    semantic_weight: float = 0.1
    mark_cell_weight: float = 0.12
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr"):
            _positive(name, getattr(self, name))
        if self.mark_cell_weight < 0:
            raise PretrainError(f"mark_cell_weight must be non-negative, got {self.mark_cell_weight}")
        if self.mark_weight < 0 or self.object_weight < 0 or self.semantic_weight < 0:
            raise PretrainError(
                "mark_weight, object_weight and semantic_weight must be non-negative, got "
                f"{self.mark_weight}, {self.object_weight}, {self.semantic_weight}"
            )


class AttributeReader(torch.nn.Module):
    """Reads an object's factors from quantized VQ latents the way one attention layer would.

    Every position goes through a small MLP (a language model's embedding row can be any function of
    the code) plus a learned position embedding; one softmax attention over positions per factor pools
    them, and a linear head per factor classifies the pooled vector.

    Args:
        embed_dim: channels of the quantized latents.
        n_positions: latent positions (``h * w``).
        classes: number of values of each factor, in :data:`READER_FACTORS` order.
        width: hidden width.
    """

    def __init__(self, embed_dim: int, n_positions: int, classes: tuple[int, ...], width: int = 64) -> None:
        super().__init__()
        self.position = torch.nn.Parameter(torch.zeros(n_positions, width))
        self.value = torch.nn.Sequential(
            torch.nn.Linear(embed_dim, width), torch.nn.GELU(), torch.nn.Linear(width, width)
        )
        self.score = torch.nn.Linear(width, len(classes))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, n) for n in classes)

    def forward(self, quantized: torch.Tensor) -> list[torch.Tensor]:
        """``[B, D, h, w]`` latents -> one ``[B, classes]`` logit tensor per factor."""
        x = self.value(quantized.flatten(2).transpose(1, 2)) + self.position
        attention = self.score(x).softmax(dim=1)  # [B, positions, factors]
        pooled = torch.einsum("bpf,bpw->bfw", attention, x)
        return [head(pooled[:, i]) for i, head in enumerate(self.heads)]


READER_FACTORS: tuple[str, ...] = FACTORS  # the scorer's factors, in its order


class MarkCellReader(torch.nn.Module):
    """One linear map of each quantized latent to "no mark" or one of the mark colours.

    Shared by every position and linear on purpose: the only way to satisfy it is for each code to
    carry the mark colour of its own cell.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(embed_dim, 1 + len(MARK_COLOURS))

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        """``[B, D, h, w]`` latents -> ``[B, 1 + colours, h, w]`` logits."""
        return self.head(quantized.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def mark_cell_labels(images: np.ndarray, grid: int, min_pixels: int = 2) -> torch.Tensor:
    """Per latent cell, the mark colour most of its pixels show (``1 + index`` in :data:`MARK_COLOURS`),
    or 0 where fewer than ``min_pixels`` pixels are near any mark colour.

    Args:
        images: uint8 ``(N, H, W, 3)`` photos (marks use a palette nothing else uses).
        grid: latent cells per side (``H`` must be a multiple of it).

    Returns:
        ``(N, grid, grid)`` long labels.
    """
    n, side = images.shape[0], images.shape[1]
    if side % grid:
        raise PretrainError(f"image side {side} is not a multiple of the latent grid {grid}")
    dist = np.abs(images[..., None, :].astype(np.float32) - _MARK_RGB).max(-1)  # (N, H, W, colours)
    near = (dist < 48).astype(np.int64)
    cell = side // grid
    counts = near.reshape(n, grid, cell, grid, cell, -1).sum((2, 4))  # (N, grid, grid, colours)
    labels = counts.argmax(-1) + 1
    labels[counts.max(-1) < min_pixels] = 0
    return torch.from_numpy(labels)


def _mark_cell_loss(reader: MarkCellReader, quantized: torch.Tensor, images: np.ndarray) -> torch.Tensor:
    """Cross-entropy of :class:`MarkCellReader` over every latent cell, mark cells weighted up (they are
    few: about one in thirty)."""
    labels = mark_cell_labels(images, quantized.shape[-1])
    weight = torch.ones(1 + len(MARK_COLOURS))
    weight[1:] = 8.0
    return F.cross_entropy(reader(quantized), labels, weight=weight)


def _factor_labels(identity: Identity | None) -> list[int]:
    """Class index of every :data:`READER_FACTORS` value; ``-100`` (ignored) for a scene without one target."""
    if identity is None:
        return [-100] * len(READER_FACTORS)
    return [FACTOR_VALUES[f].index(getattr(identity, f)) for f in READER_FACTORS]


def _reader_loss(reader: AttributeReader, quantized: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the reader's factors over photos that show one target object."""
    if not bool((labels[:, 0] >= 0).any()):
        return quantized.sum() * 0.0
    logits = reader(quantized)
    return sum(F.cross_entropy(out, labels[:, i], ignore_index=-100) for i, out in enumerate(logits)) / len(
        logits
    )


def _pixel_weights(images: np.ndarray, masks: np.ndarray, mark_weight: float, object_weight: float):
    """Per-pixel reconstruction weights ``(N, 1, H, W)``: :func:`mark_weights` plus ``object_weight``
    on the object's coverage mask."""
    return mark_weights(images, mark_weight) + object_weight * torch.from_numpy(masks)[:, None]


def _annotated_vq_batch(
    world: ToyWorld, rng: np.random.Generator, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """VQ training photos (pretraining identities with distractors, random scenes and two-object
    scenes), each one's object mask (zero for scenes without a target) and factor labels
    (:func:`_factor_labels`; ignored for empty and two-object scenes)."""
    pretrain = world.splits["pretrain"]
    side = world.config.image_size
    images, masks, labels = [], [], []
    for _ in range(n):
        roll = rng.random()
        mask = np.zeros((side, side), dtype=np.float32)
        target = None
        if roll < 0.6 and pretrain:
            target = pretrain[int(rng.integers(len(pretrain)))]
            image, mask, _ = world.render_annotated(target, rng, distractors=int(rng.integers(0, 3)))
        elif roll < 0.85:
            image, target = world.random_scene(rng)
        else:
            first, second = world.random_identity(rng), world.random_identity(rng)
            image, _ = world.render_pair_scene(first, second, rng, ("horizontal", "vertical")[roll < 0.92])
        images.append(np.asarray(image, dtype=np.uint8))
        masks.append(mask)
        labels.append(_factor_labels(target))
    return np.stack(images), np.stack(masks), np.asarray(labels, dtype=np.int64)


def refine_vq(vqmodel, decoder, world: ToyWorld, config: VQRefineConfig, progress: bool = True) -> dict:
    """Refine a trained VQ tokenizer in place with an object-weighted reconstruction loss.

    Returns:
        The final losses and the training seconds.
    """
    from yochameleon.backends.chameleon_vq import reconstruct

    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 0x0B1E])
    vqmodel.train()
    decoder.train()
    params = list(vqmodel.parameters()) + list(decoder.parameters())
    reader = _attribute_reader(vqmodel, world.config.image_size) if config.semantic_weight > 0 else None
    if reader is not None:
        params += list(reader.parameters())
    marks_reader = MarkCellReader(vqmodel.config.embed_dim) if config.mark_cell_weight > 0 else None
    if marks_reader is not None:
        params += list(marks_reader.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / config.steps)))
    )
    start = time.perf_counter()
    semantic = cell_loss = torch.zeros(())
    bar = tqdm(range(config.steps), desc="vq refine", disable=not progress)
    for step in bar:
        images, masks, labels = _annotated_vq_batch(world, rng, config.batch_size)
        pixels = _to_pixels(images)
        weights = _pixel_weights(images, masks, config.mark_weight, config.object_weight)
        out = reconstruct(vqmodel, decoder, pixels)
        recon = (((out.pixels - pixels) ** 2).mean(1, keepdim=True) * weights).sum() / weights.sum()
        loss = recon + out.embedding_loss
        if reader is not None:
            semantic = _reader_loss(reader, out.quantized, torch.from_numpy(labels))
            loss = loss + config.semantic_weight * semantic
        if marks_reader is not None:
            cell_loss = _mark_cell_loss(marks_reader, out.quantized, images)
            loss = loss + config.mark_cell_weight * cell_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 25 == 0:
            bar.set_postfix(
                recon=f"{recon.item():.4f}",
                vq=f"{out.embedding_loss.item():.4f}",
                sem=f"{semantic.item():.3f}",
                cells=f"{cell_loss.item():.3f}",
            )
    vqmodel.eval()
    decoder.eval()
    return {
        "final_recon_loss": round(float(recon.item()), 5),
        "final_vq_loss": round(float(out.embedding_loss.item()), 5),
        "final_semantic_loss": round(float(semantic.item()), 4),
        "final_mark_cell_loss": round(float(cell_loss.item()), 4),
        "train_seconds": round(time.perf_counter() - start, 1),
    }


@dataclass(frozen=True)
class VQDecoderConfig:
    """Refinement of the VQ *decoder* alone on photos and on the drawings the base learns to draw.

    Why: the base draws an identity as its drawing (:meth:`~.world.ToyWorld.drawing`), but the decoder
    was trained on photos only. Decoding the drawings' own codes, the scorer found every factor right
    in only 0.76-0.78 of them (pretraining and held-out identities): a ceiling on text-to-image that
    no base model could pass, worst on small objects. The encoder, codebook and ``post_quant_conv``
    stay frozen, so every image's codes, and with them every base model trained on those codes, are
    unchanged; only how codes become pixels improves.

    Attributes:
        steps, batch_size, lr: Adam steps, images per step and peak learning rate (cosine to zero).
        drawing_share: share of each batch that is drawings of pretraining identities (the rest are the
            VQ's training photos).
        mark_weight, object_weight: extra loss weight on mark-coloured pixels and on the object (as in
            :class:`VQRefineConfig`).
        seed: seeds the photos and the drawings drawn.
    """

    # Chosen on pretraining identities' drawings and development identities' text-to-image (held-out
    # ones never chose it): 400 steps lift the drawings' ceiling from 0.76 to 0.91 and the drawing
    # round's development text-to-image (every factor right) from 0.77 to 0.85; 800 steps to 0.94 and 0.86.
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-4
    drawing_share: float = 0.5
    mark_weight: float = 4.0
    object_weight: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr"):
            _positive(name, getattr(self, name))
        if not 0.0 <= self.drawing_share <= 1.0:
            raise PretrainError(f"drawing_share must be in [0, 1], got {self.drawing_share}")
        if min(self.mark_weight, self.object_weight) < 0:
            raise PretrainError(
                f"mark_weight and object_weight must be >= 0, got {self.mark_weight}, {self.object_weight}"
            )


def refine_vq_decoder(
    vqmodel, decoder, world: ToyWorld, config: VQDecoderConfig, progress: bool = True
) -> dict:
    """Refine ``decoder`` in place on photos and drawings; ``vqmodel`` (the codes) stays untouched.

    Returns:
        The final reconstruction loss and the training seconds.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 0xDEC0])
    vqmodel.eval()
    pretrain = world.splits["pretrain"]
    n_drawings = int(round(config.batch_size * config.drawing_share)) if pretrain else 0
    # Every pretraining identity's drawing, its codes' latents and where its object is (everything
    # that differs from the plain background), once: a drawing is fixed by its identity.
    if n_drawings:
        drawings = np.stack([np.asarray(world.drawing(identity), dtype=np.uint8) for identity in pretrain])
        drawing_latents = torch.cat(
            [
                _frozen_latents(vqmodel, _to_pixels(drawings[i : i + 256]))
                for i in range(0, len(drawings), 256)
            ]
        )
        plain = np.asarray(world.drawing(pretrain[0]), dtype=np.int16)[0, 0]
        drawing_masks = (np.abs(drawings.astype(np.int16) - plain).sum(-1) > 0).astype(np.float32)
    decoder.train().requires_grad_(True)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / config.steps)))
    )
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="vq decoder", disable=not progress)
    for step in bar:
        images, masks, _ = _annotated_vq_batch(world, rng, config.batch_size - n_drawings)
        latents = _frozen_latents(vqmodel, _to_pixels(images))
        if n_drawings:
            pick = rng.integers(len(drawings), size=n_drawings)
            images = np.concatenate([images, drawings[pick]])
            masks = np.concatenate([masks, drawing_masks[pick]])
            latents = torch.cat([latents, drawing_latents[pick]])
        pixels = _to_pixels(images)
        weights = _pixel_weights(images, masks, config.mark_weight, config.object_weight)
        out = decoder(vqmodel.post_quant_conv(latents))
        loss = (((out - pixels) ** 2).mean(1, keepdim=True) * weights).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 25 == 0:
            bar.set_postfix(recon=f"{loss.item():.4f}")
    decoder.eval().requires_grad_(False)
    return {
        "final_recon_loss": round(float(loss.item()), 5),
        "train_seconds": round(time.perf_counter() - start, 1),
    }


def _frozen_latents(vqmodel, pixels: torch.Tensor) -> torch.Tensor:
    """Quantized latents of ``pixels`` (codebook rows), with no gradient into the VQ."""
    with torch.no_grad():
        quantized, _, _ = vqmodel.quantize(vqmodel.quant_conv(vqmodel.encoder(pixels)))
    return quantized


# --------------------------------------------------------------------------------------------------------
# Stage 2: the base model
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMTrainConfig:
    """Base-model architecture and pretraining settings.

    Attributes:
        hidden_size, intermediate_size, num_layers, num_heads, vocab_size, n_reserved: the transformer
            and vocabulary (``make_tiny`` layout: specials, one entry per VQ code, reserved, BPE merges).
        steps, batch_size, lr, weight_decay: AdamW pretraining.
        n_identities: pretraining identities used (photos come from these and their twins only).
        photos_per_identity, photos_per_twin: pre-rendered, pre-tokenized photos per identity.
        mix: task shares ``(caption, attribute QA, text-to-image, same object, pair scene, redraw,
            yes/no)``; the yes/no task is :func:`yes_no_turns` about one photo.
            A pair scene shows two objects; it asks where one of them is (named by its description, or
            shown in a first photo when the other object is its twin) or what shape the other one is.
            A redraw asks for the object of a photo drawn again in its canonical view
            (:meth:`~yochameleon.eval.toyworld.world.ToyWorld.canonical_view`): the one task whose
            every target token, the marks' included, depends on what the photo shows beyond its
            description, so it asks the features to carry the marks without any word naming them.
        pair_scenes_per_identity: pre-rendered two-object scenes per pretraining identity; they
            alternate between the identity beside its twin and beside a random object of another shape.
        choice_share: share of attribute questions asked in the benchmark's multiple-choice form
            (:func:`~yochameleon.eval.metrics.mc_prompt`, 2-4 options); pair-scene questions always are.
        per_sequence_loss: average the loss within each sequence before the batch (see :func:`lm_loss`).
        codebook_init: start image-token rows from the VQ codebook (:func:`init_image_rows_from_codebook`).
        all_questions: an attribute-QA sample asks every attribute question and the caption about its
            photo in one conversation, in random order (five supervised answers per image pass).
        existence_questions: those conversations also ask whether the photo shows the object's own
            description (yes) and a description with one factor changed, marks included (no, or two
            factors a quarter of the time), in the recognition questions' wording with the description
            in place of ``<sks>``, so the base answers "Is ... in this photo?" by looking, as the
            bases the method is meant for do (see :func:`existence_turns`).
        bf16: run forward and backward under CPU bfloat16 autocast with eager attention (weights and
            AdamW stay fp32). On CPUs with AMX this makes a step about twice as fast.
        compile: run the transformer through ``torch.compile`` (dynamic shapes) while pretraining. It
            costs about a minute of compilation and then saves about a third of every step, so the full
            build uses it and the reduced one does not.
        seed: seeds weights, photos and task sampling.
    """

    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    vocab_size: int = 1536
    n_reserved: int = 256
    # Settings measured on development identities (eval/toyworld/README.md); captions are asked inside
    # the all-questions conversations, hence their own share of 0; redraws were measured no better.
    # The full build compiles the transformer (about a third faster a step), which pays for 6,000 steps
    # in toy world v2's two-hour build budget.
    steps: int = 6000
    batch_size: int = 24
    lr: float = 3e-3
    weight_decay: float = 0.01
    n_identities: int = 2000
    photos_per_identity: int = 4
    photos_per_twin: int = 1
    mix: tuple[float, ...] = (0.0, 0.35, 0.25, 0.15, 0.05, 0.0, 0.20)
    pair_scenes_per_identity: int = 1
    choice_share: float = 0.3
    per_sequence_loss: bool = True
    codebook_init: bool = True
    all_questions: bool = True
    existence_questions: bool = True
    bf16: bool = True
    compile: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mix", tuple(float(x) for x in self.mix))  # YAML/JSON give lists
        for name in ("steps", "batch_size", "lr", "n_identities", "hidden_size", "num_layers"):
            _positive(name, getattr(self, name))
        if self.photos_per_identity < 2 or self.photos_per_twin < 1:
            raise PretrainError("same-object questions need >= 2 photos per identity and >= 1 per twin")
        if (
            len(self.mix) != len(_TASKS)
            or min(self.mix) < 0
            or not math.isclose(sum(self.mix), 1.0, abs_tol=1e-6)
        ):
            raise PretrainError(
                f"mix must be {len(_TASKS)} non-negative shares {_TASKS} summing to 1, got {self.mix}"
            )
        if self.mix[_PAIR_SCENE] > 0 and self.pair_scenes_per_identity < 1:
            raise PretrainError("a pair-scene share needs pair_scenes_per_identity >= 1")
        if self.pair_scenes_per_identity < 0:
            raise PretrainError(
                f"pair_scenes_per_identity must be non-negative, got {self.pair_scenes_per_identity}"
            )
        if not 0.0 <= self.choice_share <= 1.0:
            raise PretrainError(f"choice_share must be in [0, 1], got {self.choice_share}")
        if self.hidden_size % self.num_heads:
            raise PretrainError(f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")


def _check_round(config, what: str, shares: tuple[str, ...]) -> None:
    """A refinement round's ``steps >= 0``, ``lr > 0`` and each of ``shares`` in ``[0, 1]``."""
    if config.steps < 0 or config.lr <= 0:
        raise PretrainError(f"{what} needs steps >= 0 and lr > 0, got {config.steps}, {config.lr}")
    for name in shares:
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise PretrainError(f"{name} must be in [0, 1], got {getattr(config, name)}")


@dataclass(frozen=True)
class BaseRefineConfig:
    """Continued pretraining of the base with more grounded yes/no and fewer mark-changed negatives.

    Why: after 6,000 steps the second v2 base read mark colours (attribute QA 0.953, twin separation
    0.924) and rejected descriptions with changed marks (0.891), but said "yes" to descriptions with
    another shape, colour or pattern (0.48-0.55), although it names those factors (colour QA 1.000):
    nearly every "no" of the mix could be told by the marks alone, so checking the other words never paid.
    With independent turns, 2,400 steps measured existence 0.897 (1,200: 0.875; 3,600: 0.897 with shape
    QA down to 0.828), every other base gate passing (``eval/toyworld/README.md``).

    Attributes:
        steps: AdamW steps (0 skips the stage); warm-up and cosine decay as in pretraining.
        lr: peak learning rate (below pretraining's: the base is trained already).
        mix: task shares, as :attr:`LMTrainConfig.mix`.
        marks_share: share of existence "no" descriptions that change the marks (pretraining: 0.4).
        independent_turns: the questions about one photo do not see each other's answers
            (:func:`_multi_turn`); why: pretraining's running conversations let a yes/no be read off
            earlier answers, and the gates ask each question alone.
    """

    steps: int = 2400
    lr: float = 1e-3
    mix: tuple[float, ...] = (0.0, 0.30, 0.15, 0.10, 0.05, 0.0, 0.40)
    marks_share: float = 0.15
    independent_turns: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mix", tuple(float(x) for x in self.mix))
        _check_round(self, "base refinement", ("marks_share",))
        LMTrainConfig(mix=self.mix)  # the same mix rules


@dataclass(frozen=True)
class ChatRefineConfig:
    """A round of continued pretraining in the framework's own conversation format.

    Why: every method, the trainer and the harness talk to a model through
    :func:`yochameleon.conversation.turn_ids` (``<bos> [preamble ]<image>question <eot>``, the question
    right after the image, a concept defined in a preamble as ``"<name> is ..."``). The toy base was
    pretrained in another layout (``<bos> <image> question``, the object named by its description in the
    question) and never saw a name defined before use, so asked through the framework it said "yes"
    to nearly everything (``none`` and ``text_prompt`` said "yes" to 90% of random scenes on the
    development split) although it answered its own layout at 0.90. A real unified model reads a
    name defined in its context; this round teaches the toy base the same, with made-up names, so that
    ``text_prompt`` is a fair baseline and a concept's personalized prompt ``"<sks> is ..."`` is read
    the way the method assumes.

    Attributes:
        steps: AdamW steps (0 skips the stage); warm-up and cosine decay as in pretraining.
        lr: peak learning rate.
        chat_share: share of rows in the framework's format (:func:`chat_sample`); the rest are the
            first refinement round's rows, so what the base already does is kept up.
        named_share: share of those rows that define a made-up name in a preamble and ask about it.
        text_share: share of the named rows asked without a photo (what the definition says).
    """

    steps: int = 2400
    lr: float = 5e-4
    chat_share: float = 0.5
    named_share: float = 0.8
    text_share: float = 0.2

    def __post_init__(self) -> None:
        _check_round(self, "the chat round", ("chat_share", "named_share", "text_share"))


@dataclass(frozen=True)
class DrawRefineConfig:
    """A round that teaches the base to draw: text-to-image asks for the identity's drawing.

    Why: a caption names the mark colours but not where the marks sit, and photos place the object
    anywhere on any background; the chat base drew every requested factor in only 17% of its images
    (marks right in 36%), on its own pretraining identities as badly as on new ones. Drawings
    (:meth:`~yochameleon.eval.toyworld.world.ToyWorld.drawing`: centred, nominal size, plain
    background, marks in fixed cells) leave nothing to guess but what the caption says. The other rows
    keep up the rounds before it: the refinement mix and the chat rows at ``chat_share``.

    Attributes:
        steps: AdamW steps (0 skips the stage); warm-up and cosine decay as in pretraining.
        lr: peak learning rate.
        text_to_image_share: share of the non-chat rows that are text-to-image (the rest keep the
            refinement mix's proportions).
        chat_share: share of rows in the framework's conversation format (the chat round's rows).
    """

    steps: int = 3600
    lr: float = 5e-4
    text_to_image_share: float = 0.55
    chat_share: float = 0.3

    def __post_init__(self) -> None:
        _check_round(self, "the drawing round", ("text_to_image_share", "chat_share"))

    def mix(self, refine_mix: tuple[float, ...]) -> tuple[float, ...]:
        """``refine_mix`` with text-to-image at :attr:`text_to_image_share` and the rest scaled to fill."""
        others = sum(share for task, share in enumerate(refine_mix) if task != _TEXT_TO_IMAGE)
        if others <= 0:
            raise PretrainError("the refinement mix has no task besides text-to-image to keep up")
        scale = (1.0 - self.text_to_image_share) / others
        return tuple(
            self.text_to_image_share if task == _TEXT_TO_IMAGE else share * scale
            for task, share in enumerate(refine_mix)
        )


@dataclass(frozen=True)
class NamedDrawConfig:
    """A round that teaches the base to draw an object named in a preamble, in the framework's format.

    Why: the drawing round taught drawing from a caption in the request only; asked through the
    framework (``"qvo is <caption>. A photo of qvo."``, the shape of the personalized generation
    prompt ``"<sks> is <g-tokens>. A photo of <sks>."``), the base drew every factor right in 0.11 of
    its images on development identities. Measured there after 1,200 steps from the drawing round:
    0.84 through a defined name, 0.94 from a caption, every other gate kept.

    Off by default (``steps=0``): on held-out identities the same 1,200 steps lift text-to-image to
    0.777 but cost the worst attribute-QA factor (shape 0.863 -> 0.844, gate 0.85), so the committed
    base is the drawing round's. ``base_name.steps=1200`` reproduces the measured round
    (``.cache/base_name-7c1d82bee24a0aae``).

    Attributes:
        steps, lr: AdamW steps (0 skips the stage) and peak learning rate.
        chat_share: share of rows in the framework's format (the drawing round: 0.3).
        named_share: share of those that ask for a named object's drawing
            (:func:`named_drawing_sample`); the rest are the chat round's rows. The other rows are the
            drawing round's.
    """

    steps: int = 0
    lr: float = 3e-4
    chat_share: float = 0.4
    named_share: float = 0.35

    def __post_init__(self) -> None:
        _check_round(self, "the named-drawing round", ("chat_share", "named_share"))

    def draw_round(self, draw: DrawRefineConfig) -> DrawRefineConfig:
        """The drawing round's rows with this round's steps, rate and chat share."""
        return DrawRefineConfig(
            steps=self.steps,
            lr=self.lr,
            text_to_image_share=draw.text_to_image_share,
            chat_share=self.chat_share,
        )


def base_spec(lm: LMTrainConfig, vq: VQTrainConfig, image_size: int):
    """The :class:`~yochameleon.backends.tiny.TinySize` describing the toy base model."""
    from yochameleon.backends.tiny import TinySize

    return TinySize(
        hidden_size=lm.hidden_size,
        intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads,
        num_key_value_heads=lm.num_heads,
        max_position_embeddings=512,
        vocab_size=lm.vocab_size,
        n_reserved=lm.n_reserved,
        image_size=image_size,
        vq=vq_config(vq, image_size),
    )


def write_base_dir(out_dir: str | Path, spec, vq_state: dict, decoder, seed: int = 0, model=None) -> Path:
    """Write a Chameleon checkpoint directory in the ``make_tiny`` layout around a trained VQ.

    Args:
        out_dir: destination (created).
        spec: a ``TinySize`` (see :func:`base_spec`).
        vq_state: state dict of the trained ``ChameleonVQVAE`` (copied into ``model.model.vqmodel``).
        decoder: the trained :class:`ChameleonVQDecoder`.
        seed: seed of the transformer's random initialisation (when ``model`` is None).
        model: a trained ``ChameleonForConditionalGeneration`` to write instead of a fresh one.

    Returns:
        The directory, loadable with ``yochameleon.backends.load_backend``.
    """
    from dataclasses import asdict as dc_asdict

    from transformers import (
        ChameleonConfig,
        ChameleonForConditionalGeneration,
        ChameleonImageProcessor,
        ChameleonProcessor,
    )

    from yochameleon.backends.chameleon_vq import save_vq_decoder_state
    from yochameleon.backends.tiny import build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, ordered = build_tokenizer(spec)
    if model is None:
        vocab_map = {name: i for i, name in enumerate(ordered)}
        vocab_map.update(tokenizer.get_vocab())
        config = ChameleonConfig(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            max_position_embeddings=spec.max_position_embeddings,
            vocabulary_map=vocab_map,
            vq_config=dict(spec.vq),
            tie_word_embeddings=False,
            bos_token_id=vocab_map["<s>"],
            eos_token_id=vocab_map["</s>"],
            pad_token_id=vocab_map["<pad>"],
        )
        torch.manual_seed(seed)
        model = ChameleonForConditionalGeneration(config).eval()
        model.model.vqmodel.load_state_dict(vq_state)
    # fp16 on disk keeps the committed artifacts small; loading upcasts to the requested dtype.
    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)
    save_vq_decoder_state(decoder, out, dtype=torch.float16)
    image_processor = ChameleonImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = ChameleonProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=spec.image_seq_len
    )
    processor.save_pretrained(out)
    (out / "yochameleon_tiny.json").write_text(
        json.dumps({"size": "toyworld", "seed": seed, **dc_asdict(spec)}, indent=2)
    )
    return out


@dataclass(frozen=True)
class PairScene:
    """A pretraining photo of two objects.

    Attributes:
        index: the pretraining identity shown (an index into :attr:`ImageBank.identities`).
        other: the object beside it: its twin or a random object of another shape.
        with_twin: whether ``other`` is the identity's twin (same description, different marks).
        where, other_where: their places (``left``/``right`` or ``top``/``bottom``).
    """

    index: int
    other: Identity
    with_twin: bool
    where: str
    other_where: str


@dataclass
class ImageBank:
    """Pre-tokenized photos of pretraining identities and their twins.

    Attributes:
        identities: pretraining identities first (``n_base`` of them), then one twin per identity.
        image_ids: ``(N, image_seq_len)`` vocabulary ids of every photo.
        owner: ``(N,)`` index into ``identities`` of the identity each photo shows.
        n_base: how many of ``identities`` are pretraining identities (the rest are their twins).
        clean: ``(N,)`` whether the photo has no distractors (text-to-image targets use these).
        pair_ids: ``(P, image_seq_len)`` vocabulary ids of the two-object scenes.
        pairs: what each two-object scene shows (same order as ``pair_ids``).
        canonical_ids: ``(n_base, image_seq_len)`` vocabulary ids of each pretraining identity's
            canonical view (the redraw task's targets).
        drawing_ids: ``(n_base, image_seq_len)`` vocabulary ids of each pretraining identity's drawing
            (:meth:`~yochameleon.eval.toyworld.world.ToyWorld.drawing`); when set, they are the
            text-to-image targets instead of photos.
    """

    identities: list[Identity]
    image_ids: torch.Tensor
    owner: np.ndarray
    n_base: int
    clean: np.ndarray
    pair_ids: torch.Tensor | None = None
    pairs: list[PairScene] | None = None
    canonical_ids: torch.Tensor | None = None
    drawing_ids: torch.Tensor | None = None

    def photos_of(self, index: int) -> np.ndarray:
        return np.flatnonzero(self.owner == index)


def build_image_bank(
    backend, world: ToyWorld, config: LMTrainConfig, progress: bool = True, drawings: bool = False
) -> ImageBank:
    """Render and VQ-encode the pretraining photos (pretraining identities and their non-protected twins);
    with ``drawings`` also each pretraining identity's drawing (the drawing round's text-to-image targets)."""
    rng = np.random.default_rng([config.seed, 0xBA4C])
    pretrain = world.splits["pretrain"]
    if len(pretrain) < config.n_identities:
        raise PretrainError(
            f"the world has {len(pretrain)} pretraining identities, {config.n_identities} asked"
        )
    base = list(pretrain[: config.n_identities])
    by_signature = {identity.signature: identity for identity in pretrain}
    twins = []
    for identity in base:
        candidate = world.twin(identity, rng)
        # A twin must never look like a dev or held-out identity; one that looks like a pretraining
        # identity is that identity (its marks drawn where that identity has them).
        while world.is_protected(candidate):
            candidate = world.twin(identity, rng)
        twins.append(by_signature.get(candidate.signature, candidate))
    identities = base + twins
    images, owner, clean = [], [], []
    for index, identity in enumerate(identities):
        count = config.photos_per_identity if index < len(base) else config.photos_per_twin
        for k in range(count):
            n_distractors = 0 if k == 0 else int(rng.integers(0, 3))
            images.append(world.render(identity, rng, distractors=n_distractors))
            owner.append(index)
            clean.append(n_distractors == 0)
    pairs, pair_images = [], []
    for index, identity in enumerate(base):
        for k in range(config.pair_scenes_per_identity):
            with_twin = k % 2 == 0
            if with_twin:
                other = identities[len(base) + index]
            else:
                other = world.random_identity(rng, exclude=[identity])
                while other.shape == identity.shape:  # "what shape is the other one?" needs two shapes
                    other = world.random_identity(rng, exclude=[identity])
            layout = "horizontal" if rng.integers(2) == 0 else "vertical"
            image, (where, other_where) = world.render_pair_scene(identity, other, rng, layout)
            pairs.append(PairScene(index, other, with_twin, where, other_where))
            pair_images.append(image)
    ids = _encode(backend, images, "tokenize photos", progress)
    pair_ids = _encode(backend, pair_images, "tokenize pair scenes", progress) if pair_images else None
    canonical_ids = None
    if config.mix[_REDRAW] > 0:
        views = [world.canonical_view(identity) for identity in base]
        canonical_ids = _encode(backend, views, "tokenize canonical views", progress)
    drawing_ids = None
    if drawings:
        drawing_ids = _encode(
            backend, [world.drawing(identity) for identity in base], "tokenize drawings", progress
        )
    return ImageBank(
        identities,
        ids,
        np.asarray(owner),
        len(base),
        np.asarray(clean),
        pair_ids,
        pairs,
        canonical_ids,
        drawing_ids,
    )


def _encode(backend, images: list, desc: str, progress: bool) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(images), 512), desc=desc, disable=not progress):
        chunks.append(backend.encode_images(images[start : start + 512]))
    return torch.cat(chunks)


def generation_prompt(description: str, variant: int = 0) -> str:
    """The text-to-image request for ``description`` (variant 0 is ``"A photo of ..."``)."""
    return _GENERATION_TEMPLATES[variant % len(_GENERATION_TEMPLATES)].format(description)


def same_object_question() -> str:
    """The two-photo question asked in pretraining."""
    return SAME_OBJECT_QUESTION


def conversation(backend, human: list[int], bot: list[int]) -> tuple[list[int], list[int]]:
    """``<s> human <eot> bot <eot>`` ids and labels (loss on the bot span and its closing ``<eot>``)."""
    eot = backend.special.eot
    prefix = [backend.special.bos, *human, eot]
    ids = prefix + bot + [eot]
    labels = [-100] * len(prefix) + bot + [eot]
    return ids, labels


def choice_question(question: str, factor: str, value: str, rng: np.random.Generator) -> str:
    """``question`` in the benchmark's multiple-choice form: the right value and 1-3 others, shuffled.

    Option texts are the answer words (``"circle"``, ``"striped"``), which the open answer contains.
    """
    n_wrong = int(rng.integers(1, min(3, len(factor_values(factor)) - 1) + 1))
    values, _ = draw_options(factor, value, n_wrong, rng)
    return mc_prompt({"question": question, "options": [factor_word(factor, v) for v in values]})


# Existence questions change the marks in this share of "no" descriptions, and one other factor in the rest
# (two factors in TWO_FACTOR_SHARE of them): the marks are what tells a concept from its twins.
MARKS_CHANGED_SHARE = 0.4
TWO_FACTOR_SHARE = 0.25
# Share of existence descriptions that leave the marks out (plain captions describe twins too: "yes").
PLAIN_DESCRIPTION_SHARE = 0.25


def changed_description(identity: Identity, factors: tuple[str, ...], rng: np.random.Generator) -> str:
    """``identity``'s full caption with each of ``factors`` (from :data:`QA_FACTORS`) set to another value."""
    values = {factor: factor_value(identity, factor) for factor in QA_FACTORS}
    for factor in factors:
        others = [v for v in factor_values(factor) if v != values[factor]]
        values[factor] = others[int(rng.integers(len(others)))]
    pattern = factor_word("pattern", values["pattern"])
    return f"a {values['size']} {values['colour']} {pattern} {values['shape']} with {values['marks']}"


def existence_description(
    identity: Identity, rng: np.random.Generator, marks_share: float = MARKS_CHANGED_SHARE
) -> tuple[str, str, str | None]:
    """A described object for a "yes" and one for a "no" question about a photo of ``identity``.

    Returns:
        ``(present, absent, changed)``: the description of the photo's object (its full caption, or
        its plain caption a quarter of the time), one that differs from it (the marks changed with
        probability :data:`MARKS_CHANGED_SHARE`, else another factor, plus a second factor in
        :data:`TWO_FACTOR_SHARE` of cases) and the first changed factor.
    """
    present = caption(identity) if rng.random() < PLAIN_DESCRIPTION_SHARE else full_caption(identity)
    if rng.random() < marks_share:
        factors: tuple[str, ...] = ("marks",)
    else:
        others = [f for f in QA_FACTORS if f != "marks"]
        factors = (others[int(rng.integers(len(others)))],)
    if rng.random() < TWO_FACTOR_SHARE:
        rest = [f for f in QA_FACTORS if f not in factors]
        factors = (*factors, rest[int(rng.integers(len(rest)))])
    absent = changed_description(identity, factors, rng)
    if "marks" not in factors and rng.random() < PLAIN_DESCRIPTION_SHARE:
        absent = absent.split(" with ")[0]
    return present, absent, factors[0]


def existence_question(description: str, shown: bool, rng: np.random.Generator) -> tuple[str, str]:
    """A recognition question and its answer with ``description`` in place of ``<sks>``."""
    k = int(rng.integers(len(RECOGNITION_QUESTIONS)))
    return (
        RECOGNITION_QUESTIONS[k].replace("<sks>", description),
        recognition_answer(k, shown).replace("<sks>", description),
    )


def existence_turns(
    identity: Identity, rng: np.random.Generator, marks_share: float = MARKS_CHANGED_SHARE
) -> list[tuple[str, str]]:
    """A "yes" and a "no" recognition question about a photo of ``identity`` (:func:`existence_description`)."""
    present, absent, _ = existence_description(identity, rng, marks_share)
    return [existence_question(present, True, rng), existence_question(absent, False, rng)]


def factor_check(identity: Identity, rng: np.random.Generator, shown: bool) -> tuple[str, str]:
    """A yes/no question about one attribute of ``identity`` (mark colours included) and its short answer.

    With ``shown`` the question names the object's own value ("Is the object red?" -> "Yes."), else
    another value of the same attribute ("No.").
    """
    factor = QA_FACTORS[int(rng.integers(len(QA_FACTORS)))]
    if factor == "marks":
        have = set(identity.mark_colours)
        pool = [c for c in MARK_COLOURS if (c in have) == shown]
        return _MARK_CHECK.format(pool[int(rng.integers(len(pool)))]), "Yes." if shown else "No."
    value = factor_value(identity, factor)
    if not shown:
        others = [v for v in factor_values(factor) if v != value]
        value = others[int(rng.integers(len(others)))]
    return _FACTOR_CHECKS[factor].format(factor_word(factor, value)), "Yes." if shown else "No."


def yes_no_turns(
    identity: Identity,
    stranger: Identity,
    rng: np.random.Generator,
    marks_share: float = MARKS_CHANGED_SHARE,
) -> list[tuple[str, str]]:
    """Grounded yes/no questions about a photo of ``identity``, answered with a bare "Yes." or "No.".

    Three descriptions (its own, one with a factor changed as in :func:`existence_description`, and
    ``stranger``'s, which differs in most factors) and four one-attribute checks, two of each answer.
    Why: inside a long conversation the answer's first token is one of some eighty supervised tokens,
    and a base pretrained that way answered at chance; here it is every other token, and the stranger
    and the one-attribute checks give the comparison a signal before it can tell near misses apart.
    """
    present, absent, _ = existence_description(identity, rng, marks_share)
    turns = [
        existence_question(present, True, rng),
        existence_question(absent, False, rng),
        existence_question(full_caption(stranger), stranger.signature == identity.signature, rng),
    ]
    turns = [(question, answer.split(",")[0] + ".") for question, answer in turns]
    turns += [factor_check(identity, rng, shown) for shown in (True, False, True, False)]
    return turns


def _multi_turn(
    backend,
    image: list[int],
    turns: list[tuple[str, str]],
    rng: np.random.Generator,
    independent: bool = False,
):
    """One image, then ``turns`` in a random order (each one comes first as often as the others).

    With ``independent`` the row is ``(ids, labels, segments)``: each turn is its own segment and sees
    the image but not the other turns (:func:`pad_batch` builds the mask and positions), so every turn
    is trained exactly in the single-question form the gates ask. Why: in one running conversation a
    "yes"/"no" could be read off the answers before it (a described colour that was already named),
    and a base trained that way answered the first, unaided question at chance.
    """
    order = rng.permutation(len(turns))
    if independent:
        eot = backend.special.eot
        ids = [backend.special.bos, *image]
        labels = [-100] * len(ids)
        segments = [0] * len(ids)
        for segment, k in enumerate(order, start=1):
            question = [*backend.tokenize(" " + turns[k][0]), eot]
            answer = [*backend.tokenize(turns[k][1]), eot]
            ids += question + answer
            labels += [-100] * len(question) + answer
            segments += [segment] * (len(question) + len(answer))
        return ids, labels, segments
    first_question, first_answer = turns[order[0]]
    ids, labels = conversation(
        backend, image + backend.tokenize(" " + first_question), backend.tokenize(first_answer)
    )
    eot = backend.special.eot
    for k in order[1:]:
        question, answer = (backend.tokenize(text) for text in turns[k])
        ids += [*question, eot, *answer, eot]
        labels += [-100] * (len(question) + 1) + [*answer, eot]
    return ids, labels


_NAME_LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
_CONCEPT_FACTORS = ("shape", "colour", "pattern", "size")  # the order of world.concept_qa's rows
# Chat-format photo rows: the share that are recognition questions (the rest ask about one attribute),
# and the share of their "no" rows whose photo shows another object (the benchmark's random scenes), so
# a description is also rejected where nothing in the photo fits it. Half the rows are "yes".
RECOGNITION_SHARE = 0.7
STRANGER_SHARE = 0.5


def made_up_name(rng: np.random.Generator) -> str:
    """A 2-5 letter lowercase name that means nothing, e.g. ``"qvo"`` (``"sks"`` now and then)."""
    return "".join(rng.choice(_NAME_LETTERS, size=int(rng.integers(2, 6))))


def chat_sample(
    backend,
    bank: ImageBank,
    rng: np.random.Generator,
    config: ChatRefineConfig,
    marks_share: float = MARKS_CHANGED_SHARE,
) -> tuple[list[int], list[int]]:
    """One row in the framework's conversation format (:func:`yochameleon.conversation.turn_ids`).

    With probability ``config.named_share`` the object gets a made-up name, defined in the preamble
    (``"qvo is a large red striped circle."``) and used in the question; otherwise the question names
    it by its description, as the base was pretrained. The row is a recognition question (half
    "yes", the description of the photo's object; half "no", a changed description as
    :func:`existence_description` or the object's own one about a photo of another object), a question about one attribute of the photo's object, or,
    for ``config.text_share`` of the named rows, an attribute question without a photo that the
    definition answers (multiple choice half of the time, as the benchmark's text QA asks).

    Returns:
        ``(ids, labels)`` with the loss on the answer and its closing ``<eot>``.
    """
    from yochameleon.conversation import turn_ids

    index = int(rng.integers(bank.n_base))
    identity = bank.identities[index]
    name = made_up_name(rng) if rng.random() < config.named_share else None
    preamble, images = "", []
    if name is not None and rng.random() < config.text_share:
        described = caption(identity) if rng.random() < 0.5 else full_caption(identity)
        preamble = f"{name} is {described}."
        k = int(rng.integers(len(_CONCEPT_FACTORS)))
        row = concept_qa(identity)[k]
        question = row["question"]
        if rng.random() < 0.5:
            factor = _CONCEPT_FACTORS[k]
            question = choice_question(question, factor, factor_value(identity, factor), rng)
        question, answer = question.replace("<sks>", name), row["answer"].replace("<sks>", name)
    else:
        photo_of = index
        if rng.random() < RECOGNITION_SHARE:
            present, absent, _ = existence_description(identity, rng, marks_share)
            shown = bool(rng.random() < 0.5)
            described = present if shown else absent
            if not shown and rng.random() < STRANGER_SHARE:
                described = present
                photo_of = int(rng.integers(bank.n_base))
                other = bank.identities[photo_of]
                shown = described in (caption(other), full_caption(other))
            question, answer = existence_question(name or described, shown, rng)
            if name is not None:
                preamble = f"{name} is {described}."
        else:  # one attribute of the photo's object
            qa = attribute_qa(identity, rng)[int(rng.integers(len(QA_FACTORS)))]
            question, answer = qa.question, qa.answer
            if name is not None:
                preamble = f"{name} is {caption(identity)}."
                question = question.replace("the object", name)
        images = [bank.image_ids[int(rng.choice(bank.photos_of(photo_of)))].tolist()]
    human = turn_ids(backend, question, [], images, preamble=preamble)
    bot = [*backend.tokenize(answer), backend.special.eot]
    return human + bot, [-100] * len(human) + bot


def named_drawing_sample(backend, bank: ImageBank, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """A request in the framework's format for the drawing of an object a preamble names.

    ``"qvo is a large red striped circle with a cyan mark. A photo of qvo."`` -> the identity's
    drawing. Why: this is the personalized generation prompt's shape (``"<sks> is <g-tokens>. A photo
    of <sks>."``), and a base taught to draw only from a caption in the request drew every factor of
    a defined name right in 0.11 of its images (development identities; 0.84 from the caption).

    Returns:
        ``(ids, labels)`` with the loss on the image span and its closing ``<eot>``.
    """
    from yochameleon.conversation import turn_ids

    index = int(rng.integers(bank.n_base))
    name = made_up_name(rng)
    preamble = f"{name} is {full_caption(bank.identities[index])}."
    human = turn_ids(backend, generation_prompt(name), [], [], preamble=preamble)
    bot = [*backend.image_span(bank.drawing_ids[index].tolist()), backend.special.eot]
    return human + bot, [-100] * len(human) + bot


def _pair_sample(backend, bank: ImageBank, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """A two-object scene and one question about it (the benchmark's visual-question kinds)."""
    row = int(rng.integers(len(bank.pairs)))
    scene = bank.pairs[row]
    identity = bank.identities[scene.index]
    image = backend.image_span(bank.pair_ids[row].tolist())
    right, wrong = f"on the {scene.where}", f"on the {scene.other_where}"
    if scene.with_twin or rng.random() < 0.25:
        # The twin has the same description, so only a photo of the object can say which one is meant:
        # like "same object?", this rewards features that carry the marks.
        reference = backend.image_span(bank.image_ids[int(rng.choice(bank.photos_of(scene.index)))].tolist())
        question = mc_prompt(
            {"question": REFERENCE_LOCATION_QUESTION, "options": two_options(right, wrong, rng)}
        )
        human = reference + image + backend.tokenize(" " + question)
        return conversation(backend, human, backend.tokenize(f"It is {right}."))
    description = caption(identity).removeprefix("a ")
    if rng.random() < 0.5:
        question = f"Where is the {description} in this photo?"
        answer = f"It is {right}."
        options = two_options(right, wrong, rng)
    else:
        question = f"What shape is the other object next to the {description}?"
        answer = f"It is a {scene.other.shape}."
        options = two_options(f"a {scene.other.shape}", f"a {identity.shape}", rng)
    human = image + backend.tokenize(" " + mc_prompt({"question": question, "options": options}))
    return conversation(backend, human, backend.tokenize(answer))


def _sample_sequence(
    backend,
    bank: ImageBank,
    rng: np.random.Generator,
    mix,
    qa_turns: bool = False,
    choice_share: float = 0.0,
    existence: bool = False,
    marks_share: float = MARKS_CHANGED_SHARE,
    independent_turns: bool = False,
) -> tuple[list[int], ...]:
    task = int(rng.choice(len(_TASKS), p=mix))
    if task == _PAIR_SCENE:
        return _pair_sample(backend, bank, rng)
    index = int(rng.integers(bank.n_base))
    identity = bank.identities[index]
    photos = bank.photos_of(index)
    span = lambda row: backend.image_span(bank.image_ids[row].tolist())  # noqa: E731
    if task == _CAPTION:
        human = span(int(rng.choice(photos))) + backend.tokenize(" " + DESCRIBE_QUESTION)
        return conversation(backend, human, backend.tokenize(full_caption(identity).capitalize() + "."))
    if task == _ATTRIBUTE_QA:
        image = span(int(rng.choice(photos)))
        pairs = attribute_qa(identity, rng)
        asked = [
            choice_question(qa.question, qa.factor, factor_value(identity, qa.factor), rng)
            if rng.random() < choice_share
            else qa.question
            for qa in pairs
        ]
        if not qa_turns:
            k = int(rng.integers(len(pairs)))
            return conversation(
                backend, image + backend.tokenize(" " + asked[k]), backend.tokenize(pairs[k].answer)
            )
        # Every question about one photo, in a random order (each one comes first as often as the
        # others, which is the single-question form the gates ask): one image pass, five answers.
        turns = [(question, qa.answer) for question, qa in zip(asked, pairs)]
        turns.append((DESCRIBE_QUESTION, full_caption(identity).capitalize() + "."))
        if existence:
            turns += existence_turns(identity, rng, marks_share)
        return _multi_turn(backend, image, turns, rng, independent_turns)
    if task == _YES_NO:
        stranger = bank.identities[int(rng.integers(bank.n_base))]
        turns = yes_no_turns(identity, stranger, rng, marks_share)
        return _multi_turn(backend, span(int(rng.choice(photos))), turns, rng, independent_turns)
    if task == _REDRAW:
        human = span(int(rng.choice(photos))) + backend.tokenize(" " + REDRAW_REQUEST)
        return conversation(backend, human, backend.image_span(bank.canonical_ids[index].tolist()))
    if task == _TEXT_TO_IMAGE:
        human = backend.tokenize(generation_prompt(full_caption(identity), int(rng.integers(3))))
        if bank.drawing_ids is not None:
            return conversation(backend, human, backend.image_span(bank.drawing_ids[index].tolist()))
        clean = photos[bank.clean[photos]]
        target = int(rng.choice(clean if len(clean) else photos))
        return conversation(backend, human, span(target))
    first, second = (int(x) for x in rng.choice(photos, size=2, replace=False))
    roll = rng.random()
    if roll < 0.5:
        same = True
    elif roll < 0.85:
        same, second = False, int(rng.choice(bank.photos_of(bank.n_base + index)))
    else:
        other = (index + 1 + int(rng.integers(bank.n_base - 1))) % bank.n_base if bank.n_base > 1 else index
        same = other == index
        second = int(rng.choice(bank.photos_of(other)))
    human = span(first) + span(second) + backend.tokenize(" " + SAME_OBJECT_QUESTION)
    answer = "Yes, it is the same object." if same else "No, it is a different object."
    return conversation(backend, human, backend.tokenize(answer))


def pad_batch(rows: list[tuple[list[int], ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(ids, labels)`` rows; causal attention makes a mask unnecessary for the labelled part."""
    width = max(len(row[0]) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row_ids, row_labels, *_) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    return ids, labels


def segment_attention(rows: list[tuple[list[int], ...]], width: int, additive: bool):
    """The attention mask ``[B, 1, T, T]`` and position ids ``[B, T]`` of rows with independent turns.

    A row ``(ids, labels, segments)`` (from :func:`_multi_turn`) has segment 0 for the shared prefix and
    ``k >= 1`` for its k-th turn; a token attends causally to the prefix and to its own turn, and each
    turn's positions continue from the prefix, as if it were asked alone. Rows without segments are one
    prefix (plain causal attention). Returns ``None`` when no row has segments.

    Args:
        additive: a float mask (0 or a large negative) for eager attention, else a boolean one.
    """
    if not any(len(row) > 2 for row in rows):
        return None
    segments = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
    positions = torch.arange(width).repeat(len(rows), 1)
    for i, row in enumerate(rows):
        seg = torch.tensor(row[2] if len(row) > 2 else [0] * len(row[0]))
        segments[i, : len(seg)] = seg
        prefix = int((seg == 0).sum())
        for k in seg.unique().tolist():
            if k > 0:
                where = (seg == k).nonzero()[:, 0]
                positions[i, where] = prefix + torch.arange(len(where))
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = ((query == key) | (key == 0)) & torch.ones(width, width, dtype=torch.bool).tril()
    allowed = allowed[:, None]
    if additive:
        return torch.zeros(allowed.shape).masked_fill_(~allowed, -1e9), positions
    return allowed, positions


def lm_loss(
    backend, ids: torch.Tensor, labels: torch.Tensor, per_sequence: bool = False, attention=None
) -> torch.Tensor:
    """Next-token cross-entropy on labelled positions, computing logits only where they are needed.

    Args:
        per_sequence: average within each sequence first, then over the batch. Why: a text-to-image
            target has 64 labelled tokens and an answer three, so a token mean lets image generation
            drown out the understanding tasks.
        attention: ``(mask, position_ids)`` from :func:`segment_attention`, or ``None`` (causal).
    """
    if not per_sequence:
        mask, positions = attention if attention is not None else (None, None)
        hidden, _ = backend.hidden_states(ids, attention_mask=mask, position_ids=positions)
        targets = labels[:, 1:]
        keep = targets != -100
        return F.cross_entropy(backend.logits(hidden[:, :-1][keep]), targets[keep])
    total, rows = _per_sequence_loss_sum(backend, ids, labels, attention)
    return total / max(rows, 1)


def _per_sequence_loss_sum(
    backend, ids: torch.Tensor, labels: torch.Tensor, attention=None
) -> tuple[torch.Tensor, int]:
    """Sum over sequences of each one's mean token loss, and how many sequences had labels.

    ``attention``: ``(mask, position_ids)`` from :func:`segment_attention`, or ``None`` (causal).
    """
    mask, positions = attention if attention is not None else (None, None)
    hidden, _ = backend.hidden_states(ids, attention_mask=mask, position_ids=positions)
    targets = labels[:, 1:]
    keep = targets != -100
    token_loss = F.cross_entropy(backend.logits(hidden[:, :-1][keep]), targets[keep], reduction="none")
    row = keep.nonzero()[:, 0]
    per_row = torch.zeros(len(ids)).index_add_(0, row, token_loss) / keep.sum(1).clamp(min=1)
    return per_row.sum(), int(keep.any(1).sum())


@torch.no_grad()
def init_image_rows_from_codebook(backend, seed: int = 0) -> int:
    """Start the image-token rows of the input embedding and output head from the VQ codebook.

    Why: a transformer trained from scratch must otherwise discover which of 512 codes look alike; a
    random projection of the codebook gives similar-looking codes similar rows from step one.

    Returns:
        How many rows were set.
    """
    model = backend.model
    codebook = model.model.vqmodel.quantize.embedding.weight.float()
    codebook = (codebook - codebook.mean(0)) / codebook.std(0).clamp_min(1e-6)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    projection = (
        torch.randn(codebook.shape[1], embed.shape[1], generator=generator) / codebook.shape[1] ** 0.5
    )
    rows = codebook @ projection
    rows = rows / rows.std()  # keep each matrix's own initial scale exactly
    bpe2img = model.model.vocabulary_mapping.bpe2img
    ids = torch.tensor(sorted(bpe2img))
    codes = torch.tensor([bpe2img[int(i)] for i in ids])
    for weight in (embed, head):
        scale = weight[ids].std()
        weight[ids] = (rows[codes] * scale).to(weight.dtype)
    return len(ids)


def pretrain_lm(
    backend,
    bank: ImageBank,
    config: LMTrainConfig,
    progress: bool = True,
    marks_share: float = MARKS_CHANGED_SHARE,
    independent_turns: bool = False,
    chat: ChatRefineConfig | None = None,
    resume_dir: str | Path | None = None,
    checkpoint_every: int = 500,
    named_drawing_share: float = 0.0,
) -> dict:
    """Pretrain the backend's transformer in place (the VQ stays frozen).

    ``marks_share`` is the share of existence "no" descriptions that change the marks
    (:func:`existence_description`); with ``independent_turns`` the questions about one photo do not
    see each other's answers (:func:`_multi_turn`); with ``chat``, ``chat.chat_share`` of the rows
    are in the framework's conversation format (:func:`chat_sample`), and ``named_drawing_share`` of
    those ask for the drawing of an object named in a preamble (:func:`named_drawing_sample`).

    With ``resume_dir``, every ``checkpoint_every`` steps the weights, AdamW moments, schedule, loss
    window and both random generators are written there atomically
    (:func:`yochameleon.train.checkpoint.save_checkpoint`), and a later call with the same settings
    and the same bank continues from the last one, to the same weights an uninterrupted run reaches
    (with one thread). Why: a base stage is hours on a CPU and a session can end inside it.

    Returns:
        Training facts: final loss (mean of the last 50 steps), steps and seconds (over every session).

    Raises:
        PretrainError: the bank lacks a task's data, or ``resume_dir`` holds a checkpoint of other
            settings.
    """
    # Checked first, so that a bank without a task's data fails before any weight changes.
    if config.mix[_PAIR_SCENE] > 0 and not bank.pairs:
        raise PretrainError("the mix asks for pair scenes but the image bank has none")
    if config.mix[_REDRAW] > 0 and (bank.canonical_ids is None or len(bank.canonical_ids) < bank.n_base):
        raise PretrainError("the mix asks for redraws but the image bank has no canonical views")
    if named_drawing_share > 0 and bank.drawing_ids is None:
        raise PretrainError(
            "named drawings need an image bank with drawings (build_image_bank(drawings=True))"
        )
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 0x1A1A])
    model = backend.model
    if config.codebook_init:
        init_image_rows_from_codebook(backend, config.seed)
    params = [p for name, p in model.named_parameters() if ".vqmodel." not in f".{name}"]
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, min(150, config.steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.steps, warmup))
    named = {name: p for name, p in model.named_parameters() if ".vqmodel." not in f".{name}"}
    fingerprint = _pretrain_fingerprint(
        config, marks_share, independent_turns, chat, len(bank.image_ids), named_drawing_share
    )
    first_step, recent, seconds_before = 0, [], 0.0
    if resume_dir is not None:
        if checkpoint_every < 1:
            raise PretrainError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        resumed = _load_pretrain_state(resume_dir, fingerprint, named, optimizer, scheduler, rng)
        if resumed is not None:
            first_step, recent, seconds_before = resumed
    model.train()
    attention = model.config._attn_implementation
    if config.bf16:
        # CPU flash attention's bf16 backward is slower than eager attention on these short sequences.
        model.set_attn_implementation("eager")
    if config.compile:
        # In place, so parameter names (and the saved checkpoint) stay those of the eager module.
        model.model.compile(dynamic=True)
    start = time.perf_counter()
    bar = tqdm(
        range(first_step, config.steps),
        desc="pretrain",
        disable=not progress,
        initial=first_step,
        total=config.steps,
    )
    for step in bar:
        rows = [
            (
                named_drawing_sample(backend, bank, rng)
                if named_drawing_share > 0 and rng.random() < named_drawing_share
                else chat_sample(backend, bank, rng, chat, marks_share)
            )
            if chat is not None and rng.random() < chat.chat_share
            else _sample_sequence(
                backend,
                bank,
                rng,
                config.mix,
                config.all_questions,
                config.choice_share,
                config.existence_questions,
                marks_share,
                independent_turns,
            )
            for _ in range(config.batch_size)
        ]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = _pretrain_backward(backend, rows, config.per_sequence_loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss])[-50:]
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(recent):.3f}")
        done = step + 1
        if resume_dir is not None and done < config.steps and done % checkpoint_every == 0:
            seconds = seconds_before + time.perf_counter() - start
            _save_pretrain_state(
                resume_dir, done, fingerprint, named, optimizer, scheduler, rng, recent, seconds
            )
    if config.compile:
        model.model._compiled_call_impl = None  # back to eager for evaluation and saving
    model.set_attn_implementation(attention)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return {
        "final_loss": round(float(np.mean(recent)), 4),
        "steps": config.steps,
        "train_seconds": round(seconds_before + time.perf_counter() - start, 1),
        "resumed_at": first_step,
    }


def _pretrain_fingerprint(
    config, marks_share, independent_turns, chat, n_photos: int, named_drawing_share: float = 0.0
) -> str:
    """What a pretraining checkpoint must match to be continued (``compile`` changes no result)."""
    settings = {
        "lm": {k: v for k, v in asdict(config).items() if k != "compile"},
        "marks_share": marks_share,
        "independent_turns": independent_turns,
        "chat": None if chat is None else asdict(chat),
        "photos": n_photos,
    }
    if named_drawing_share:  # absent when off, so older checkpoints keep their fingerprint
        settings["named_drawing_share"] = named_drawing_share
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _save_pretrain_state(
    folder, step, fingerprint, named, optimizer, scheduler, rng, recent, seconds
) -> None:
    from yochameleon.train.checkpoint import save_checkpoint

    index = {id(p): name for name, p in named.items()}
    order = [index[id(p)] for group in optimizer.param_groups for p in group["params"]]
    tensors = {f"param/{name}": p.detach() for name, p in named.items()}
    optim = optimizer.state_dict()
    for i, state in optim["state"].items():
        for key, value in state.items():
            tensors[f"adam/{order[i]}/{key}"] = value.reshape(-1) if value.dim() == 0 else value
    tensors["torch_rng"] = torch.get_rng_state()
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optim["param_groups"]]
    state = {
        "fingerprint": fingerprint,
        "param_groups": groups,
        "scheduler": scheduler.state_dict(),
        "numpy_rng": rng.bit_generator.state,
        "recent": recent,
        "seconds": seconds,
    }
    save_checkpoint(folder, step, tensors, state, keep=1)


def _load_pretrain_state(folder, fingerprint, named, optimizer, scheduler, rng):
    """Restore the last checkpoint in ``folder``; ``None`` when there is none."""
    from yochameleon.train.checkpoint import load_checkpoint

    loaded = load_checkpoint(folder)
    if loaded is None:
        return None
    tensors, state = loaded
    if state.get("fingerprint") != fingerprint:
        raise PretrainError(
            f"{folder} holds a pretraining checkpoint of other settings; delete it to start over"
        )
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(tensors[f"param/{name}"])
    index = {id(p): name for name, p in named.items()}
    optim_state = {}
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(flat):
        name = index[id(p)]
        keys = [k.rsplit("/", 1)[1] for k in tensors if k.startswith(f"adam/{name}/")]
        if keys:
            optim_state[i] = {
                k: tensors[f"adam/{name}/{k}"].reshape(()) if k == "step" else tensors[f"adam/{name}/{k}"]
                for k in keys
            }
    groups, start = [], 0
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        groups.append({**saved, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["torch_rng"])
    rng.bit_generator.state = state["numpy_rng"]
    return int(state["step"]), list(state["recent"]), float(state["seconds"])


def _pretrain_backward(backend, rows: list[tuple[list[int], list[int]]], per_sequence: bool) -> float:
    """Backward of one batch's loss; returns the loss value."""
    additive = backend.model.config._attn_implementation == "eager"
    if not per_sequence:
        ids, labels = pad_batch(rows, backend.special.pad)
        loss = lm_loss(backend, ids, labels, attention=segment_attention(rows, ids.shape[1], additive))
        loss.backward()
        return loss.item()
    # Two length-sorted halves: two-photo questions are twice as long as the rest, and padding every
    # row to them would double the step.
    rows = sorted(rows, key=lambda r: len(r[0]))
    half = len(rows) // 2
    loss_value = 0.0
    for part in (rows[:half], rows[half:]):
        if part:
            ids, labels = pad_batch(part, backend.special.pad)
            attention = segment_attention(part, ids.shape[1], additive)
            total, _ = _per_sequence_loss_sum(backend, ids, labels, attention)
            (total / len(rows)).backward()
            loss_value += total.item() / len(rows)
    return loss_value


# --------------------------------------------------------------------------------------------------------
# Stage 3: the embedder
# --------------------------------------------------------------------------------------------------------
EMBEDDER_NAME = "toyworld-vit"


@dataclass(frozen=True)
class EmbedderTrainConfig:
    """OpenCLIP-architecture ViT and its contrastive training.

    Attributes:
        embed_dim, width, layers, patch_size: the vision tower (``image_size`` is the world's).
        text_width, text_layers, context_length: the text tower (a narrow one: its token table has
            open_clip's 49,408 rows).
        steps, batch_size, lr: AdamW steps; a batch holds ``batch_size`` identities, two photos each.
        seed: seeds weights and scenes.
    """

    embed_dim: int = 64
    width: int = 128
    layers: int = 4
    patch_size: int = 4
    text_width: int = 32
    text_layers: int = 2
    context_length: int = 16
    steps: int = 600
    batch_size: int = 96
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr", "width", "layers", "embed_dim", "text_width"):
            _positive(name, getattr(self, name))


def embedder_model_config(config: EmbedderTrainConfig, image_size: int) -> dict:
    """open_clip's ``embed_dim`` / ``vision_cfg`` / ``text_cfg`` description of the embedder."""
    if image_size % config.patch_size:
        raise PretrainError(f"image size {image_size} is not divisible by patch size {config.patch_size}")
    return {
        "embed_dim": config.embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": config.patch_size,
            "width": config.width,
            "layers": config.layers,
            "head_width": 32,
        },
        "text_cfg": {
            "context_length": config.context_length,
            "vocab_size": 49408,
            "width": config.text_width,
            "heads": max(1, config.text_width // 16),
            "layers": config.text_layers,
        },
    }


def train_embedder(world: ToyWorld, config: EmbedderTrainConfig, out_dir: str | Path, progress: bool = True):
    """Train the embedder contrastively and write ``toyworld-vit.json`` + ``toyworld-vit.safetensors``.

    The loss pairs each photo with its caption (photos with the same caption all count as positives)
    and the two photos of one identity with each other, so embeddings carry the marks as well.

    Returns:
        ``(config_path, weights_path, stats)``.
    """
    import open_clip
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{EMBEDDER_NAME}.json"
    config_path.write_text(
        json.dumps(embedder_model_config(config, world.config.image_size), indent=2) + "\n"
    )
    open_clip.add_model_config(config_path)
    torch.manual_seed(config.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(EMBEDDER_NAME, load_weights=False)
    tokenizer = open_clip.get_tokenizer(EMBEDDER_NAME)
    normalize = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    mean = torch.tensor(normalize.mean).view(1, 3, 1, 1)
    std = torch.tensor(normalize.std).view(1, 3, 1, 1)
    rng = np.random.default_rng([config.seed, 0xC11F])
    pretrain = world.splits["pretrain"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    warmup = max(1, min(60, config.steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.steps, warmup))
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="embedder", disable=not progress)
    for step in bar:
        identities = [
            pretrain[int(rng.integers(len(pretrain)))] if rng.random() < 0.7 else world.random_identity(rng)
            for _ in range(config.batch_size)
        ]
        photos = [
            np.asarray(world.render(ident, rng, distractors=int(rng.integers(0, 3))), dtype=np.uint8)
            for ident in identities
            for _ in range(2)
        ]
        pixels = (torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        captions = [caption(ident) for ident in identities]
        image_emb = F.normalize(model.encode_image(pixels), dim=-1)
        text_emb = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        first, second = image_emb[0::2], image_emb[1::2]
        same_caption = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same_caption / same_caption.sum(1, keepdim=True)
        logits_it = scale * first @ text_emb.T
        clip_loss = 0.5 * (
            -(targets * logits_it.log_softmax(1)).sum(1).mean()
            - (targets * logits_it.T.log_softmax(1)).sum(1).mean()
        )
        same_identity = torch.tensor([[a == b for b in identities] for a in identities], dtype=torch.float32)
        id_targets = same_identity / same_identity.sum(1, keepdim=True)
        logits_ii = scale * first @ second.T
        image_loss = 0.5 * (
            -(id_targets * logits_ii.log_softmax(1)).sum(1).mean()
            - (id_targets * logits_ii.T.log_softmax(1)).sum(1).mean()
        )
        loss = clip_loss + image_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 20 == 0:
            bar.set_postfix(clip=f"{clip_loss.item():.3f}", img=f"{image_loss.item():.3f}")
    model.eval()
    weights_path = out / f"{EMBEDDER_NAME}.safetensors"
    state = {k: v.detach().to(torch.float16).contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path))
    stats = {
        "final_clip_loss": round(float(clip_loss.item()), 4),
        "final_image_loss": round(float(image_loss.item()), 4),
        "train_seconds": round(time.perf_counter() - start, 1),
        "config": asdict(config),
    }
    return config_path, weights_path, stats
