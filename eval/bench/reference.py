"""A straightforward personalization trainer, the way the original Yo'Chameleon code works.

It is the baseline the fast path is measured against, so it deliberately keeps every cost the fast
path removes:

* images are VQ-encoded from pixels on every step (no token cache);
* every sample is right-padded to one fixed maximum length, the original's ``tokenizer_max_length``
  (positions still count from 0, padding is masked, so the loss is the same as on an unpadded
  batch);
* logits are computed over the whole vocabulary at every position;
* the whole embedding and output matrices are trainable: a full copy of each is spliced into the
  model, AdamW keeps state for all of it, and after every step the rows of non-concept ids are
  restored from the frozen originals.

On the same batch it gives the same loss as the fast path (``tests/test_bench_reference.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from yochameleon.backends.base import Backend
from yochameleon.concept import ConceptSpec, ConceptTokens, allocate_ids
from yochameleon.errors import YoChameleonError
from yochameleon.train.loss import LOGITS_SCOPE
from yochameleon.train.sequences import IGNORE, Batch, Sequence, build_sequence, collate

if TYPE_CHECKING:
    from PIL import Image


class BenchError(YoChameleonError):
    """A benchmark cannot run with the given model, options or workload."""


# The original pads every sample to ``tokenizer_max_length``: 1,500 tokens in its configs, for
# Anole's 1,024-token images (its dataset calls the processor with ``padding="max_length"``).
ORIGINAL_MAX_LENGTH = 1500
ORIGINAL_IMAGE_TOKENS = 1024


def original_pad_length(image_seq_len: int, longest: int) -> int:
    """The length the original would pad to: 1,500 tokens scaled to the image size, at least ``longest``.

    Args:
        image_seq_len: VQ tokens per image of the model.
        longest: the longest sample that has to fit.
    """
    return max(longest, round(ORIGINAL_MAX_LENGTH * image_seq_len / ORIGINAL_IMAGE_TOKENS))


@dataclass
class ReferenceOptions:
    """Settings of the reference trainer.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (applied to the whole matrices, as the original does;
            non-concept rows are restored afterwards anyway).
        pad_to: every batch is padded to this length; ``None``: :func:`original_pad_length`.
        self_prompting: prefix targets with the task's token set (as the fast path does).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    pad_to: int | None = None
    self_prompting: bool = True

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise BenchError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise BenchError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.pad_to is not None and self.pad_to < 2:
            raise BenchError(f"pad_to must be at least 2, got {self.pad_to}")


class FullMatrixConcept:
    """Trainable full copies of the embedding and output matrices, spliced into the model.

    The copies start equal to the base matrices (so a concept's rows start as the base rows of its
    ids, as in the fast path); the originals stay untouched and serve to restore every non-concept
    row after an optimizer step.

    Args:
        backend: the frozen base model (no concept bank may be attached).
        tokens: the concept's placed ids.
    """

    def __init__(self, backend: Backend, tokens: ConceptTokens) -> None:
        if getattr(backend, "_concept_bank", None) is not None:
            raise BenchError("the reference trainer needs a backend without attached concept rows")
        self.backend = backend
        self.tokens = tokens
        self.original_embedding = backend.input_embeddings()
        self.original_head = backend.output_head()
        # The base matrices, kept before the trainable copies replace the modules below.
        self.base_embed = emb_w = backend.base_weight("embed")
        self.base_head = head_w = backend.base_weight("head")
        self.embedding = nn.Embedding.from_pretrained(emb_w.detach().clone(), freeze=False)
        self.head = nn.Linear(head_w.shape[1], head_w.shape[0], bias=False).to(head_w.device, head_w.dtype)
        with torch.no_grad():
            self.head.weight.copy_(head_w)
        self.head.weight.requires_grad_(True)
        # True for every id whose row must come back unchanged after a step.
        self.frozen = torch.ones(emb_w.shape[0], dtype=torch.bool, device=emb_w.device)
        self.frozen[torch.tensor(tokens.ids, device=emb_w.device)] = False
        backend.set_input_embeddings(self.embedding)
        backend.set_output_head(self.head)

    def parameters(self) -> list[nn.Parameter]:
        """The two whole matrices: what the original code hands to AdamW."""
        return [self.embedding.weight, self.head.weight]

    @torch.no_grad()
    def restore_frozen_rows(self) -> None:
        """Put back the base rows of every non-concept id (the original ``index_no_updates``)."""
        self.embedding.weight[self.frozen] = self.base_embed[self.frozen]
        self.head.weight[self.frozen] = self.base_head[self.frozen]

    def concept_rows(self) -> dict[str, torch.Tensor]:
        """The current concept rows ``{"embed", "head"}`` as fp32 CPU copies."""
        ids = torch.tensor(self.tokens.ids, device=self.embedding.weight.device)
        return {
            "embed": self.embedding.weight.detach()[ids].float().cpu().clone(),
            "head": self.head.weight.detach()[ids].float().cpu().clone(),
        }

    def remove(self) -> None:
        """Put the original modules back."""
        self.backend.set_input_embeddings(self.original_embedding)
        self.backend.set_output_head(self.original_head)


