"""Token generation through the backend protocol, with our own logits and span constraints.

Upstream Chameleon's ``forward`` sets image-token logits to the dtype minimum, and a logits
processor that runs afterwards cannot undo that. This loop therefore takes the final hidden state
from the backend, applies the (concept-aware) output head itself and then a constraint, so text and
image generation share one path for every model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from yochameleon.backends.base import Backend

# The span grammars live with the backends, whose image layouts they describe; re-exported here for
# the decoding loop's callers.
from yochameleon.backends.constraints import ImageSpanConstraint as ImageSpanConstraint
from yochameleon.backends.constraints import SpanConstraint as SpanConstraint
from yochameleon.backends.constraints import TextConstraint as TextConstraint


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``temperature == 0`` is greedy (the default, deterministic)."""

    temperature: float = 0.0
    top_k: int = 0
    seed: int | None = None


def _pick(
    logits: torch.Tensor, allowed: torch.Tensor, sampling: Sampling, gen: torch.Generator | None
) -> torch.Tensor:
    masked = torch.full_like(logits, float("-inf"))
    idx = allowed.to(logits.device)
    masked[:, idx] = logits[:, idx]
    if sampling.temperature <= 0:
        return masked.argmax(dim=-1)
    scaled = masked / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(scaled, min(sampling.top_k, idx.numel()), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled.float(), dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).flatten().to(logits.device)


@torch.no_grad()
def generate(
    backend: Backend,
    input_ids: torch.Tensor,
    constraint: SpanConstraint,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` ids after ``input_ids`` ``[B, T]`` (equal-length prompts).

    Args:
        backend: the model (with any attached concepts).
        input_ids: prompt ids, one row per sample.
        constraint: which ids are allowed at each step; also decides when a row is done.
        max_new_tokens: hard cap on new tokens.
        sampling: greedy by default; a seeded sampler otherwise.
        progress: show a tqdm bar (image spans are long).

    Returns:
        ``[B, N]`` new ids; rows that finish early are padded with the pad id.
    """
    from tqdm.auto import tqdm

    sampling = sampling or Sampling()
    gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    device = backend.device
    ids = input_ids.to(device)
    batch = ids.shape[0]
    hidden, cache = backend.hidden_states(ids, use_cache=True)
    out: list[list[int]] = [[] for _ in range(batch)]
    active = [True] * batch
    pos = ids.shape[1]
    for _ in tqdm(range(max_new_tokens), disable=not progress, desc="generate", leave=False):
        logits = backend.logits(hidden[:, -1])
        nxt = torch.full((batch,), backend.special.pad, dtype=torch.long, device=device)
        for b in range(batch):
            if active[b]:
                nxt[b] = _pick(logits[b : b + 1], constraint.allowed(out[b]), sampling, gen)[0]
                out[b].append(int(nxt[b]))
                active[b] = not constraint.done(out[b])
        if not any(active):
            break
        position_ids = torch.full((batch, 1), pos, dtype=torch.long, device=device)
        hidden, cache = backend.hidden_states(
            nxt[:, None], position_ids=position_ids, past_key_values=cache, use_cache=True
        )
        pos += 1
    width = max(len(o) for o in out)
    result = torch.full((batch, width), backend.special.pad, dtype=torch.long)
    for b, o in enumerate(out):
        result[b, : len(o)] = torch.tensor(o, dtype=torch.long)
    return result


@torch.no_grad()
def teacher_forced_argmax(
    backend: Backend,
    prompt_ids: torch.Tensor,
    continuation: torch.Tensor,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Argmax prediction at each continuation position given the true prefix (one forward pass).

    Used to check that greedy generation is exactly the model's argmax chain, and to measure how
    many image tokens a trained concept reproduces.
    """
    full = torch.cat([prompt_ids, continuation], dim=1).to(backend.device)
    hidden, _ = backend.hidden_states(full)
    t = prompt_ids.shape[1]
    logits = backend.logits(hidden[:, t - 1 : full.shape[1] - 1])
    if allowed is not None:
        masked = torch.full_like(logits, float("-inf"))
        masked[..., allowed.to(logits.device)] = logits[..., allowed.to(logits.device)]
        logits = masked
    return logits.argmax(dim=-1).cpu()
