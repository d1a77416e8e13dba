"""Where one training step's memory goes: torch's memory profiler, sorted into the categories we act on.

``torch.profiler`` with ``profile_memory=True`` records every allocation and free of the step, and its
memory profile (the data behind ``profile.export_memory_timeline``) labels each tensor by the role it
plays: parameter, optimizer state, input, activation (saved in forward, read in backward), gradient,
temporary, autograd detail. We walk that timeline, find the instant at which the most tensor bytes
are live, and report what is live then:

* ``logits``: tensors created inside the label-only loss's logits scope (:data:`LOGITS_SCOPE`),
  whatever role the profiler gave them: a chunk's logits, their float32 blocks, the copy the
  concept head makes and the one its backward makes;
* ``activations``: the profiler's activations (outside that scope);
* ``gradients``: parameters' gradients and the gradients autograd passes between layers in backward
  (the profiler's "gradient" and "autograd detail");
* ``inputs_and_other``: the batch, temporaries and allocations the profiler could not tie to a tensor.

Parameters and optimizer state live across steps, so the worker counts them exactly from the model
and the optimizer rather than from the profile (the profile only sees the tensors a step touches).
What the resident set holds beyond all of these is the allocator's slack and the runtime (freed
memory not handed back to the system, thread pools, Python objects): the worker reports it as the
measured training memory minus the tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from yochameleon.eval.bench.reference import BenchError
from yochameleon.train.loss import LOGITS_SCOPE

MB = 2**20
# The breakdown's categories, in the order they are printed; their sum is the training memory.
CATEGORIES = (
    "trainable_parameters",
    "optimizer_state",
    "gradients",
    "activations",
    "logits",
    "inputs_and_other",
    "allocator_slack",
)
CATEGORY_LABELS = {
    "frozen_parameters": "frozen parameters (loaded before training)",
    "trainable_parameters": "trainable parameters",
    "optimizer_state": "optimizer state (AdamW moments)",
    "gradients": "gradients (parameters', and activations' in backward)",
    "activations": "activations saved for backward",
    "logits": "logits and log-softmax transients",
    "inputs_and_other": "inputs and other temporaries",
    "allocator_slack": "allocator slack and runtime",
}


def _logits_windows(prof) -> list[tuple[int, int]]:
    """``[start, end]`` times (ns) of every :data:`LOGITS_SCOPE` range in the profile."""
    windows = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.name == LOGITS_SCOPE:
            windows.append((event.start_time_ns, event.end_time_ns))
        stack.extend(event.children)
    return sorted(windows)


def _inside(t: int, windows: list[tuple[int, int]]) -> bool:
    return any(start <= t <= end for start, end in windows)


def profile_categories(prof, device: str) -> dict[str, Any]:
    """Live tensor bytes by role at the step's peak, from a finished memory profile.

    Args:
        prof: a ``torch.profiler.profile`` run with ``profile_memory``, ``record_shapes`` and
            ``with_stack`` around one training step.
        device: ``"cpu"`` or ``"cuda"``: whose allocations count.

    Returns:
        ``{"peak_bytes", "start_bytes", "at_peak": {role: bytes}, "max": {role: bytes}}``; roles
        are the profiler's category names (lower case, ``"unknown"`` for untyped allocations) plus
        ``"logits"``.

    Raises:
        BenchError: this torch build's profiler has no memory profile.
    """
    import torch

    try:
        from torch.profiler._memory_profiler import Action, MemoryProfileTimeline, TensorKey
    except ImportError as exc:  # a private module: say what is missing rather than crash
        raise BenchError(f"this torch ({torch.__version__}) has no profiler memory timeline: {exc}") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export_memory_timeline's deprecation points to CUDA-only tools
        timeline = MemoryProfileTimeline(prof._memory_profile())
    windows = _logits_windows(prof)
    dev = torch.device(device).type
    created: dict[Any, int] = {}
    live: dict[tuple[Any, int], tuple[str, int]] = {}
    totals: dict[str, int] = {}
    best = {"peak_bytes": -1, "at_peak": {}}
    maximum: dict[str, int] = {}
    start_bytes = None
    events = [e for e in timeline.timeline if e[2][0].device.type == dev]
    for i, (t, action, (key, version), nbytes) in enumerate(events):
        if not isinstance(key, TensorKey):
            # Allocations the profiler could not tie to a tensor share one key per device; the
            # profile pairs each free with its allocation (or a pre-existing entry), so sum them.
            if action != Action.INCREMENT_VERSION:
                sign = -1 if action == Action.DESTROY else 1
                totals["unknown"] = totals.get("unknown", 0) + sign * nbytes
        elif action in (Action.PREEXISTING, Action.CREATE):
            created.setdefault(key, t)
            role = _role(timeline, key, version, created[key], windows)
            live[(key, version)] = (role, nbytes)
            totals[role] = totals.get(role, 0) + nbytes
        elif action == Action.INCREMENT_VERSION and (key, version) in live:
            old_role, size = live.pop((key, version))
            totals[old_role] -= size
            new_role = _role(timeline, key, version + 1, created.get(key, -1), windows)
            live[(key, version + 1)] = (new_role, size)
            totals[new_role] = totals.get(new_role, 0) + size
        elif action == Action.DESTROY and (key, version) in live:
            old_role, size = live.pop((key, version))
            totals[old_role] -= size
        # Several events share a timestamp; read the totals once all of them are applied.
        if i + 1 < len(events) and events[i + 1][0] == t:
            continue
        if start_bytes is None and t >= 0:
            start_bytes = sum(totals.values())
        total = sum(totals.values())
        for role, value in totals.items():
            maximum[role] = max(maximum.get(role, 0), value)
        if total > best["peak_bytes"]:
            best = {"peak_bytes": total, "at_peak": {r: v for r, v in totals.items() if v}}
    return {"peak_bytes": max(best["peak_bytes"], 0), "start_bytes": start_bytes or 0, **best, "max": maximum}


def _role(timeline, key, version: int, created: int, windows) -> str:
    category = timeline.categories.get(key, version)
    name = category.name.lower() if category is not None else "unknown"
    if name not in ("parameter", "optimizer_state") and created >= 0 and _inside(created, windows):
        return "logits"
    return name


def profile_step(step: Callable[[], Any], device: str) -> dict[str, Any]:
    """Run ``step()`` once under torch's memory profiler and return :func:`profile_categories`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    return profile_categories(prof, device)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def breakdown(
    profile: dict[str, Any],
    train_memory_bytes: int,
    frozen_bytes: int,
    trainable_bytes: int,
    optimizer_bytes: int,
) -> dict[str, float]:
    """The step's breakdown in MB: exact persistent state, the profile's transients at the peak, slack.

    Args:
        profile: :func:`profile_categories` of one step.
        train_memory_bytes: the measured peak above the loaded model (RSS on a CPU).
        frozen_bytes: the frozen model's parameters and buffers (loaded before training).
        trainable_bytes: the trainable tensors (concept rows, or whole matrices in the reference).
        optimizer_bytes: the optimizer's state tensors.

    Returns:
        ``{category: MB}`` for :data:`CATEGORIES` plus ``frozen_parameters``, ``tensor_peak`` (the
        profile's peak above what was live when the step started), ``logits_max`` (the most logits
        live at any time of the step, at the peak or not) and ``train_memory``; the categories sum to
        ``train_memory``.
    """
    at = profile["at_peak"]
    out = {
        "frozen_parameters": frozen_bytes,
        "trainable_parameters": trainable_bytes,
        "optimizer_state": optimizer_bytes,
        "gradients": at.get("gradient", 0) + at.get("autograd_detail", 0),
        "activations": at.get("activation", 0),
        "logits": at.get("logits", 0),
        "inputs_and_other": sum(at.get(k, 0) for k in ("input", "temporary", "unknown")),
    }
    tensors = sum(out[c] for c in CATEGORIES if c in out)
    out["allocator_slack"] = train_memory_bytes - tensors
    out["tensor_peak"] = profile["peak_bytes"] - profile["start_bytes"]
    out["logits_max"] = profile["max"].get("logits", 0)
    out["train_memory"] = train_memory_bytes
    return {k: v / MB for k, v in out.items()}


def format_breakdown(rows: dict[str, dict[str, float]]) -> str:
    """A table with one column per configuration (e.g. ``{"fp32": ..., "bf16": ...}``), in MB."""
    names = list(rows)
    lines = [f"{'memory of one training step (MB)':<46}" + "".join(f"{n:>12}" for n in names)]
    for cat in ("frozen_parameters", *CATEGORIES):
        lines.append(f"  {CATEGORY_LABELS[cat]:<44}" + "".join(f"{rows[n][cat]:>12.1f}" for n in names))
    for key, label in (
        ("train_memory", "= training memory (peak RSS above the model)"),
        ("logits_max", "(most logits live at any time of the step)"),
    ):
        lines.append(f"  {label:<44}" + "".join(f"{rows[n][key]:>12.1f}" for n in names))
    return "\n".join(lines)
