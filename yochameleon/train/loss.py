"""The training loss: cross-entropy over labelled positions only, chunked, from hidden states.

Full-vocabulary logits at every position are the largest tensor of a naive step (for Anole-7B,
4 × 1.5k × 65,536 fp32 values = 1.6 GB). We gather the hidden states at labelled positions, apply
the output head there only, and do it in chunks. Each chunk's gradient is taken as soon as its
logits exist (softmax minus one-hot, written over the logits), so peak memory holds one chunk of
logits and the head runs once forward and once backward per labelled token, with no recompute.

A chunk holds at most ``chunk`` rows and at most :data:`LOGITS_CHUNK_BYTES` of logits (the row
count shrinks with the vocabulary), since its logits are copied once more on their way back
through the concept head. Logits stay in the head's dtype: a bf16 model's logits are upcast to
float32 :data:`UPCAST_ROWS` rows at a time for the log-sum-exp and the softmax, never as a whole.

On a CPU, shapes are bucketed: a batch's length is padded to a multiple of :data:`LENGTH_BUCKET`
(masked positions, sliced off again) and a chunk's rows to a multiple of :data:`ROW_BUCKET`
(zero-weight rows). oneDNN compiles and caches kernels per matrix shape, and with every batch a
length of its own a bf16 run on anole-tiny held ~100 MB of them (issue 27).

On a CPU with glibc, the loss also fixes malloc's mmap threshold for the process at the size of
a logits chunk (:func:`bound_cpu_heap`): by default glibc raises that threshold to the size of every
large block freed, so on the small benchmark model every chunk and activation of a step came from a
heap that keeps its freed fragments resident, and a step's peak RSS was 3-4 times its live tensors.
"""

from __future__ import annotations

import ctypes
import sys

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from yochameleon.backends.base import Backend
from yochameleon.train.sequences import IGNORE, Batch

# One chunk's logits at 4 bytes a value, on a CPU: 8 MiB is 113 rows of an 18k vocabulary. Larger
# chunks left glibc's heap holding ~60 MB more at the peak of an anole-tiny step (issue 27). On a GPU
# the cap only stops huge vocabularies: 512 MiB is 2,048 rows of Anole's 65k, more than ``chunk``.
LOGITS_CHUNK_BYTES = 8 * 2**20
LOGITS_CHUNK_BYTES_GPU = 512 * 2**20
# Rows of a low-precision chunk upcast to float32 at once (2.4 MB for 18k entries, 8 MB for 65k).
UPCAST_ROWS = 32
# The profiler range around each chunk's logits, so a memory profile can tell them apart.
LOGITS_SCOPE = "yochameleon.logits_chunk"
# CPU shape buckets (see the module docstring): ≤ 63 masked positions per sample, ≤ 31 rows per step.
LENGTH_BUCKET = 64
ROW_BUCKET = 32
# Blocks from this size up get their own mapping, returned to the system when freed (see
# bound_cpu_heap). glibc's default slides from 128 KiB up to 32 MiB, the largest block freed so far.
# Each mapping costs page faults when first written: at 1 MiB an fp32 anole-tiny step spent 50% more
# CPU time for 155 -> 68 MB (and bf16 nothing), so only blocks as large as a logits chunk get one.
CPU_MMAP_THRESHOLD = LOGITS_CHUNK_BYTES
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from malloc.h
_heap_bound: int | None = None


