"""``yochameleon bench train``: the fast path against the reference trainer, feature by feature.

Every measured configuration runs in its own Python subprocess (so memory peaks and allocator
state never leak between them); the fast path ("ours") and the reference alternate A B A B.
An ablation runs the fast path with one feature switched off at a time:

* ``token_cache``: images VQ-encoded once (off: re-encoded from pixels every step);
* ``label_only``: logits only at labelled positions, chunked (off: full-vocabulary logits everywhere);
* ``no_padding``: length-grouped batches padded to their own longest sample (off: shuffled batches
  all padded to one fixed length, the original's ``tokenizer_max_length`` of 1,500 tokens for
  1,024-token images, scaled to the model's image size);
* ``rows_only``: AdamW over the concept rows only (off: full trainable matrix copies, restored rows);
* ``checkpointing``: gradient checkpointing of the decoder layers (off: every activation kept);
* ``capped_chunks``: label-only logits chunks capped at 8 MiB on a CPU (off: 1,024-row chunks);
* ``shape_buckets``: on a CPU, lengths padded to a multiple of 64 and logits chunks to 32 rows, so
  oneDNN compiles and caches few kernels (off: every batch's own shapes);
* ``bounded_heap``: on a CPU, glibc's mmap threshold fixed at a logits chunk's 8 MiB, so larger freed
  blocks go back to the system (off: glibc's sliding threshold, whose heap keeps freed fragments
  resident);
* ``row_upcast``: a low-precision chunk's logits upcast to float32 32 rows at a time (off: the whole
  chunk at once, as ``logits.float()`` would; the same under fp32);
* ``sdpa``: ``scaled_dot_product_attention`` (off: transformers' eager attention, which materialises
  every head's ``T × T`` scores and their softmax for backward). The reference keeps it on: it is
  transformers' default, so the reference's rows compare trainers, not attention kernels.

The workload is a realistic mixed set of one concept's records (recognition of positives and
negatives, real and soft-positive generation, text QA) on real photos from scikit-image, batch 4.
Memory is the peak resident set during set-up and training above the RSS right after the model
loaded (``VmHWM`` reset through ``/proc/self/clear_refs``; ``torch.cuda.max_memory_allocated`` on a
GPU), so it counts exactly what training adds on top of the frozen model. A float32 checkpoint loads
as memory-mapped file pages that are read in on first use, so every weight is read once before that
baseline is taken: the frozen model's pages belong to the model, not to training.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from yochameleon.eval.bench.reference import BenchError

FEATURES = (
    "token_cache",
    "label_only",
    "no_padding",
    "rows_only",
    "checkpointing",
    "capped_chunks",
    "shape_buckets",
    "bounded_heap",
    "row_upcast",
    "sdpa",
)
FEATURE_LABELS = {
    "token_cache": "no token cache: re-encode images every step",
    "label_only": "no label-only logits: full logits everywhere",
    "no_padding": "padding: shuffled, all padded to the max",
    "rows_only": "no rows-only state: AdamW on full matrices",
    "checkpointing": "no checkpointing: keep every activation",
    "capped_chunks": "no chunk cap: 1,024-row logits chunks",
    "shape_buckets": "no shape buckets: every batch its own shapes",
    "bounded_heap": "no heap bound: glibc's sliding mmap threshold",
    "row_upcast": "no row upcast: a whole chunk's logits to fp32",
    "sdpa": "no sdpa: eager attention",
}
MODEL_SIZES = ("tiny", "small", "anole-tiny")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# What ``bench train --model anole-tiny`` runs unless told otherwise: the setting issue 27's targets
# are stated for (its data mix, 2 threads, 30 steps, both dtypes, 1 + 8 + 8 concept tokens).
PRESETS: dict[str, dict[str, Any]] = {
    "anole-tiny": {"workload": "mix60", "dtypes": ("float32", "bfloat16"), "threads": 2, "steps": 30},
}
DEFAULTS: dict[str, Any] = {"workload": "mixed16", "dtypes": ("float32",), "threads": 1, "steps": 4}


@dataclass(frozen=True)
class Features:
    """Which fast-path features a run uses. All on is ours; all off but ``sdpa`` is the reference."""

    token_cache: bool = True
    label_only: bool = True
    no_padding: bool = True
    rows_only: bool = True
    checkpointing: bool = True
    capped_chunks: bool = True
    shape_buckets: bool = True
    bounded_heap: bool = True
    row_upcast: bool = True
    sdpa: bool = True

    @classmethod
    def reference(cls) -> Features:
        # Attention stays transformers' default (sdpa): the reference rows compare trainers.
        return cls(**dict.fromkeys(FEATURES, False) | {"sdpa": True})

    def without(self, feature: str) -> Features:
        """These features with ``feature`` switched off."""
        if feature not in FEATURES:
            raise BenchError(f"unknown fast-path feature {feature!r}; choose one of {list(FEATURES)}")
        return replace(self, **{feature: False})


@dataclass
class BenchOptions:
    """What ``bench train`` measures.

    Fields left ``None`` take the model's preset (:data:`PRESETS`, e.g. ``anole-tiny``), else
    :data:`DEFAULTS`.

    Args:
        model: ``"tiny"``, ``"small"``, ``"anole-tiny"`` (built into a cache directory when missing)
            or a local Chameleon-class checkpoint directory.
        steps: timed optimizer steps per run (after one untimed warm-up step).
        repeats: runs per implementation, interleaved A B A B.
        batch_size: samples per step.
        ablation: also run the one-feature-off rows.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        threads: torch intra-op threads in each run (default 1, since intra-op threads fighting
            other jobs on a shared machine slow a step down by an order of magnitude).
        pad_to: the reference's fixed padded length (``None``: the original's 1,500 tokens scaled to
            the model's image size, and at least the workload's longest sample).
        lr: AdamW learning rate of both implementations.
        seed: batch order and initialisation seed.
        workload: ``"mixed16"`` (16 records, 16 + 16 tokens) or ``"mix60"`` (issue 27's 60
            records, 8 + 8 tokens); see :data:`WORKLOADS`.
        dtypes: dtypes of the frozen weights; every configuration runs once per dtype.
        breakdown: profile one step of ours and of the reference (first run of each dtype) and
            report where its memory goes (:mod:`~yochameleon.eval.bench.memory`).
        ablate: the features whose one-off rows the ablation runs (``None``: all of :data:`FEATURES`).
    """

    model: str = "small"
    steps: int | None = None
    repeats: int = 2
    batch_size: int = 4
    ablation: bool = True
    device: str = "auto"
    threads: int | None = None
    pad_to: int | None = None
    lr: float = 1e-3
    seed: int = 0
    workload: str | None = None
    dtypes: tuple[str, ...] | None = None
    breakdown: bool = True
    ablate: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        preset = PRESETS.get(self.model, {})
        for key, default in DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, preset.get(key, default))
        self.dtypes = tuple(self.dtypes)
        self.ablate = FEATURES if self.ablate is None else tuple(self.ablate)
        unknown = [f for f in self.ablate if f not in FEATURES]
        if unknown:
            raise BenchError(f"unknown fast-path features {unknown}; choose from {list(FEATURES)}")
        if self.workload not in WORKLOADS:
            raise BenchError(f"workload must be one of {sorted(WORKLOADS)}, got {self.workload!r}")
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes or len(set(self.dtypes)) != len(self.dtypes):
            raise BenchError(f"dtypes must be distinct names from {list(DTYPES)}, got {list(self.dtypes)}")
        if self.steps < 1:
            raise BenchError(f"steps must be at least 1, got {self.steps}")
        if self.repeats < 1:
            raise BenchError(f"repeats must be at least 1, got {self.repeats}")
        if self.batch_size < 1:
            raise BenchError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise BenchError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"threads must be at least 1, got {self.threads}")
        if self.pad_to is not None and self.pad_to < 2:
            raise BenchError(f"pad_to must be at least 2, got {self.pad_to}")
        if not self.lr > 0:
            raise BenchError(f"lr must be positive, got {self.lr}")


# ----------------------------------------------------------------------------------------------
# The workload
# ----------------------------------------------------------------------------------------------
_POSITIVES = ("astronaut", "chelsea", "coffee", "rocket")
_NEGATIVES = ("hubble_deep_field", "immunohistochemistry", "camera", "coins")


def workload_photos() -> dict[str, Any]:
    """Real photos shipped with scikit-image: ``pos0..3`` stand for the concept, ``neg0..3`` do not."""
    from PIL import Image
    from skimage import data

    photos = {}
    for prefix, names in (("pos", _POSITIVES), ("neg", _NEGATIVES)):
        for i, name in enumerate(names):
            photos[f"{prefix}{i}"] = Image.fromarray(getattr(data, name)()).convert("RGB")
    return photos


def workload_records() -> list[dict]:
    """Sixteen manifest records of one concept, mixed like a real training set.

    Per positive photo: a recognition question (yes) and a real generation; per negative photo: a
    recognition question (no); two soft-positive generations on negatives and two text QA pairs.
    """
    questions = ("Is <sks> in this photo?", "Can you see <sks> here?", "Is this <sks>?", "Does <sks> appear?")
    recs: list[dict] = []
    for i in range(len(_POSITIVES)):
        recs.append(
            {
                "id": f"rec_pos{i}",
                "task": "understanding",
                "kind": "recognition",
                "question": f"{questions[i]}<image>",
                "answer": "Yes, it is <sks>.",
                "image": f"pos{i}",
                "flip": False,
                "label": "pos",
            }
        )
        recs.append(
            {
                "id": f"rec_neg{i}",
                "task": "understanding",
                "kind": "recognition",
                "question": f"{questions[-1 - i]}<image>",
                "answer": "No, <sks> is not in this photo.",
                "image": f"neg{i}",
                "flip": False,
                "label": "neg_hard",
            }
        )
        recs.append(
            {
                "id": f"gen_real{i}",
                "task": "generation",
                "kind": "generation_real",
                "question": "A photo of <sks>.",
                "answer": None,
                "image": f"pos{i}",
                "flip": False,
            }
        )
    for i in range(2):
        recs.append(
            {
                "id": f"gen_soft{i}",
                "task": "generation",
                "kind": "generation_soft",
                "question": "A photo of <sks>.",
                "answer": None,
                "image": f"neg{i}",
                "flip": False,
                "n_g": 8 * (i + 1),
                "prompt_form": "paper",
                "score": 0.6,
            }
        )
    recs.append(
        {
            "id": "qa0",
            "task": "understanding",
            "kind": "text_qa",
            "question": "What colour is <sks>?",
            "answer": "<sks> is mostly white with a red and blue mark on the left side.",
            "image": None,
            "flip": False,
        }
    )
    recs.append(
        {
            "id": "qa1",
            "task": "understanding",
            "kind": "text_qa",
            "question": "Describe <sks> in one sentence.",
            "answer": "<sks> is a small object with a striped pattern and a round shape.",
            "image": None,
            "flip": False,
        }
    )
    return recs


def workload_records_mix60() -> list[dict]:
    """Issue 27's data mix: 60 records of one concept with 8 g-tokens, as its comparison trained on.

    8 recognition positives (two questions per positive photo), 3 hard and 3 easy negatives, 5 text
    QA pairs, 3 real generations and 38 soft-positive generations whose g-token prefixes cover the
    7 rank bins (1 … 7 tokens) in equal shares.
    """
    questions = ("Is <sks> in this photo?", "Can you see <sks> here?", "Is this <sks>?", "Does <sks> appear?")
    qa = (
        ("What colour is <sks>?", "<sks> is mostly white with a red and blue mark on the left side."),
        (
            "Describe <sks> in one sentence.",
            "<sks> is a small object with a striped pattern and a round shape.",
        ),
        ("What shape is <sks>?", "<sks> is round, with a flat base."),
        ("Where is the mark on <sks>?", "The mark is on the left side of <sks>, near the top."),
        ("How big is <sks>?", "<sks> is small: it fits in one hand."),
    )
    n_pos, n_neg = len(_POSITIVES), len(_NEGATIVES)
    recs: list[dict] = []
    for i in range(8):
        recs.append(_recognition(f"rec_pos{i}", questions[i % 4], f"pos{i % n_pos}", "pos"))
    for i in range(6):
        label = "neg_hard" if i < 3 else "neg_easy"
        recs.append(_recognition(f"rec_neg{i}", questions[-1 - i % 4], f"neg{i % n_neg}", label))
    for i, (question, answer) in enumerate(qa):
        recs.append(_text_qa(f"qa{i}", question, answer))
    for i in range(3):
        recs.append(_generation(f"gen_real{i}", f"pos{i % n_pos}"))
    for i in range(38):
        recs.append(_generation(f"gen_soft{i}", f"neg{i % n_neg}", n_g=1 + i * 7 // 38))
    return recs


def _recognition(rid: str, question: str, image: str, label: str) -> dict:
    answer = "Yes, it is <sks>." if label == "pos" else "No, <sks> is not in this photo."
    return {
        "id": rid,
        "task": "understanding",
        "kind": "recognition",
        "question": f"{question}<image>",
        "answer": answer,
        "image": image,
        "flip": False,
        "label": label,
    }


def _text_qa(rid: str, question: str, answer: str) -> dict:
    return {
        "id": rid,
        "task": "understanding",
        "kind": "text_qa",
        "question": question,
        "answer": answer,
        "image": None,
        "flip": False,
    }


def _generation(rid: str, image: str, n_g: int | None = None) -> dict:
    rec = {
        "id": rid,
        "task": "generation",
        "kind": "generation_real" if n_g is None else "generation_soft",
        "question": "A photo of <sks>.",
        "answer": None,
        "image": image,
        "flip": False,
    }
    if n_g is not None:
        rec.update({"n_g": n_g, "prompt_form": "paper", "score": 0.6})
    return rec


# name -> (records, n_g, n_u): the manifest records of one concept and its token layout.
WORKLOADS: dict[str, tuple[Any, int, int]] = {
    "mixed16": (workload_records, 16, 16),
    "mix60": (workload_records_mix60, 8, 8),
}


def check_batch_indices(records: list[dict], batch_size: int) -> list[int]:
    """A fixed batch with one record of every kind first: the batch both losses are compared on."""
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        seen.setdefault(r["kind"], i)
    first = list(seen.values())
    rest = [i for i in range(len(records)) if i not in first]
    return (first + rest)[:batch_size]


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _trim_heap() -> None:
    # Hand freed heap memory back to the OS so the post-load baseline is what is really in use.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above a baseline: ``VmHWM`` on Linux, a sampling thread elsewhere, CUDA stats on GPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.baseline = 0
        self._peak = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.method = ""

    def start(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            return
        _trim_heap()
        self.baseline = _rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "psutil RSS sampled every 2 ms"
            self._peak = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.002)

    def peak(self) -> int:
        """Peak bytes since :meth:`start` (absolute; subtract :attr:`baseline` for the increase)."""
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            return max(self._peak, _rss_bytes())
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return _rss_bytes()


# ----------------------------------------------------------------------------------------------
# One run (inside the worker subprocess)
# ----------------------------------------------------------------------------------------------
def encode_photos(backend, photos: dict[str, Any]) -> dict[str, list[int]]:
    """VQ ids of every photo, as the token cache holds them."""
    names = sorted(photos)
    encoded = backend.encode_images([photos[n] for n in names])
    return {n: encoded[i].tolist() for i, n in enumerate(names)}


class StepRunner:
    """Trains one concept on ``backend`` with the given features, one batch per :meth:`step`.

    Args:
        backend: the frozen base model (freshly loaded, nothing attached).
        features: which fast-path features to use.
        records: the workload's manifest records.
        photos: the workload's photos by name.
        batch_size: samples per step.
        lr: AdamW learning rate.
        pad_to: fixed padded length when ``no_padding`` is off (``None``: the original's
            ``tokenizer_max_length``, see :func:`~yochameleon.eval.bench.reference.original_pad_length`).
        seed: batch-order seed.
        logits_chunk: chunk size of the label-only loss.
        image_cache: the photos' VQ ids by name (see :func:`encode_photos`); encoded here when
            ``token_cache`` is on and none is given.
        n_g: generation tokens of the concept.
        n_u: understanding tokens of the concept.
    """

    def __init__(
        self,
        backend,
        features: Features,
        records: list[dict],
        photos: dict[str, Any],
        batch_size: int = 4,
        lr: float = 1e-3,
        pad_to: int | None = None,
        seed: int = 0,
        logits_chunk: int = 1024,
        image_cache: dict[str, list[int]] | None = None,
        n_g: int = 16,
        n_u: int = 16,
    ) -> None:
        import torch

        from yochameleon.concept import ConceptSpec, allocate_ids, attach, get_bank
        from yochameleon.eval.bench.reference import FullMatrixConcept, original_pad_length
        from yochameleon.train.loss import bound_cpu_heap
        from yochameleon.train.sequences import build_sequence

        if features.bounded_heap and backend.device.type == "cpu":
            bound_cpu_heap()  # before the first allocation, whichever loss runs
        self.backend = backend
        self.features = features
        self.records = records
        self.photos = photos
        self.batch_size = batch_size
        self.seed = seed
        self.logits_chunk = logits_chunk
        spec = ConceptSpec("bench", n_g, n_u)
        if features.rows_only:
            self.tokens = attach(backend, spec)
            self.matrices = None
            params = get_bank(backend).parameters()
        else:
            self.tokens = allocate_ids(backend, spec)
            self.matrices = FullMatrixConcept(backend, self.tokens)
            params = self.matrices.parameters()
        self.params = list(params)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        placeholder = [backend.special.image_token_ids[0]] * backend.image_seq_len
        self.lengths = [
            len(build_sequence(backend, r, self.tokens, placeholder if r.get("image") else None))
            for r in records
        ]
        longest = max(self.lengths)
        self.pad_to = (
            None if features.no_padding else (pad_to or original_pad_length(backend.image_seq_len, longest))
        )
        if self.pad_to is not None and self.pad_to < longest:
            raise BenchError(f"pad_to={self.pad_to} is shorter than the longest sample ({longest})")
        self.sequences = None
        if features.token_cache:
            cache = image_cache if image_cache is not None else encode_photos(backend, photos)
            self.sequences = [
                build_sequence(backend, r, self.tokens, cache[r["image"]] if r.get("image") else None)
                for r in records
            ]
        if not features.sdpa:
            backend.model.set_attn_implementation("eager")
        if features.checkpointing:
            backend.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            backend.model.train()  # HF only checkpoints in train mode; the model has no dropout
        else:
            backend.model.eval()

    def trainable_parameters(self) -> list:
        """The tensors AdamW updates: concept rows, or the reference's whole matrices."""
        return self.params

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch: length-grouped (``no_padding``) or plainly shuffled."""
        from yochameleon.train.sequences import length_grouped_batches

        if self.features.no_padding:
            return length_grouped_batches(self.lengths, self.batch_size, self.seed + epoch)
        order = list(range(len(self.records)))
        random.Random(self.seed + epoch).shuffle(order)
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def batch(self, indices: list[int]):
        """Collate the samples ``indices`` (re-encoding their images when the cache is off)."""
        from yochameleon.eval.bench.reference import reencode_sequences
        from yochameleon.train.sequences import collate

        if self.sequences is not None:
            seqs = [self.sequences[i] for i in indices]
        else:
            seqs = reencode_sequences(
                self.backend, [self.records[i] for i in indices], self.photos, self.tokens
            )
        return collate(seqs, self.backend.special.pad, pad_to=self.pad_to).to(self.backend.device)

    def loss(self, batch):
        from yochameleon.eval.bench.reference import full_vocabulary_loss
        from yochameleon.train.loss import UPCAST_ROWS, label_only_loss

        if self.features.label_only:
            return label_only_loss(
                self.backend,
                batch,
                chunk=self.logits_chunk,
                max_chunk_bytes=None if self.features.capped_chunks else sys.maxsize,
                buckets=None if self.features.shape_buckets else False,
                bound_heap=None if self.features.bounded_heap else False,
                upcast_rows=UPCAST_ROWS if self.features.row_upcast else sys.maxsize,
            )[0]
        return full_vocabulary_loss(self.backend, batch)

    def step(self, indices: list[int]) -> dict[str, float]:
        """One optimizer step; returns its loss and token counts."""
        import torch

        from yochameleon.train.sequences import IGNORE

        batch = self.batch(indices)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            raise BenchError(f"loss became {float(loss.detach())} with features {asdict(self.features)}")
        loss.backward()
        self.optimizer.step()
        if self.matrices is not None:
            self.matrices.restore_frozen_rows()
        return {
            "loss": float(loss.detach()),
            "samples": len(indices),
            "padded_tokens": int(batch.input_ids.numel()),
            "real_tokens": int(batch.attention_mask.sum()),
            "labelled_tokens": int((batch.labels[:, 1:] != IGNORE).sum()),
        }

    def check_loss(self) -> float:
        """The loss on the fixed check batch before any step (no gradient)."""
        import torch

        with torch.no_grad():
            return float(self.loss(self.batch(check_batch_indices(self.records, self.batch_size))))


def _read_weights(model) -> None:
    """Read every weight once (see the module docstring: mapped pages count once read)."""
    import torch

    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.device.type == "cpu" and t.numel():
                t.reshape(-1)[:: max(1, 1024 // t.element_size())].sum()  # one value per KiB: every page


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process; ``spec`` comes from :func:`_worker_spec`."""
    import torch

    from yochameleon.backends import load_backend
    from yochameleon.backends.base import LoadOptions

    threads = spec.get("threads") or 1
    torch.set_num_threads(threads)
    rss_import = _rss_bytes()
    device = spec["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = spec.get("dtype", "float32")
    torch.manual_seed(spec["seed"])
    backend = load_backend(spec["model_dir"], LoadOptions(device=device, dtype=dtype))
    _read_weights(backend.model)
    _trim_heap()
    rss_model = _rss_bytes()
    features = Features(**spec["features"])
    make_records, n_g, n_u = WORKLOADS[spec.get("workload", "mixed16")]
    records = make_records()
    photos = workload_photos()
    # The token cache is built by data preparation before training, so it stays out of the window.
    cache = encode_photos(backend, photos) if features.token_cache else None
    memory = PeakMemory(device)
    memory.start()
    runner = StepRunner(
        backend,
        features,
        records,
        photos,
        image_cache=cache,
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        pad_to=spec["pad_to"],
        seed=spec["seed"],
        n_g=n_g,
        n_u=n_u,
    )
    check = runner.check_loss()
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < spec["steps"]:
        batches += runner.epoch_batches(epoch)
        epoch += 1
    runner.step(batches[0])  # warm-up: lazy allocations, optimizer state, kernel selection
    steps = []
    for indices in batches[: spec["steps"]]:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        info = runner.step(indices)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        info["seconds"] = time.perf_counter() - t0
        # CPU seconds of all threads: on a shared machine wall time mostly measures the other jobs.
        info["cpu_seconds"] = time.process_time() - c0
        steps.append(info)
    peak = memory.peak()
    result = {
        "features": asdict(features),
        "device": device,
        "dtype": dtype,
        "threads": threads,
        "check_loss": check,
        "pad_to": runner.pad_to,
        "longest_sample": max(runner.lengths),
        "steps": steps,
        "memory_method": memory.method,
        "rss_after_import_mb": rss_import / 2**20,
        "rss_after_model_mb": rss_model / 2**20,
        "train_memory_mb": (peak - memory.baseline) / 2**20,
        "peak_above_import_mb": (peak - rss_import) / 2**20
        if not device.startswith("cuda")
        else peak / 2**20,
    }
    if spec.get("breakdown"):
        result["breakdown"] = step_breakdown(runner, batches, peak - memory.baseline, device)
    return result


def step_breakdown(runner: StepRunner, batches: list[list[int]], train_bytes: int, device: str) -> dict:
    """Profile one more step, on the batch with the most labelled tokens, and split its memory.

    That batch holds the most logits and, padded to its longest sample, the most activations, so
    its step is where the measured peak comes from. See :func:`~yochameleon.eval.bench.memory.breakdown`.
    """
    from yochameleon.eval.bench.memory import breakdown, profile_step, tensor_bytes
    from yochameleon.train.sequences import IGNORE

    def size(indices: list[int]) -> tuple[int, int]:
        labels = runner.batch(indices).labels
        return int((labels[:, 1:] != IGNORE).sum()), int(labels.numel())

    largest = max(batches, key=size)
    profile = profile_step(lambda: runner.step(largest), device)
    model = runner.backend.model
    trainable = runner.trainable_parameters()
    ids = {id(p) for p in trainable}
    frozen = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in ids]
    if runner.matrices is not None:  # the reference's spliced-out base matrices are frozen weights too
        frozen += [runner.matrices.original_embedding.weight, runner.matrices.original_head.weight]
    state = [
        t for st in runner.optimizer.state.values() for t in st.values() if hasattr(t, "untyped_storage")
    ]
    labelled, padded = size(largest)
    return {
        "batch_labelled_tokens": labelled,
        "batch_padded_tokens": padded,
        "profile_at_peak_mb": {k: v / 2**20 for k, v in profile["at_peak"].items()},
        **breakdown(profile, train_bytes, tensor_bytes(frozen), tensor_bytes(trainable), tensor_bytes(state)),
    }


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the steps of one configuration's runs into its figures."""
    steps = [s for r in runs for s in r["steps"]]
    total = sum(s["seconds"] for s in steps)
    per_step = [s["seconds"] for s in steps]
    return {
        "runs": len(runs),
        "steps": len(steps),
        "s_per_step": statistics.median(per_step),
        "s_per_step_mean": total / len(steps),
        "s_per_step_runs": [statistics.median(s["seconds"] for s in r["steps"]) for r in runs],
        "cpu_s_per_step": statistics.median(s.get("cpu_seconds", s["seconds"]) for s in steps),
        "samples_per_s": sum(s["samples"] for s in steps) / total,
        "padded_tokens_per_s": sum(s["padded_tokens"] for s in steps) / total,
        "real_tokens_per_s": sum(s["real_tokens"] for s in steps) / total,
        "labelled_tokens_per_s": sum(s["labelled_tokens"] for s in steps) / total,
        "train_memory_mb": statistics.median(r["train_memory_mb"] for r in runs),
        "peak_above_import_mb": statistics.median(r["peak_above_import_mb"] for r in runs),
        "rss_after_import_mb": statistics.median(r["rss_after_import_mb"] for r in runs),
        "rss_after_model_mb": statistics.median(r["rss_after_model_mb"] for r in runs),
        "check_loss": runs[0]["check_loss"],
        "pad_to": runs[0]["pad_to"],
        "first_step_loss": runs[0]["steps"][0]["loss"],
        "features": runs[0]["features"],
        "device": runs[0]["device"],
        "dtype": runs[0].get("dtype", "float32"),
        "memory_method": runs[0]["memory_method"],
        **({"breakdown": runs[0]["breakdown"]} if "breakdown" in runs[0] else {}),
    }


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------
def model_cache_dir() -> Path:
    """``$YOCHAMELEON_CACHE/bench_models``, else ``~/.cache/yochameleon/bench_models``."""
    base = os.environ.get("YOCHAMELEON_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "yochameleon"
    return root / "bench_models"


def resolve_model(model: str) -> Path:
    """The checkpoint directory of ``model``; the :data:`MODEL_SIZES` are built with ``make_tiny`` once.

    Raises:
        BenchError: ``model`` is neither a size nor an existing directory.
    """
    if model in MODEL_SIZES:
        out = model_cache_dir() / model
        if not (out / "yochameleon_tiny.json").is_file():
            from yochameleon.backends.tiny import make_tiny

            print(f"building the {model} benchmark model in {out} (once)", file=sys.stderr)
            make_tiny(out, size=model, seed=0)
        return out
    path = Path(model)
    if not path.is_dir():
        raise BenchError(
            f"--model must be one of {list(MODEL_SIZES)} or a checkpoint directory; {model!r} is neither"
        )
    return path


def run_in_subprocess(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run :func:`run_worker` in a fresh Python process and return its result.

    Raises:
        BenchError: the worker failed (its stderr tail is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="yoc-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "yochameleon.eval.bench.train_bench", json.dumps(spec), str(out)]
        env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise BenchError(f"benchmark worker for {spec['features']} failed:\n{tail}")
        return json.loads(out.read_text())


def _worker_spec(
    options: BenchOptions,
    model_dir: Path,
    features: Features,
    dtype: str = "float32",
    breakdown: bool = False,
) -> dict[str, Any]:
    return {
        "model_dir": str(model_dir),
        "features": asdict(features),
        "steps": options.steps,
        "batch_size": options.batch_size,
        "device": options.device,
        "threads": options.threads,
        "pad_to": options.pad_to,
        "lr": options.lr,
        "seed": options.seed,
        "dtype": dtype,
        "workload": options.workload,
        "breakdown": breakdown,
    }


def machine_description() -> dict[str, Any]:
    """CPU/GPU, core count and memory of this machine, for the report."""
    import platform

    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bench_train(options: BenchOptions, progress: bool = True, reference: bool = True) -> dict[str, Any]:
    """Run the benchmark and return its JSON-ready result.

    Every configuration runs once per dtype of ``options.dtypes``. The first dtype's figures are
    also the result's top-level keys; ``by_dtype`` holds every dtype's.

    Args:
        options: what to measure.
        progress: show a progress bar.
        reference: also run the reference trainer (``False``: ours alone, e.g. for a breakdown).

    Returns:
        ``{"ours", "reference", "ablation", "speedup", "memory_ratio", "loss_diff", "by_dtype", ...}``
        (without the reference's keys when ``reference`` is off).
    """
    from tqdm.auto import tqdm

    model_dir = resolve_model(options.model)
    ours, ref = Features(), Features.reference()
    jobs: list[tuple[str, str, Features]] = []
    for dtype in options.dtypes:
        for _ in range(options.repeats):
            jobs += [(dtype, "ours", ours)] + ([(dtype, "reference", ref)] if reference else [])
        if options.ablation:
            jobs += [(dtype, f"no_{f}", ours.without(f)) for f in options.ablate]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {d: {} for d in options.dtypes}
    for dtype, name, features in tqdm(jobs, desc="bench train", disable=not progress):
        runs = results[dtype].setdefault(name, [])
        first = options.breakdown and not runs and name in ("ours", "reference")
        runs.append(run_in_subprocess(_worker_spec(options, model_dir, features, dtype, first)))
    make_records = WORKLOADS[options.workload][0]
    by_dtype = {
        dtype: _compare({n: _summarise(r) for n, r in results[dtype].items()}) for dtype in options.dtypes
    }
    out = {
        "model": options.model,
        "model_dir": str(model_dir),
        "options": asdict(options),
        "machine": machine_description(),
        "workload": {
            "name": options.workload,
            "records": len(make_records()),
            "kinds": sorted({rec["kind"] for rec in make_records()}),
            "concept_tokens": 1 + WORKLOADS[options.workload][1] + WORKLOADS[options.workload][2],
            "batch_size": options.batch_size,
        },
        "dtypes": list(options.dtypes),
        **by_dtype[options.dtypes[0]],
        "by_dtype": by_dtype,
    }
    if options.model in TARGETS:
        out["targets"] = check_targets(out, TARGETS[options.model])
    return out


def _compare(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One dtype's rows: ours, the reference, the ablation and their ratios."""
    o = summary["ours"]
    ablation = []
    for f in FEATURES:
        if f"no_{f}" not in summary:
            continue
        row = summary[f"no_{f}"]
        ablation.append(
            {
                "feature_off": f,
                "label": FEATURE_LABELS[f],
                "slowdown": row["s_per_step"] / o["s_per_step"],
                "memory_vs_ours": row["train_memory_mb"] / max(o["train_memory_mb"], 1e-9),
                **row,
            }
        )
    out: dict[str, Any] = {"ours": o, "ablation": ablation}
    if "reference" not in summary:
        return out
    r = summary["reference"]
    return {
        **out,
        "reference": r,
        "speedup": r["s_per_step"] / o["s_per_step"],
        # Mean time per sample, not the median step: the two agree only when all batches cost the same.
        "speedup_throughput": o["samples_per_s"] / r["samples_per_s"],
        "memory_ratio": r["train_memory_mb"] / max(o["train_memory_mb"], 1e-9),
        "memory_ratio_above_import": r["peak_above_import_mb"] / max(o["peak_above_import_mb"], 1e-9),
        "loss_diff": abs(r["check_loss"] - o["check_loss"]),
    }


# Issue 27's targets for the anole-tiny preset (batch 4, 2 threads, its data mix), with the
# original trainer's figures they were derived from: bf16, 0.568 s/step, 692 MB training memory.
ORIGINAL_ANOLE_TINY = {"s_per_step": 0.568, "train_memory_mb": 692.0}
TARGETS: dict[str, list[dict[str, Any]]] = {
    "anole-tiny": [
        {"name": "training memory, fp32 (MB)", "dtype": "float32", "key": "train_memory_mb", "max": 230.0},
        {"name": "training memory, bf16 (MB)", "dtype": "bfloat16", "key": "train_memory_mb", "max": 230.0},
        {"name": "bf16 training memory / fp32's", "key": "bf16_over_fp32_memory", "max": 1.0},
        {
            "name": "RSS after model load, fp32 (MB)",
            "dtype": "float32",
            "key": "rss_after_model_mb",
            "max": 650.0,
        },
        {
            "name": "RSS after model load, bf16 (MB)",
            "dtype": "bfloat16",
            "key": "rss_after_model_mb",
            "max": 650.0,
        },
        {"name": "bf16 step time (s, median)", "dtype": "bfloat16", "key": "s_per_step", "max": 0.19},
    ],
}


def check_targets(result: dict[str, Any], targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target with the measured value and whether it is met (``None``: a dtype was not run)."""
    by = result["by_dtype"]
    checked = []
    for t in targets:
        if t["key"] == "bf16_over_fp32_memory":
            have = "bfloat16" in by and "float32" in by
            value = (
                by["bfloat16"]["ours"]["train_memory_mb"] / by["float32"]["ours"]["train_memory_mb"]
                if have
                else None
            )
        else:
            value = by[t["dtype"]]["ours"][t["key"]] if t["dtype"] in by else None
        checked.append({**t, "value": value, "met": None if value is None else value <= t["max"]})
    return checked


def estimator_check(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The step estimator's training memory against each measured configuration of a result.

    Returns:
        One :func:`~yochameleon.eval.bench.estimate.validate` record per configuration and dtype
        (ours, the reference and every ablation row), each with its ``configuration`` name.
    """
    from yochameleon.eval.bench.estimate import model_shape, validate

    shape = model_shape(result["model_dir"])
    batch = result["workload"]["batch_size"]
    checks = []
    for dtype, part in result.get("by_dtype", {result.get("dtypes", ["float32"])[0]: result}).items():
        rows = [("ours", part["ours"])]
        if "reference" in part:
            rows += [("reference", part["reference"])]
        rows += [(f"{row['feature_off']} off", row) for row in part.get("ablation", [])]
        short = DTYPE_SHORT[dtype]
        checks += [{"configuration": f"{name}, {short}", **validate(shape, row, batch)} for name, row in rows]
    return checks


def estimator_breakdown_check(result: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """The step estimator's categories against every measured breakdown of a result.

    Returns:
        ``{"ours fp32": check, ...}``, one :func:`~yochameleon.eval.bench.estimate.check_breakdown`
        per configuration and dtype that was profiled.
    """
    from yochameleon.eval.bench.estimate import check_breakdown, model_shape

    shape = model_shape(result["model_dir"])
    batch = result["workload"]["batch_size"]
    checks = {}
    for dtype, part in result.get("by_dtype", {}).items():
        for name in ("ours", "reference"):
            if "breakdown" in part.get(name, {}):
                checks[f"{name} {DTYPE_SHORT[dtype]}"] = check_breakdown(shape, part[name], batch)
    return checks


def format_breakdown_check(checks: dict[str, dict[str, dict[str, float]]]) -> str:
    """A table of :func:`estimator_breakdown_check`: estimated / measured MB per category."""
    names = list(checks)
    lines = [f"{'estimate / breakdown (MB)':<28}" + "".join(f"{n:>22}" for n in names)]
    for cat in next(iter(checks.values())):
        cells = [f"{checks[n][cat]['estimated_mb']:.1f} / {checks[n][cat]['measured_mb']:.1f}" for n in names]
        lines.append(f"  {cat:<26}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def format_result(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`bench_train`'s result: every dtype, its breakdown, the targets."""
    from yochameleon.eval.bench.memory import format_breakdown

    m = result["machine"]
    first = result["ours"]
    lines = [
        f"model {result['model']} on {m['cpu']} ({m['cores']} cores), device {first['device']}, "
        f"workload {result['workload']['name']} ({result['workload']['records']} records), "
        f"batch {result['workload']['batch_size']}, {first['steps']} timed steps per implementation",
        f"{'configuration':<50} {'s/step':>7} {'cpu s':>6} {'samp/s':>7} {'pad tok/s':>9} {'real tok/s':>10} "
        f"{'lab tok/s':>9} {'train MB':>8} {'>import MB':>10} {'model MB':>8} {'loss':>9}",
    ]
    breakdowns = {}
    for dtype, part in result["by_dtype"].items():
        short = DTYPE_SHORT[dtype]
        rows = [(f"ours (all fast-path features), {short}", part["ours"])]
        if "reference" in part:
            rows.append((f"reference, {short}", part["reference"]))
        rows += [(f"  {row['label']}", row) for row in part.get("ablation", [])]
        for name, row in rows:
            lines.append(
                f"{name:<50} {row['s_per_step']:>7.3f} {row.get('cpu_s_per_step', 0):>6.3f} "
                f"{row['samples_per_s']:>7.3f} "
                f"{row['padded_tokens_per_s']:>9.0f} {row['real_tokens_per_s']:>10.0f} "
                f"{row['labelled_tokens_per_s']:>9.0f} {row['train_memory_mb']:>8.0f} "
                f"{row['peak_above_import_mb']:>10.0f} {row['rss_after_model_mb']:>8.0f} {row['check_loss']:>9.5f}"
            )
            if "breakdown" in row:
                breakdowns[name.split(" (")[0].split(",")[0] + f" {short}"] = row["breakdown"]
        if "reference" in part:
            lines.append(
                f"{short}: speedup {part['speedup']:.2f}x (median s/step; {part['speedup_throughput']:.2f}x in "
                f"samples/s)  memory_ratio {part['memory_ratio']:.2f}x ({part['memory_ratio_above_import']:.2f}x "
                f"above import)  loss diff {part['loss_diff']:.1e}"
            )
    if breakdowns:
        lines += ["", format_breakdown(breakdowns)]
    for t in result.get("targets", []):
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"target {t['name']:<36} <= {t['max']:<7g} measured {value:>9}  {verdict}")
    return "\n".join(lines)


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``bench train`` arguments to ``parser`` and set ``func`` to :func:`run_train`."""
    parser.add_argument(
        "--model",
        default=None,
        help="tiny, small, anole-tiny (built once into a cache dir) or a DIR (default: small; "
        "anole-tiny with --memory-breakdown)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per implementation, interleaved A B A B")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--no-ablation", action="store_true", help="skip the one-feature-off rows")
    parser.add_argument(
        "--ablate",
        action="append",
        choices=list(FEATURES),
        default=None,
        help="run only this feature's one-off row, repeatable (default: every feature)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the reference trainer")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: 1)")
    parser.add_argument(
        "--pad-to",
        type=int,
        default=None,
        help="reference padded length (default: the original's 1500, scaled)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        action="append",
        choices=list(DTYPES),
        default=None,
        help="dtype of the frozen weights, repeatable (default: float32; anole-tiny: float32 and bfloat16)",
    )
    parser.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default=None,
        help="mixed16 (16 records) or mix60 (issue 27's 60-record mix; the anole-tiny default)",
    )
    parser.add_argument(
        "--memory-breakdown",
        action="store_true",
        help="only profile ours (one run per dtype) and print where one step's memory goes",
    )
    parser.add_argument(
        "--no-breakdown",
        action="store_true",
        help="skip the profiled step of ours and the reference (the tables without the breakdown)",
    )
    parser.add_argument("--json", metavar="OUT.json", help="write the full result as JSON")
    parser.set_defaults(func=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Run ``yochameleon bench train``: print the table and write the JSON if asked."""
    model = args.model or ("anole-tiny" if args.memory_breakdown else "small")
    options = BenchOptions(
        model=model,
        steps=args.steps,
        repeats=1 if args.memory_breakdown else args.repeats,
        batch_size=args.batch_size,
        ablation=not (args.no_ablation or args.memory_breakdown),
        device=args.device,
        threads=args.threads,
        pad_to=args.pad_to,
        seed=args.seed,
        workload=args.workload,
        dtypes=tuple(args.dtype) if args.dtype else None,
        breakdown=args.memory_breakdown or not args.no_breakdown,
        ablate=tuple(args.ablate) if args.ablate else None,
    )
    result = bench_train(options, reference=not (args.memory_breakdown or args.no_reference))
    result["estimator_check"] = estimator_check(result)
    result["estimator_breakdown_check"] = estimator_breakdown_check(result)
    print(format_result(result))
    if result["estimator_breakdown_check"]:
        print(format_breakdown_check(result["estimator_breakdown_check"]))
    for check in result["estimator_check"]:
        print(
            f"estimator vs measured ({check['configuration']}): {check['estimated_mb']:.0f} MB estimated, "
            f"{check['measured_mb']:.0f} MB measured ({check['relative_error']:+.0%}, "
            f"tolerance ±{check['tolerance']:.0%})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _known_features(data: dict[str, Any]) -> dict[str, bool]:
    names = {f.name for f in fields(Features)}
    return {k: bool(v) for k, v in data.items() if k in names}


if __name__ == "__main__":
    # Worker mode: python -m yochameleon.eval.bench.train_bench SPEC_JSON OUT_JSON
    worker_spec = json.loads(sys.argv[1])
    worker_spec["features"] = _known_features(worker_spec["features"])
    Path(sys.argv[2]).write_text(json.dumps(run_worker(worker_spec)))
