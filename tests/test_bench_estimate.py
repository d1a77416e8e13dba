"""The step estimator: Anole-7B arithmetic, monotonic behaviour, configs, and measured tolerance."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from yochameleon.eval.bench.estimate import (
    GB,
    TOLERANCE,
    EstimateOptions,
    ModelShape,
    estimate,
    model_shape,
    options_for_run,
    parameter_bytes,
    validate,
)
from yochameleon.eval.bench.reference import BenchError
from yochameleon.eval.bench.train_bench import BenchOptions, Features, _worker_spec, run_in_subprocess
from yochameleon.train.loss import LOGITS_CHUNK_BYTES, UPCAST_ROWS


def test_anole_7b_parameters_and_memory():
    shape = model_shape("anole-7b")
    assert 6.9e9 < shape.total_params < 7.1e9
    assert parameter_bytes(shape, "bf16") == 2 * shape.total_params
    # 4-bit layers plus bf16 embedding/head: well under a third of bf16.
    assert parameter_bytes(shape, "4bit") < parameter_bytes(shape, "bf16") / 2.5
    assert parameter_bytes(shape, "bf16") > parameter_bytes(shape, "8bit") > parameter_bytes(shape, "4bit")
    bf16 = estimate(shape, EstimateOptions(quant="bf16", batch=4, seq=1500))
    small = estimate(shape, EstimateOptions(quant="4bit", checkpointing=True, batch=4, seq=1500))
    assert small.total_bytes < 16 * GB < bf16.total_bytes
    assert small.activation_bytes < bf16.activation_bytes / 5
    # Checkpointing recomputes the forward pass: more FLOPs, slower step.
    assert small.flops > bf16.flops and small.seconds_per_step > bf16.seconds_per_step
    # Forward alone is 2 FLOPs per weight per token; a step is more than that and less than 4x.
    forward_linear = 2 * 4 * 1500 * shape.num_layers * shape.layer_params
    assert 2 * forward_linear < bf16.flops < 4 * forward_linear


def test_fast_path_features_lower_the_estimate():
    shape = model_shape("small")
    ours = estimate(shape, EstimateOptions(quant="fp32", checkpointing=True, seq=1100, device="cpu"))
    full_logits = estimate(
        shape, EstimateOptions(quant="fp32", checkpointing=True, seq=1100, label_only=False)
    )
    full_matrices = estimate(
        shape, EstimateOptions(quant="fp32", checkpointing=True, seq=1100, rows_only=False)
    )
    no_ckpt = estimate(shape, EstimateOptions(quant="fp32", seq=1100))
    assert full_logits.logits_bytes > ours.logits_bytes
    assert full_matrices.trainable_bytes > 100 * ours.trainable_bytes
    assert no_ckpt.activation_bytes > ours.activation_bytes
    assert full_logits.flops > ours.flops > no_ckpt.flops


def test_eager_attention_and_whole_chunk_upcasts_raise_the_estimate_by_their_tensors():
    shape = model_shape("anole-tiny")
    base = EstimateOptions(quant="bf16", checkpointing=True, batch=4, seq=320, device="cpu")
    ours = estimate(shape, base)
    eager = estimate(shape, replace(base, sdpa=False))
    # One recomputed layer's bf16 probabilities and masked scores, plus a float32 softmax transient.
    assert eager.activation_bytes - ours.activation_bytes == 4 * shape.num_heads * 320**2 * (2 * 2 + 4)
    whole = estimate(shape, replace(base, row_upcast=False))
    rows = LOGITS_CHUNK_BYTES // (4 * shape.vocab_size)
    assert whole.logits_bytes - ours.logits_bytes == (rows - UPCAST_ROWS) * shape.vocab_size * 8
    # float32 chunks are worked on in place: nothing is upcast, whole or by rows.
    fp32 = replace(base, quant="fp32")
    assert estimate(shape, replace(fp32, row_upcast=False)).logits_bytes == estimate(shape, fp32).logits_bytes
    run = {
        "features": asdict(Features().without("sdpa").without("row_upcast")),
        "device": "cpu",
        "steps": [{"padded_tokens": 1280, "labelled_tokens": 640}],
    }
    opts = options_for_run(run, 4)
    assert (opts.sdpa, opts.row_upcast, opts.seq) == (False, False, 320)


def test_shapes_from_builtins_and_config_dirs(tmp_path):
    tiny = model_shape("tiny")
    assert (tiny.hidden_size, tiny.vocab_size, tiny.image_tokens) == (256, 1536, 64)
    assert model_shape("small").vocab_size == 65536 and model_shape("small").image_tokens == 1024
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "text_config": {
                    "hidden_size": 64,
                    "num_hidden_layers": 2,
                    "intermediate_size": 128,
                    "num_attention_heads": 4,
                    "vocab_size": 1000,
                }
            }
        )
    )
    shape = model_shape(str(tmp_path))
    assert (shape.hidden_size, shape.num_kv_heads, shape.vocab_size) == (64, 4, 1000)


def test_bad_estimator_inputs(tmp_path):
    with pytest.raises(BenchError, match="model-config"):
        model_shape("gpt-9")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BenchError, match="not valid JSON"):
        model_shape(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(BenchError, match="lacks"):
        model_shape(str(tmp_path))
    with pytest.raises(BenchError, match="divisible"):
        ModelShape("x", 65, 2, 128, 4, 4, 100)
    for bad in (
        {"quant": "3bit"},
        {"batch": 0},
        {"labelled_fraction": 0},
        {"gpu": "tpu"},
        {"utilisation": 2},
    ):
        with pytest.raises(BenchError):
            EstimateOptions(**bad)


def _measure(model_dir, features: Features, steps: int = 1) -> dict:
    options = BenchOptions(model=str(model_dir), steps=steps, threads=1, device="cpu")
    return run_in_subprocess(_worker_spec(options, model_dir, features), timeout=600)


def test_estimate_within_tolerance_of_measured_peak_on_tiny(tiny_dir):
    run = _measure(tiny_dir, Features())
    check = validate(model_shape("tiny"), run, batch_size=4)
    assert check["measured_mb"] > 0
    assert check["within_tolerance"], check
    assert check["tolerance"] == TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("features", [Features(), Features.reference()], ids=["ours", "reference"])
def test_estimate_within_tolerance_of_measured_peak_on_small(features):
    from yochameleon.eval.bench.train_bench import resolve_model

    run = _measure(resolve_model("small"), features)
    check = validate(model_shape("small"), run, batch_size=4)
    assert check["within_tolerance"], check
