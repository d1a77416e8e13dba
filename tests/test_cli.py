"""The ``yochameleon`` command package: every command registers, import failures surface, ``eval`` checks methods."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from yochameleon import cli
from yochameleon.baselines import method_names
from yochameleon.cli import COMMAND_MODULES, build_parser, main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
COMMANDS = {
    "make-tiny",
    "prepare",
    "train",
    "encoder",
    "encode",
    "ask",
    "generate",
    "relate",
    "index",
    "eval",
    "compare",
    "toyworld",
    "bench",
}


def test_every_command_module_registers_its_subcommand():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == COMMANDS
    for name in COMMAND_MODULES:
        assert callable(importlib.import_module(f"yochameleon.cli.{name}").register)


def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch):
    # A module whose own import breaks (a missing dependency, a typo) must not quietly drop its command.
    def _raise(name, *args, **kwargs):
        if name == "yochameleon.cli.broken":
            raise ModuleNotFoundError(
                "No module named 'yochameleon.missing_part'", name="yochameleon.missing_part"
            )
        return real_import(name, *args, **kwargs)

    real_import = importlib.import_module
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*COMMAND_MODULES, "broken"))
    monkeypatch.setattr(cli, "import_module", _raise)
    with pytest.raises(ModuleNotFoundError, match="missing_part"):
        build_parser()


def test_eval_help_lists_every_method_name(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for name in method_names():
        assert name in help_text


def test_eval_refuses_an_unknown_method_before_loading_a_model(monkeypatch, capsys, tmp_path):
    import yochameleon.backends

    def _no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for an unknown method")

    monkeypatch.setattr(yochameleon.backends, "load_backend", _no_model)
    argv = ["eval", "--model", "tiny", "--method", "yochameleon", "--method", "yochamelon"]
    argv += ["--concept", str(tmp_path), "--test-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "invalid choice: 'yochamelon'" in capsys.readouterr().err


def test_eval_encoder_methods_need_encoder_before_loading_a_model(monkeypatch, capsys, tmp_path):
    import yochameleon.backends

    def _no_model(*args, **kwargs):
        raise AssertionError("a model was loaded without an encoder")

    monkeypatch.setattr(yochameleon.backends, "load_backend", _no_model)
    argv = ["eval", "--model", "tiny", "--method", "yochameleon_zeroshot", "--embedder", "test"]
    argv += ["--concept", str(tmp_path), "--test-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "--method yochameleon_zeroshot needs --encoder" in capsys.readouterr().err


def test_prepare_takes_the_recipe_and_records_its_settings(tiny_dir, tmp_path, capsys):
    from data_helpers import make_concept

    from yochameleon.data.manifest import read_header

    concept = make_concept(tmp_path / "cat", 3, qa_lines=[{"question": "What is <sks>?", "answer": "A cat."}])
    data_dir = tmp_path / "data"
    argv = [
        "prepare",
        str(RECIPES / "tiny-cpu.yaml"),
        f"model.name_or_path={tiny_dir}",
        f"concept.concept_dir={concept}",
        f"concept.data_dir={data_dir}",
        "concept.n_g=4",
        "data.n_recognition=6",
    ]
    assert main(argv) == 0
    header = read_header(data_dir)
    assert header["n_g"] == 4 and header["counts"]["recognition/pos"] == 6
    settings = header["settings"]
    assert settings["concept.n_g"] == 4 and settings["data.n_recognition"] == 6
    assert settings["data.n_soft_positives"] == 30  # from the recipe file
    assert settings["concept.concept_dir"] == str(concept.resolve())
    out = capsys.readouterr().out
    assert "recognition/pos" in out and f"prepared {data_dir}" in out and "VQ-encoded now" in out
    # The old form names a folder where the recipe goes: one clear line, exit status 2.
    assert main(["prepare", str(concept)]) == 2
    assert "prepare takes a recipe" in capsys.readouterr().err
