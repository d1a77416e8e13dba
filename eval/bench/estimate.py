"""``yochameleon bench estimate``: memory and time of one training step, from a model's shape alone.

The model is frozen and only a few concept rows train, so a step needs the gradient with respect to
activations but never with respect to weights. Three consequences drive the arithmetic:

* a frozen linear layer saves nothing for backward (``dX = dY Wᵀ`` needs only ``W``), so what a
  decoder layer keeps is its norms' inputs, the attention inputs/outputs and the MLP's gate/up
  products: ``a·(3H + 3H_kv + 3I) + 4·2H`` bytes per token (``a`` the activation width, the norms'
  fp32 upcasts at 4 bytes);
* backward costs about one forward for the matmuls (``dX`` only, no ``dW``) and two for attention;
* the logits only exist at labelled positions, one chunk of ``chunk × vocab`` at a time.

Memory categories: parameters (the frozen model), trainable state (rows, their grads and two AdamW
moments; or whole matrices for the reference), activations, logits, and a fixed runtime overhead
(CPU allocator/autograd; the CUDA context on a GPU). The estimate is validated against peaks
measured by ``bench train`` on the tiny and small models (:func:`validate`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from yochameleon.eval.bench.reference import BenchError
from yochameleon.train.loss import LOGITS_CHUNK_BYTES, LOGITS_CHUNK_BYTES_GPU, UPCAST_ROWS

GB = 1e9
MB = 2**20
QUANTS = ("fp32", "bf16", "8bit", "4bit")
# Dense tensor-core peaks (TFLOPs, no sparsity) for the compute dtype.
GPUS = {
    "h100": ("NVIDIA H100 SXM, bf16 dense", 989.0),
    "h200": ("NVIDIA H200 SXM, bf16 dense", 989.0),
    "a100": ("NVIDIA A100 SXM, bf16 dense", 312.0),
    "l40s": ("NVIDIA L40S, bf16 dense", 362.0),
    "rtx4090": ("NVIDIA RTX 4090, bf16 dense (fp32 accumulate)", 165.0),
}
# What the runtime itself adds to a training peak: measured on this project's CPU runs (autograd,
# allocator, thread pools) and a typical CUDA context + cuBLAS workspace on a GPU.
RUNTIME_OVERHEAD = {"cpu": 48 * MB, "cuda": 600 * MB}
# The tolerance the estimate is validated to on the tiny and small models.
TOLERANCE = 0.35


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only model that memory and FLOPs depend on."""

    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    image_tokens: int = 1024

    def __post_init__(self) -> None:
        for key in (
            "hidden_size",
            "num_layers",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "vocab_size",
        ):
            if getattr(self, key) < 1:
                raise BenchError(f"{self.name}: {key} must be positive, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise BenchError(
                f"{self.name}: hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads"
            )

    @property
    def kv_size(self) -> int:
        return self.hidden_size // self.num_heads * self.num_kv_heads

    @property
    def layer_params(self) -> int:
        """Linear weights of one decoder layer (q, k, v, o and the gated MLP)."""
        h = self.hidden_size
        return 2 * h * h + 2 * h * self.kv_size + 3 * h * self.intermediate_size

    @property
    def matrix_params(self) -> int:
        """The input embedding and the output head together."""
        return 2 * self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        return self.num_layers * self.layer_params + self.matrix_params


def _from_tiny(name: str) -> ModelShape:
    from yochameleon.backends.tiny import SIZES

    s = SIZES[name]
    return ModelShape(
        name,
        s.hidden_size,
        s.num_hidden_layers,
        s.intermediate_size,
        s.num_attention_heads,
        s.num_key_value_heads,
        s.vocab_size,
        s.image_seq_len,
    )


