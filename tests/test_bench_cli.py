"""The ``bench`` command: subcommands, the estimate report and JSON, and clear errors."""

from __future__ import annotations

import json

import pytest

from yochameleon.cli import build_parser, main


def test_bench_has_train_estimate_and_retrieval():
    parser = build_parser()
    args = parser.parse_args(["bench", "train", "--model", "tiny", "--steps", "2", "--json", "x.json"])
    assert (args.model, args.steps, args.json) == ("tiny", 2, "x.json")
    args = parser.parse_args(["bench", "estimate", "--quant", "4bit", "--checkpointing"])
    assert args.quant == "4bit" and args.checkpointing and args.model_config == "anole-7b"
    args = parser.parse_args(["bench", "retrieval", "--n-exact", "10"])
    assert args.n_exact == 10 and callable(args.func)


def test_bench_estimate_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "est.json"
    rc = main(
        [
            "bench",
            "estimate",
            "--model-config",
            "anole-7b",
            "--quant",
            "4bit",
            "--checkpointing",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "anole-7b" in text and "parameters" in text and "H100" in text
    data = json.loads(out.read_text())
    assert data["total_bytes"] < 16e9 and data["options"]["checkpointing"] is True
    assert data["total_bytes"] == data["parameter_bytes"] + data["training_bytes"]


def test_bench_bad_inputs_are_clear_errors(tmp_path, capsys):
    assert main(["bench", "train", "--model", str(tmp_path / "missing")]) == 2
    assert "neither" in capsys.readouterr().err
    assert main(["bench", "train", "--model", "tiny", "--steps", "0"]) == 2
    assert "steps must be at least 1" in capsys.readouterr().err
    assert main(["bench", "estimate", "--model-config", "nope"]) == 2
    assert "--model-config" in capsys.readouterr().err
    assert main(["bench", "estimate", "--utilisation", "1.5"]) == 2
    assert "utilisation" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_train_tiny_writes_both_implementations_ablation_and_estimator_check(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "train", "--model", "tiny", "--steps", "1", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert {"ours", "reference", "speedup", "memory_ratio", "loss_diff"} <= set(result)
    assert result["loss_diff"] < 1e-4  # same batch, same loss
    assert result["speedup"] > 0 and result["memory_ratio"] > 0
    offs = [row["feature_off"] for row in result["ablation"]]
    assert offs == [
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
    ]
    for row in result["ablation"]:
        assert row["features"][row["feature_off"]] is False
        assert abs(row["check_loss"] - result["ours"]["check_loss"]) < 1e-4
    checks = {c["configuration"]: c for c in result["estimator_check"]}
    assert set(checks) == {f"{c}, fp32" for c in ("ours", "reference", *(f"{f} off" for f in offs))}
    assert all(c["measured_mb"] > 0 and c["estimated_mb"] > 0 for c in checks.values())
    assert "speedup" in capsys.readouterr().out