def bound_cpu_heap(threshold: int = CPU_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process, once.

    glibc serves blocks below its mmap threshold from the heap and raises the threshold to the size
    of every larger block freed (up to 32 MiB). After the first step frees its activations, every
    activation and logits chunk below that size comes from the heap, whose freed fragments stay
    resident: on the small benchmark model (65k vocabulary, 1,024 image tokens) one fp32 step peaked
    at 0.9-1.4 GB of RSS for ~0.33 GB of live tensors. A fixed threshold gives each block of at least
    ``threshold`` bytes its own mapping, returned when it is freed, and turns the sliding off: that
    step peaks at 0.34 GB, for ~15% more step time (the fresh pages' faults). Models whose blocks are
    all smaller than ``threshold`` (anole-tiny) keep the heap as before.

    Returns:
        Whether the threshold is fixed (``False`` off Linux/glibc, e.g. musl or macOS).
    """
    global _heap_bound
    if _heap_bound is not None:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        ok = bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # no glibc
        return False
    if ok:
        _heap_bound = threshold
    return ok


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_length(batch: Batch, multiple: int = LENGTH_BUCKET) -> Batch:
    """``batch`` right-padded with masked positions to a length that is a multiple of ``multiple``.

    Padding positions continue each row's position ids and carry no label, so every real
    position's hidden state and the loss are those of the unpadded batch.
    """
    width = batch.input_ids.shape[1]
    extra = _round_up(width, multiple) - width
    if extra == 0:
        return batch
    n = batch.input_ids.shape[0]

    def pad(t: torch.Tensor, fill: torch.Tensor | int) -> torch.Tensor:
        tail = fill.expand(n, extra) if isinstance(fill, torch.Tensor) else t.new_full((n, extra), fill)
        return torch.cat([t, tail], dim=1)

    step = torch.arange(1, extra + 1, device=batch.position_ids.device)
    return Batch(
        pad(batch.input_ids, batch.input_ids[:, -1:]),  # each row's last id: padding where it has any
        pad(batch.labels, IGNORE),
        pad(batch.attention_mask, 0),
        torch.cat([batch.position_ids, batch.position_ids[:, -1:] + step], dim=1),
        batch.kinds,
    )


def chunk_rows(backend: Backend, chunk: int, max_bytes: int | None = None) -> int:
    """Rows per logits chunk: ``chunk``, fewer when that many rows would exceed ``max_bytes`` of
    float32 logits (default: :data:`LOGITS_CHUNK_BYTES` on a CPU, :data:`LOGITS_CHUNK_BYTES_GPU` else)."""
    if max_bytes is None:
        max_bytes = LOGITS_CHUNK_BYTES if backend.device.type == "cpu" else LOGITS_CHUNK_BYTES_GPU
    return max(1, min(chunk, max_bytes // (4 * backend.vocab_size)))


@torch.no_grad()
def _ce_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    upcast_rows: int = UPCAST_ROWS,
) -> torch.Tensor:
    """Per-row cross-entropy of ``logits`` ``[N, V]`` in float32, whatever their dtype.

    With ``weights``, ``logits`` is overwritten with ``weights * (softmax - onehot)``, the gradient
    of ``sum(weights * ce)`` with respect to them (rounded to their dtype, as autograd would round
    it through an upcast). Rows are upcast ``upcast_rows`` at a time; float32 rows are worked on in
    place, so float32 ``logits`` hold no logits afterwards, with or without ``weights``.
    """
    ce = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, targets.numel(), upcast_rows):
        sl = slice(start, start + upcast_rows)
        block, y = logits[sl], targets[sl]
        x = block.float()  # ``block`` itself when already float32: its values are not needed again
        target = x.gather(-1, y[:, None]).squeeze(-1)
        peak = x.amax(dim=-1, keepdim=True)
        # One exp pass gives both the log-sum-exp and the softmax (logsumexp would take its own).
        total = x.sub_(peak).exp_().sum(dim=-1, keepdim=True)
        ce[sl] = (peak + total.log()).squeeze(-1) - target
        if weights is None:
            continue
        x.div_(total)
        x[torch.arange(y.numel(), device=y.device), y] -= 1
        x.mul_(weights[sl, None])
        if x is not block:
            block.copy_(x)
    return ce


def _chunk_ce(
    backend: Backend, hidden: torch.Tensor, targets: torch.Tensor, upcast_rows: int
) -> torch.Tensor:
    with record_function(LOGITS_SCOPE):
        return _ce_(backend.head_logits(hidden), targets, upcast_rows=upcast_rows)


class _LabelledCrossEntropy(torch.autograd.Function):
    """Weighted cross-entropy of labelled positions whose gradients are computed during forward.

    The output ``sum(weights * ce)`` is a scalar, so its gradients with respect to the hidden states
    and the head's trainable parameters are fixed up to the incoming scalar gradient: taking them
    chunk by chunk in forward lets each chunk's logits be freed at once, where a checkpointed chunk
    would compute its logits a second time in backward.
    """

    @staticmethod
    def forward(ctx, backend, chunk, upcast_rows, hidden, targets, weights, *params):
        # ``params`` are the trainable tensors the logits may depend on; unused ones get no gradient.
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        ce = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), chunk):
            sl = slice(start, start + chunk)
            inputs = [hidden[sl].detach().requires_grad_()] if hidden.requires_grad else []
            inputs += params
            with record_function(LOGITS_SCOPE):
                with torch.enable_grad():
                    logits = backend.head_logits(inputs[0] if hidden.requires_grad else hidden[sl])
                # No autograd node keeps the logits (a backend whose head did would fail loudly in
                # autograd.grad below), so their gradient is written over them.
                ce[sl] = _ce_(logits.detach(), targets[sl], weights[sl], upcast_rows)
                if not inputs:
                    continue
                with torch.enable_grad():
                    grads = list(torch.autograd.grad(logits, inputs, logits.detach(), allow_unused=True))
                del logits
            if hidden.requires_grad:
                grad_hidden[sl] = grads.pop(0)
            for i, g in enumerate(grads):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        ctx.has_hidden = grad_hidden is not None
        ctx.param_mask = [g is not None for g in grad_params]
        ctx.save_for_backward(
            *([grad_hidden] if ctx.has_hidden else []), *[g for g in grad_params if g is not None]
        )
        ctx.mark_non_differentiable(ce)
        return (ce * weights).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0) * grad_loss if ctx.has_hidden else None
        grad_params = [saved.pop(0) * grad_loss if used else None for used in ctx.param_mask]
        return (None, None, None, grad_hidden, None, None, *grad_params)


def _trainable_parameters(backend: Backend) -> list[torch.nn.Parameter]:
    # Everything the logits could depend on: the model's trainable tensors (concept rows, or whole
    # matrices in the benchmark's reference) and the head's, once each.
    seen: dict[int, torch.nn.Parameter] = {}
    for p in [*backend.model.parameters(), *backend.output_head().parameters()]:
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return list(seen.values())


def token_weights(batch: Batch, task_weights: dict[str, float]) -> torch.Tensor:
    """Per-position weights ``[B, T]``: 1 everywhere unless a task weight is set for the row's kind."""
    w = torch.ones(batch.labels.shape, dtype=torch.float32, device=batch.labels.device)
    for i, kind in enumerate(batch.kinds):
        if kind in task_weights:
            w[i] = task_weights[kind]
    return w


def label_only_loss(
    backend: Backend,
    batch: Batch,
    task_weights: dict[str, float] | None = None,
    chunk: int = 1024,
    max_chunk_bytes: int | None = None,
    buckets: bool | None = None,
    bound_heap: bool | None = None,
    upcast_rows: int = UPCAST_ROWS,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean (optionally task-weighted) cross-entropy over labelled tokens, and per-kind means.

    Args:
        backend: the model (concepts attached).
        batch: a collated batch.
        task_weights: per-kind loss weights.
        chunk: most rows of logits at once.
        max_chunk_bytes: most bytes of (float32) logits at once; see :func:`chunk_rows`.
        buckets: bucket shapes (see the module docstring); ``None``: on a CPU only.
        bound_heap: fix glibc's mmap threshold (:func:`bound_cpu_heap`); ``None``: on a CPU only.
        upcast_rows: rows of low-precision logits upcast to float32 at once (``sys.maxsize``: a
            whole chunk, as a plain ``logits.float()`` would; the benchmark's ablation).

    Returns:
        ``(loss, {kind: mean CE})``; the loss is averaged over labelled tokens (weighted mean when
        task weights are set).
    """
    on_cpu = batch.input_ids.device.type == "cpu"
    if on_cpu if bound_heap is None else bound_heap:
        bound_cpu_heap()
    bucket = on_cpu if buckets is None else buckets
    padded = bucket_length(batch) if bucket else batch
    hidden, _ = backend.hidden_states(
        padded.input_ids, attention_mask=padded.attention_mask, position_ids=padded.position_ids
    )
    hidden = hidden[:, : batch.input_ids.shape[1]]
    # Position t predicts label t+1.
    targets = batch.labels[:, 1:]
    sel = targets != IGNORE
    h = hidden[:, :-1][sel]
    y = targets[sel]
    w = token_weights(batch, task_weights or {})[:, 1:][sel]
    n = y.numel()
    chunk = chunk_rows(backend, chunk, max_chunk_bytes)
    if bucket and n:
        # Zero-weight rows make every chunk a multiple of ROW_BUCKET rows; they add nothing.
        chunk = max(ROW_BUCKET, chunk // ROW_BUCKET * ROW_BUCKET)
        extra = _round_up(n, ROW_BUCKET) - n
        h = torch.cat([h, h.new_zeros(extra, h.shape[1])])
        y = torch.cat([y, y.new_zeros(extra)])
        w = torch.cat([w, w.new_zeros(extra)])
    if torch.is_grad_enabled() and y.numel():
        share = w / w.sum().clamp(min=1e-8)
        params = _trainable_parameters(backend)
        loss, ce = _LabelledCrossEntropy.apply(backend, chunk, upcast_rows, h, y, share, *params)
    else:
        parts = [
            _chunk_ce(backend, h[i : i + chunk], y[i : i + chunk], upcast_rows)
            for i in range(0, y.numel(), chunk)
        ]
        ce = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
        loss = (ce * w).sum() / w.sum().clamp(min=1e-8)
    ce = ce[:n]
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