def model_shape(name_or_dir: str) -> ModelShape:
    """A built-in shape (``anole-7b``, ``tiny``, ``small``, ``anole-tiny``) or one read from ``DIR/config.json``.

    Raises:
        BenchError: unknown name, or a directory without a usable ``config.json``.
    """
    if name_or_dir in ("anole-7b", "chameleon-7b"):
        return ModelShape(name_or_dir, 4096, 32, 11008, 32, 32, 65536, 1024)
    if name_or_dir in ("tiny", "small", "anole-tiny"):
        return _from_tiny(name_or_dir)
    path = Path(name_or_dir)
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise BenchError(
            "--model-config must be anole-7b, tiny, small, anole-tiny or a directory with config.json; "
            f"got {name_or_dir!r}"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise BenchError(f"{cfg_path} is not valid JSON: {exc}") from exc
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    try:
        heads = int(cfg["num_attention_heads"])
        return ModelShape(
            path.name or str(path),
            int(cfg["hidden_size"]),
            int(cfg["num_hidden_layers"]),
            int(cfg["intermediate_size"]),
            heads,
            int(cfg.get("num_key_value_heads") or heads),
            int(cfg["vocab_size"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"{cfg_path} lacks a decoder field the estimator needs: {exc}") from exc


@dataclass
class EstimateOptions:
    """One training step's setting.

    Args:
        quant: weight format: ``fp32``, ``bf16``, ``8bit`` or ``4bit`` (bitsandbytes NF4; the
            embedding and head stay in the compute dtype, as the backends load them).
        checkpointing: gradient checkpointing of every decoder layer.
        batch: samples per step.
        seq: padded tokens per sample.
        labelled_fraction: share of tokens that carry a label (generation samples label their
            whole image, so ~0.5–0.7 for a mixed batch).
        logits_chunk: rows of logits live at once in the label-only loss.
        label_only: logits at labelled positions only (``False``: at every position).
        rows_only: AdamW over the concept rows (``False``: whole embedding and head matrices).
        capped_chunks: logits chunks capped in bytes as the loss caps them (``False``: ``logits_chunk`` rows).
        row_upcast: a low-precision chunk upcast to float32 ``UPCAST_ROWS`` rows at a time (``False``:
            the whole chunk at once).
        sdpa: fused attention (``False``: eager attention, whose ``B × heads × T × T`` scores and
            probabilities are kept for backward).
        concept_tokens: trainable rows per matrix (``<sks>`` + 16 + 16 by default).
        device: ``cuda`` or ``cpu`` (selects the runtime overhead).
        gpu: key of :data:`GPUS` for the time estimate.
        utilisation: the share of the GPU's dense peak a step achieves.
    """

    quant: str = "bf16"
    checkpointing: bool = False
    batch: int = 4
    seq: int = 1500
    labelled_fraction: float = 0.6
    logits_chunk: int = 1024
    label_only: bool = True
    rows_only: bool = True
    capped_chunks: bool = True
    row_upcast: bool = True
    sdpa: bool = True
    concept_tokens: int = 33
    device: str = "cuda"
    gpu: str = "h100"
    utilisation: float = 0.4

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise BenchError(f"quant must be one of {list(QUANTS)}, got {self.quant!r}")
        if self.batch < 1 or self.seq < 1:
            raise BenchError(f"batch and seq must be positive, got {self.batch} and {self.seq}")
        if not 0 < self.labelled_fraction <= 1:
            raise BenchError(f"labelled_fraction must be in (0, 1], got {self.labelled_fraction}")
        if self.logits_chunk < 1 or self.concept_tokens < 1:
            raise BenchError("logits_chunk and concept_tokens must be positive")
        if self.device not in RUNTIME_OVERHEAD:
            raise BenchError(f"device must be one of {sorted(RUNTIME_OVERHEAD)}, got {self.device!r}")
        if self.gpu not in GPUS:
            raise BenchError(f"gpu must be one of {sorted(GPUS)}, got {self.gpu!r}")
        if not 0 < self.utilisation <= 1:
            raise BenchError(f"utilisation must be in (0, 1], got {self.utilisation}")

    @property
    def activation_bytes(self) -> int:
        """Width of activations: fp32 models compute in fp32, everything else in bf16."""
        return 4 if self.quant == "fp32" else 2


@dataclass
class Estimate:
    """Bytes and FLOPs of one step (see the module docstring for what each term holds)."""

    model: str
    options: dict[str, Any]
    params: int
    parameter_bytes: int
    trainable_bytes: int
    activation_bytes: int
    logits_bytes: int
    runtime_bytes: int
    flops: float
    gpu: str
    gpu_tflops: float
    seconds_per_step: float

    @property
    def training_bytes(self) -> int:
        """What training adds on top of the loaded model (what ``bench train`` measures)."""
        return self.trainable_bytes + self.activation_bytes + self.logits_bytes + self.runtime_bytes

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.training_bytes

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["training_bytes"] = self.training_bytes
        out["total_bytes"] = self.total_bytes
        return out


def parameter_bytes(shape: ModelShape, quant: str) -> int:
    """Bytes of the frozen weights; quantized formats keep embedding and head in bf16."""
    layers = shape.num_layers * shape.layer_params
    if quant == "fp32":
        return 4 * shape.total_params
    if quant == "bf16":
        return 2 * shape.total_params
    # NF4: 4 bits + one fp32 absmax per 64 weights; int8: 1 byte + one fp32 scale per output row.
    per_weight = 0.5 + 4 / 64 if quant == "4bit" else 1.0
    return int(layers * per_weight) + 2 * shape.matrix_params


def estimate(shape: ModelShape, options: EstimateOptions) -> Estimate:
    """Memory and time of one training step of ``shape`` under ``options``."""
    o = options
    a = o.activation_bytes
    h, kv, inter, n_layers, vocab = (
        shape.hidden_size,
        shape.kv_size,
        shape.intermediate_size,
        shape.num_layers,
        shape.vocab_size,
    )
    tokens = o.batch * o.seq
    labelled = max(1, int(tokens * o.labelled_fraction))

    # Trainable state: parameter + grad + two AdamW moments.
    if o.rows_only:
        trainable = 2 * o.concept_tokens * h * 4 * 4
    else:
        trainable = shape.matrix_params * (4 if a == 4 else 2) * 4

    # Activations (per token and layer): norms' fp32 inputs, q/k norms, attention in/out, MLP gate/up.
    per_token_layer = a * (3 * h + 3 * kv + 3 * inter) + 4 * 2 * h
    stream = a * h  # one hidden-state row
    if o.checkpointing:
        # Each layer's input, plus one layer recomputed for backward and its gradient transients.
        activations = tokens * (n_layers * stream + per_token_layer + a * (2 * inter + 4 * h))
    else:
        activations = tokens * (n_layers * per_token_layer + a * (2 * inter + 4 * h))
    if not o.sdpa:
        # Eager attention keeps each layer's probabilities (and the masked scores) for backward, and
        # makes a float32 softmax transient: for one recomputed layer under checkpointing, else all.
        scores = o.batch * shape.num_heads * o.seq**2
        activations += scores * (2 * a * (1 if o.checkpointing else n_layers) + 4)

    # Logits. Label-only (one chunk at a time, in the head's dtype, the chunk capped at
    # LOGITS_CHUNK_BYTES on a CPU, LOGITS_CHUNK_BYTES_GPU on a GPU): the chunk with the concept columns spliced in, and the copy autograd makes
    # to route the gradient (written over the logits) past them; plus UPCAST_ROWS rows in float32
    # and the shifted temporary ``logsumexp`` makes of them. Full logits (every position at once):
    # the head's output, an fp32 copy in bf16, the shifted copy the loss reshapes, the log-softmax
    # output and its gradient.
    if o.label_only:
        cap = LOGITS_CHUNK_BYTES if o.device == "cpu" else LOGITS_CHUNK_BYTES_GPU
        rows = min(o.logits_chunk, cap // (4 * vocab) if o.capped_chunks else o.logits_chunk, labelled)
        # float32 chunks are worked on in place, so only low-precision ones upcast whole without row_upcast.
        whole = not o.row_upcast and a < 4
        upcast = (rows if whole else min(UPCAST_ROWS, rows)) * vocab * (8 if a < 4 else 4)
        # Plus the labelled hidden states and their gradient (held until backward), targets, weights, CE.
        logits = rows * vocab * 2 * a + upcast + labelled * (2 * a * h + 16)
    else:
        upcast = 4 if a < 4 else 0
        logits = tokens * vocab * (a + upcast + 12)

    # FLOPs: forward, backward for activations only (no weight grads), plus recomputation.
    linear_fwd = 2 * tokens * n_layers * shape.layer_params
    attn_fwd = 2 * o.batch * o.seq**2 * h * n_layers  # causal: half of 4·B·T²·H per layer
    logit_rows = labelled if o.label_only else tokens
    head_fwd = 2 * logit_rows * h * vocab
    forward = linear_fwd + attn_fwd + head_fwd
    backward = linear_fwd + 2 * attn_fwd + head_fwd
    if not o.rows_only:
        backward += head_fwd  # the whole head's weight gradient
    # The label-only loss takes its head gradient in forward, so only checkpointing recomputes.
    recompute = linear_fwd + attn_fwd if o.checkpointing else 0
    flops = float(forward + backward + recompute)
    gpu_name, tflops = GPUS[o.gpu]
    return Estimate(
        model=shape.name,
        options=asdict(o),
        params=shape.total_params,
        parameter_bytes=parameter_bytes(shape, o.quant),
        trainable_bytes=int(trainable),
        activation_bytes=int(activations),
        logits_bytes=int(logits),
        runtime_bytes=RUNTIME_OVERHEAD[o.device],
        flops=flops,
        gpu=gpu_name,
        gpu_tflops=tflops,
        seconds_per_step=flops / (tflops * 1e12 * o.utilisation),
    )


def options_for_run(run: dict[str, Any], batch_size: int) -> EstimateOptions:
    """Estimate options that describe a ``bench train`` run: its features and its tokens per step.

    Args:
        run: a worker result (with its ``steps``) or a summary row of ``bench train``'s JSON.
        batch_size: samples per step of that run.
    """
    if isinstance(run.get("steps"), list):
        steps = run["steps"]
        padded = sum(s["padded_tokens"] for s in steps) / len(steps)
        labelled = sum(s["labelled_tokens"] for s in steps) / len(steps)
    else:
        # Summary rows hold rates over the same time, so their ratios give tokens per sample.
        padded = run["padded_tokens_per_s"] / run["samples_per_s"] * batch_size
        labelled = run["labelled_tokens_per_s"] / run["samples_per_s"] * batch_size
    f = run["features"]
    return EstimateOptions(
        quant="fp32" if run.get("dtype", "float32") == "float32" else "bf16",
        checkpointing=f["checkpointing"],
        batch=batch_size,
        seq=max(1, round(padded / batch_size)),
        labelled_fraction=min(1.0, labelled / padded),
        label_only=f["label_only"],
        rows_only=f["rows_only"],
        capped_chunks=f.get("capped_chunks", True),
        row_upcast=f.get("row_upcast", True),
        sdpa=f.get("sdpa", True),
        device="cuda" if str(run["device"]).startswith("cuda") else "cpu",
    )


def validate(shape: ModelShape, run: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Compare the estimated training memory with one measured ``bench train`` run.

    Returns:
        ``{"estimated_mb", "measured_mb", "relative_error", "within_tolerance", "tolerance"}``.
    """
    est = estimate(shape, options_for_run(run, batch_size))
    measured = run["train_memory_mb"] * MB
    rel = (est.training_bytes - measured) / measured
    return {
        "model": shape.name,
        "features": run["features"],
        "estimated_mb": est.training_bytes / MB,
        "measured_mb": measured / MB,
        "relative_error": rel,
        "tolerance": TOLERANCE,
        "within_tolerance": abs(rel) <= TOLERANCE,
    }


# The estimate's categories and the measured breakdown's categories (memory.CATEGORIES) they cover.
BREAKDOWN_CATEGORIES = {
    "trainable": ("trainable_parameters", "optimizer_state"),
    "activations": ("activations", "gradients", "inputs_and_other"),
    "logits": ("logits_max",),
    "runtime": ("allocator_slack",),
}


def check_breakdown(shape: ModelShape, run: dict[str, Any], batch_size: int) -> dict[str, dict[str, float]]:
    """The estimate's categories next to a measured ``bench train`` breakdown's, in MB.

    The estimate is made for the profiled batch itself (its padded and labelled tokens), not the
    run's average batch. Activations cover the profile's activations, the gradients autograd passes
    between layers and other temporaries; logits are the most logits live at any time of the step
    (the estimate's logits also hold the labelled hidden states and their gradient, which the profile
    files under activations and gradients); runtime is the measured allocator slack.

    Args:
        shape: the measured model's shape.
        run: a worker result or summary row with a ``breakdown``.
        batch_size: samples per step of that run.

    Returns:
        ``{category: {"estimated_mb", "measured_mb"}}`` for :data:`BREAKDOWN_CATEGORIES` and ``total``.
    """
    b = run["breakdown"]
    padded = max(1, b["batch_padded_tokens"])
    opts = options_for_run(run, batch_size)
    opts.seq = max(1, round(padded / batch_size))
    opts.labelled_fraction = min(1.0, max(1, b["batch_labelled_tokens"]) / padded)
    est = estimate(shape, opts)
    estimated = {
        "trainable": est.trainable_bytes,
        "activations": est.activation_bytes,
        "logits": est.logits_bytes,
        "runtime": est.runtime_bytes,
        "total": est.training_bytes,
    }
    out = {
        name: {"estimated_mb": estimated[name] / MB, "measured_mb": sum(b[k] for k in keys)}
        for name, keys in BREAKDOWN_CATEGORIES.items()
    }
    out["total"] = {"estimated_mb": estimated["total"] / MB, "measured_mb": b["train_memory"]}
    return out


def format_estimate(est: Estimate) -> str:
    """A short human-readable report of :func:`estimate`'s result."""
    o = est.options
    lines = [
        f"{est.model}: {est.params / 1e9:.2f}B parameters, {o['quant']}, "
        f"{'checkpointing' if o['checkpointing'] else 'no checkpointing'}, batch {o['batch']} x {o['seq']} tokens "
        f"({o['labelled_fraction']:.0%} labelled)",
        f"  parameters   {est.parameter_bytes / GB:8.2f} GB",
        f"  trainable    {est.trainable_bytes / GB:8.4f} GB (rows, grads, AdamW moments)",
        f"  activations  {est.activation_bytes / GB:8.2f} GB",
        f"  logits       {est.logits_bytes / GB:8.2f} GB",
        f"  runtime      {est.runtime_bytes / GB:8.2f} GB",
        f"  total        {est.total_bytes / GB:8.2f} GB",
        f"  FLOPs/step   {est.flops / 1e12:8.1f} TFLOP (forward + activation-only backward"
        f"{' + recompute' if o['checkpointing'] else ''})",
        f"  time/step    {est.seconds_per_step:8.3f} s on {est.gpu} ({est.gpu_tflops:.0f} TFLOPs) "
        f"at {o['utilisation']:.0%} utilisation",
    ]
    return "\n".join(lines)


def add_estimate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``bench estimate`` arguments to ``parser`` and set ``func`` to :func:`run_estimate`."""
    parser.add_argument(
        "--model-config", default="anole-7b", help="anole-7b, tiny, small, anole-tiny or a config DIR"
    )
    parser.add_argument("--quant", default="bf16", choices=list(QUANTS))
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1500)
    parser.add_argument("--labelled-fraction", type=float, default=0.6)
    parser.add_argument("--full-logits", action="store_true", help="logits at every position")
    parser.add_argument("--full-matrices", action="store_true", help="AdamW over whole embedding/head")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    parser.add_argument("--utilisation", type=float, default=0.4)
    parser.add_argument("--json", metavar="OUT.json", help="also write the estimate as JSON")
    parser.set_defaults(func=run_estimate)
    return parser


def run_estimate(args: argparse.Namespace) -> int:
    """Run ``yochameleon bench estimate``."""
    est = estimate(
        model_shape(args.model_config),
        EstimateOptions(
            quant=args.quant,
            checkpointing=args.checkpointing,
            batch=args.batch,
            seq=args.seq,
            labelled_fraction=args.labelled_fraction,
            label_only=not args.full_logits,
            rows_only=not args.full_matrices,
            gpu=args.gpu,
            utilisation=args.utilisation,
        ),
    )
    print(format_estimate(est))
    if args.json:
        Path(args.json).write_text(json.dumps(est.as_dict(), indent=2))
    return 0