def reencode_sequences(
    backend: Backend,
    records: list[dict],
    images: dict[str, Image.Image],
    tokens: ConceptTokens,
    self_prompting: bool = True,
) -> list[Sequence]:
    """Build the records' sequences, VQ-encoding their images from pixels now (no cache).

    Args:
        backend: the base model.
        records: manifest records; ``record["image"]`` names a key of ``images`` or is ``None``.
        images: the photos by name.
        tokens: the concept's placed ids.
        self_prompting: prefix targets with the task's token set.

    Raises:
        BenchError: a record names a photo that ``images`` does not hold.
    """
    names = [r["image"] for r in records if r.get("image")]
    missing = sorted({n for n in names if n not in images})
    if missing:
        raise BenchError(f"records name photos that the workload does not hold: {missing[:5]}")
    encoded = backend.encode_images([images[n] for n in names]) if names else None
    out, k = [], 0
    for rec in records:
        ids = None
        if rec.get("image"):
            ids = encoded[k].tolist()
            k += 1
        out.append(build_sequence(backend, rec, tokens, ids, self_prompting))
    return out


def full_vocabulary_loss(backend: Backend, batch: Batch) -> torch.Tensor:
    """Logits over the whole vocabulary at every position, then the mean CE over labelled tokens."""
    hidden, _ = backend.hidden_states(
        batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    )
    # The same profiler range as the fast path's chunks, so a memory breakdown counts these logits
    # (and the log-softmax autograd keeps of them) as logits.
    with record_function(LOGITS_SCOPE):
        logits = backend.logits(hidden)
        # Position t predicts token t+1; IGNORE labels (prompt and padding) drop out of the mean.
        shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
        return F.cross_entropy(shifted, batch.labels[:, 1:].reshape(-1), ignore_index=IGNORE)


class ReferenceTrainer:
    """The original-style trainer: re-encode, pad to a fixed length, full logits, full matrices.

    Args:
        backend: the frozen base model; a full copy of its embedding and head is spliced in.
        concept: the concept spec (ids are allocated like :func:`yochameleon.concept.attach` does)
            or already-placed tokens.
        options: see :class:`ReferenceOptions`.
    """

    def __init__(
        self,
        backend: Backend,
        concept: ConceptSpec | ConceptTokens,
        options: ReferenceOptions | None = None,
    ) -> None:
        self.backend = backend
        self.options = options or ReferenceOptions()
        self.tokens = allocate_ids(backend, concept) if isinstance(concept, ConceptSpec) else concept
        self.matrices = FullMatrixConcept(backend, self.tokens)
        self.optimizer = torch.optim.AdamW(
            self.matrices.parameters(), lr=self.options.lr, weight_decay=self.options.weight_decay
        )

    def batch(self, records: list[dict], images: dict[str, Image.Image]) -> Batch:
        """Re-encode the records' images and pad every sample to the fixed length.

        Raises:
            BenchError: a sample is longer than ``options.pad_to``.
        """
        seqs = reencode_sequences(self.backend, records, images, self.tokens, self.options.self_prompting)
        longest = max(len(s) for s in seqs)
        pad_to = self.options.pad_to or original_pad_length(self.backend.image_seq_len, longest)
        if longest > pad_to:
            raise BenchError(f"a sample has {longest} tokens, more than pad_to={pad_to}")
        return collate(seqs, self.backend.special.pad, pad_to=pad_to).to(self.backend.device)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The full-vocabulary loss of ``batch``."""
        return full_vocabulary_loss(self.backend, batch)

    def step(self, records: list[dict], images: dict[str, Image.Image]) -> tuple[float, Batch]:
        """One optimizer step on ``records``; returns the loss and the batch it ran on."""
        batch = self.batch(records, images)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            raise BenchError(f"the reference loss became {float(loss.detach())}")
        loss.backward()
        self.optimizer.step()
        self.matrices.restore_frozen_rows()
        return float(loss.detach()), batch
