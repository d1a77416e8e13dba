"""The training loss: cross-entropy over labelled positions only, chunked, from hidden states.

Full-vocabulary logits at every position are the largest tensor of a naive step (for Anole-7B,
4 × 1.5k × 65,536 fp32 values = 1.6 GB). We gather the hidden states at labelled positions, apply
the output head there only, and do it in chunks whose logits are recomputed during backward, so
peak memory holds one chunk of logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from yochameleon.backends.base import Backend
from yochameleon.train.sequences import IGNORE, Batch


def _chunk_ce(backend: Backend, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(backend.logits(hidden), targets, reduction="none")


def token_weights(batch: Batch, task_weights: dict[str, float]) -> torch.Tensor:
    """Per-position weights ``[B, T]``: 1 everywhere unless a task weight is set for the row's kind."""
    w = torch.ones(batch.labels.shape, dtype=torch.float32, device=batch.labels.device)
    for i, kind in enumerate(batch.kinds):
        if kind in task_weights:
            w[i] = task_weights[kind]
    return w


def label_only_loss(
    backend: Backend, batch: Batch, task_weights: dict[str, float] | None = None, chunk: int = 1024
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean (optionally task-weighted) cross-entropy over labelled tokens, and per-kind means.

    Returns:
        ``(loss, {kind: mean CE})``; the loss is averaged over labelled tokens (weighted mean when
        task weights are set).
    """
    hidden, _ = backend.hidden_states(
        batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    )
    # Position t predicts label t+1.
    targets = batch.labels[:, 1:]
    sel = targets != IGNORE
    h = hidden[:, :-1][sel]
    y = targets[sel]
    w = token_weights(batch, task_weights or {})[:, 1:][sel]
    parts = []
    for start in range(0, y.numel(), chunk):
        sl = slice(start, start + chunk)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_ce, backend, h[sl], y[sl], use_reentrant=False))
        else:
            parts.append(_chunk_ce(backend, h[sl], y[sl]))
    ce = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    loss = (ce * w).sum() / w.sum().clamp(min=1e-8)
    per_kind: dict[str, float] = {}
    with torch.no_grad():
        row = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[sel]
        kinds = batch.kinds
        for kind in set(kinds):
            m = torch.isin(
                row, torch.tensor([i for i, k in enumerate(kinds) if k == kind], device=row.device)
            )
            if m.any():
                per_kind[kind] = float(ce[m].mean())
    return loss, per_kind


def full_logits_loss(backend: Backend, batch: Batch) -> torch.Tensor:
    """The straightforward computation: logits at every position, then masked mean CE.

    Kept as the reference the fast path is tested against.
    """
    hidden, _ = backend.hidden_states(
        batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    )
    logits = backend.logits(hidden)[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
