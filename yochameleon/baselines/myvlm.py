"""MyVLM (ECCV 2024) ported to Chameleon-class models.

* **Concept head**: a linear probe (2-way, class-balanced) on frozen embedder features of the
  concept photos vs. negatives, firing at p(concept) >= threshold (0.5, as in MyVLM). A face head is
  used instead when insightface is installed and the concept is a person.
* **Concept embedding**: one learned vector per concept, inserted as one extra token right after the
  image span when the head fires. It is unit-normalised and rescaled to the mean norm of the image
  tokens' embeddings (MyVLM rescales to the visual features' norm).
* **Objective**: cross-entropy on answers that name the concept with a plain identifier (``sks``),
  with optional attention regularisation: ``attn_reg * mean(P^2)`` of the attention every later
  position pays to the concept token, summed over layers (eager attention).
* When no head fires nothing is inserted, so the model is the base model, bit for bit.

Several concepts can be fitted into one instance; each has its own head and vector.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from yochameleon.baselines.base import ConceptData, Method, Prompted
from yochameleon.baselines.prompting import PLAIN_NAME
from yochameleon.concept import ConceptSpec, attach, detach, get_bank
from yochameleon.data.photos import load_rgb
from yochameleon.errors import DataError
from yochameleon.train.sequences import IGNORE, Batch, collate

logger = logging.getLogger(__name__)


class LinearProbeHead(nn.Module):
    """A 2-way linear classifier on L2-normalised embeddings; fires at p(concept) >= threshold."""

    def __init__(self, dim: int, threshold: float = 0.5) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2)
        self.threshold = threshold

    def fit(
        self, pos: np.ndarray, neg: np.ndarray, steps: int = 300, lr: float = 1e-2, seed: int = 0
    ) -> LinearProbeHead:
        """Class-balanced cross-entropy with AdamW (MyVLM: lr 1e-3 for 500 steps on 1024-d features)."""
        torch.manual_seed(seed)
        x = torch.tensor(np.concatenate([pos, neg]), dtype=torch.float32)
        y = torch.tensor([1] * len(pos) + [0] * len(neg))
        weight = torch.tensor([len(x) / (2 * max(1, len(neg))), len(x) / (2 * max(1, len(pos)))])
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.01)
        for _ in range(steps):
            loss = F.cross_entropy(self.linear(x), y, weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self

    @torch.no_grad()
    def prob(self, emb: np.ndarray) -> np.ndarray:
        return torch.softmax(self.linear(torch.tensor(emb, dtype=torch.float32)), dim=-1)[:, 1].numpy()

    def fires(self, emb: np.ndarray) -> np.ndarray:
        return self.prob(emb) >= self.threshold


class _NormTo(nn.Module):
    """Parametrisation: a row is always unit direction times a fixed norm."""

    def __init__(self, norm: float) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8) * self.norm


@dataclass
class _Concept:
    head: LinearProbeHead
    token_id: int
    name: str
    ids: tuple[int, ...] = ()


class MyVLM(Method):
    """The MyVLM baseline (see the module docstring).

    Args:
        backend: the frozen base model.
        embedder: the embedder of the concept head: an embedder, ``"test"`` for the test embedder,
            or ``None`` for the one stored with the concept's retrieval index (chosen as CLIP-I's is,
            by :func:`yochameleon.retrieval.resolve_embedder`).
        negatives: negative image paths for the head; by default the prepared data's negatives.
        steps: optimisation steps for the concept embedding (MyVLM: 100).
        lr: learning rate of the embedding (MyVLM: 1.0 on a unit-normalised vector).
        attn_reg: weight of the attention regulariser (0 disables; MyVLM used 0.0075–10).
    """

    name = "myvlm"

    def __init__(
        self,
        backend,
        embedder=None,
        negatives: list[Path] | None = None,
        steps: int = 100,
        lr: float = 1.0,
        attn_reg: float = 0.0,
        batch_size: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__(backend)
        self.embedder = embedder
        self.negatives = negatives
        self.steps, self.lr, self.attn_reg, self.batch_size, self.seed = steps, lr, attn_reg, batch_size, seed
        self.concepts: list[_Concept] = []

    # ----- fitting ----------------------------------------------------------------------------
    def _negatives(self, concept: ConceptData) -> list[Path]:
        if self.negatives is not None:
            return list(self.negatives)
        if concept.data_dir is None:
            return []
        from yochameleon.data.manifest import read_manifest

        m = read_manifest(concept.data_dir)
        return sorted({m.image_path(r) for r in m.records if r.label in ("neg_hard", "neg_easy")})

    def _resolve_embedder(self, concept: ConceptData) -> None:
        if self.embedder is None or isinstance(self.embedder, str):
            from yochameleon.retrieval import resolve_embedder

            self.embedder = resolve_embedder(self.embedder, index_dir=concept.index_dir)

    def fit(self, concept: ConceptData, workdir: Path) -> None:
        super().fit(concept, workdir)
        self._resolve_embedder(concept)
        pos_images = [load_rgb(p) for p in concept.photos]
        neg_paths = self._negatives(concept)
        if not neg_paths:
            raise DataError(
                f"MyVLM needs negative images for {concept.name!r}: prepare the concept with an index"
            )
        neg_images = [load_rgb(p) for p in neg_paths]
        pos = self.embedder.embed_images(pos_images, progress=False)
        neg = self.embedder.embed_images(neg_images, progress=False)
        head = LinearProbeHead(pos.shape[1]).fit(pos, neg, seed=self.seed)
        tokens = attach(self.backend, ConceptSpec(f"myvlm-{concept.name}", n_g=1, n_u=0))
        bank = get_bank(self.backend)
        name = tokens.spec.name
        image_norm = self._image_norm()
        torch.nn.utils.parametrize.register_parametrization(bank.embedding.rows, name, _NormTo(image_norm))
        self.concepts.append(_Concept(head, tokens.g_ids[0], name, tuple(tokens.ids)))
        self._train_embedding(self.concepts[-1], pos_images, concept)

    def _image_norm(self) -> float:
        w = self.backend.base_weight("embed")
        ids = torch.tensor(self.backend.special.image_token_ids, device=w.device)
        return float(w[ids].float().norm(dim=-1).mean())

    def _train_embedding(self, c: _Concept, photos: list[Image.Image], concept: ConceptData) -> None:
        from yochameleon.prompts import ATTRIBUTE_QUESTIONS, recognition_answer, recognition_question

        bank = get_bank(self.backend)
        param = bank.embedding.rows.parametrizations[c.name].original
        opt = torch.optim.AdamW([param], lr=self.lr, weight_decay=1e-4)
        sp = self.backend.special
        samples = []
        for i, im in enumerate(photos):
            for j in range(3):
                q = recognition_question(i * 3 + j)
                a = recognition_answer(i * 3 + j, True)
                samples.append((q, a, im))
            caption = concept.description or f"<sks> is a {concept.name}."
            samples.append((ATTRIBUTE_QUESTIONS[0], caption, im))
        seqs = []
        for q, a, im in samples:
            ids = self._prompt_with(q.replace("<sks>", PLAIN_NAME), im, [c.token_id])
            ans = self.backend.tokenize(a.replace("<sks>", PLAIN_NAME)) + [sp.eot]
            seqs.append(_Seq(ids + ans, [IGNORE] * len(ids) + ans))
        gen = torch.Generator().manual_seed(self.seed)
        for step in range(self.steps):
            idx = torch.randperm(len(seqs), generator=gen)[: self.batch_size].tolist()
            batch = collate([seqs[i] for i in idx], sp.pad)
            loss = self._loss(batch, c.token_id)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([param], 0.05)
            opt.step()
            if step == 0:
                logger.info("myvlm %s: first loss %.4f", c.name, float(loss))

    def _loss(self, batch: Batch, token_id: int) -> torch.Tensor:
        from yochameleon.train.loss import label_only_loss

        loss, _ = label_only_loss(self.backend, batch)
        if self.attn_reg > 0:
            loss = loss + self.attn_reg * self._attention_penalty(batch, token_id)
        return loss

    def _attention_penalty(self, batch: Batch, token_id: int) -> torch.Tensor:
        model = self.backend.model
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            out = model.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                output_attentions=True,
            )
        finally:
            model.set_attn_implementation(previous)
        col = batch.input_ids == token_id
        penalty = batch.input_ids.new_zeros((), dtype=torch.float32)
        for att in out.attentions:  # [B, heads, query, key]
            picked = att.transpose(1, 3)[col]  # [n_concept_positions, query, heads]
            penalty = penalty + picked.float().pow(2).mean()
        return penalty

    # ----- prompting --------------------------------------------------------------------------
    def _prompt_with(self, text: str, image: Image.Image | None, inserted: list[int]) -> list[int]:
        ids = self._ids(text, image)
        if not inserted or image is None:
            return ids
        # The concept token(s) go right after the image span (after end-of-image).
        at = ids.index(self.backend.special.eoi) + 1
        return ids[:at] + inserted + ids[at:]

    def firing(self, image: Image.Image) -> list[int]:
        """Token ids of the concepts whose head fires on ``image``."""
        emb = self.embedder.embed_images([image.convert("RGB")], progress=False)
        return [c.token_id for c in self.concepts if bool(c.head.fires(emb)[0])]

    def prompt(self, text: str, image: Image.Image | None = None, task: str = "understanding") -> Prompted:
        inserted = self.firing(image) if image is not None else []
        return Prompted(self._prompt_with(text.replace("<sks>", PLAIN_NAME), image, inserted))

    def prompt_tokens(self) -> int:
        return 1

    def _banned(self) -> list[int]:
        return [i for c in self.concepts for i in c.ids]

    def close(self) -> None:
        bank = get_bank(self.backend)
        for c in self.concepts:
            if bank is not None and c.name in bank.concepts:
                torch.nn.utils.parametrize.remove_parametrizations(bank.embedding.rows, c.name)
                detach(self.backend, c.name)
            bank = get_bank(self.backend)
        self.concepts = []


@dataclass
class _Seq:
    input_ids: list[int]
    labels: list[int]
    kind: str = "myvlm"
    concept: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)
