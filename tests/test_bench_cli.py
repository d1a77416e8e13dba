"""The ``bench`` command: subcommands, the estimate report and JSON, and clear errors."""

from __future__ import annotations

import json

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
