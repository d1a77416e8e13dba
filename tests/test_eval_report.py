"""Reports and ``compare``: the Markdown table, valid PNGs, merged summaries and the CLI subcommand."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from yochameleon.cli import main as cli_main
from yochameleon.cli.compare import register
from yochameleon.eval.report import compare, markdown_table, write_report
from yochameleon.eval.schema import ConceptResult, SchemaError, load_summary, summarize, write_summary


def _run(method, tokens, rec, clip=None, face=None, concepts=("a", "b"), seeds=(0, 1)):
    """Records whose per-record values are ``rec + 0.1 * seed + 0.05 * concept index``."""
    return [
        ConceptResult(
            method,
            c,
            s,
            recognition_weighted=rec + 0.1 * s + 0.05 * i,
            clip_i=None if clip is None else clip + 0.01 * s,
            face_sim=face,
            prompt_tokens=tokens,
        )
        for s in seeds
        for i, c in enumerate(concepts)
    ]


def _summary():
    records = (
        _run("yochameleon", 33, 0.6, clip=0.7) + _run("text_prompt", 64, 0.4, clip=0.5) + _run("none", 0, 0.3)
    )
    return summarize(records, {"model": "tiny"}, n_boot=300)


def _png_ok(path):
    with Image.open(path) as im:
        im.verify()  # raises on a corrupt file
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
        assert len(set(im.convert("L").getdata())) > 5  # something was drawn


def test_markdown_table_rows_cells_and_best(tmp_path):
    s = _summary()
    table = markdown_table(s)
    lines = table.splitlines()
    assert lines[0] == "| method | tokens | Recognition | CLIP-I | n |"  # only metrics that some method has
    ym = s["methods"]["yochameleon"]
    lo, hi = ym["recognition_weighted_ci"]
    # yochameleon values 0.6, 0.65, 0.7, 0.75: mean 0.675, the best recognition mean, so bold.
    assert ym["recognition_weighted"] == pytest.approx(0.675)
    assert f"| yochameleon | 33 | **0.675 ± {(hi - lo) / 2:.3f}** |" in table
    none_row = next(line for line in lines if line.startswith("| none |"))
    assert none_row.endswith("| – | 4 |")  # no CLIP-I: not applicable rather than zero
    # Differences: reference minus method, 0.675 - 0.475 = +0.200 for text_prompt.
    assert "| text_prompt | Recognition | +0.200 |" in table


def test_write_report_files_and_pngs(tmp_path):
    s = _summary()
    paths = write_report(s, tmp_path / "rep")
    assert set(paths) == {"json", "md", "metrics_png", "tokens_png"}
    assert load_summary(paths["json"]) == json.loads(json.dumps(s))
    md = paths["md"].read_text()
    assert md.startswith("# Results") and markdown_table(s) in md and "`model`=tiny" in md
    _png_ok(paths["metrics_png"])
    _png_ok(paths["tokens_png"])


def test_no_tokens_plot_without_clip_i(tmp_path):
    paths = write_report(summarize(_run("none", 0, 0.3)), tmp_path)
    assert "tokens_png" not in paths and not (tmp_path / "tokens_vs_clip_i.png").exists()
    _png_ok(paths["metrics_png"])


def test_write_report_refuses_an_invalid_summary(tmp_path):
    with pytest.raises(SchemaError, match="schema_version"):
        write_report({"methods": {}}, tmp_path)


def test_compare_merges_files_and_run_directories(tmp_path):
    write_summary(tmp_path / "one.json", summarize(_run("yochameleon", 33, 0.6, clip=0.7)))
    write_report(summarize(_run("text_prompt", 64, 0.4, clip=0.5)), tmp_path / "run2")
    merged = compare([tmp_path / "one.json", tmp_path / "run2"], n_boot=300)
    assert list(merged["methods"]) == ["yochameleon", "text_prompt"]
    assert len(merged["per_concept"]) == 8
    assert set(merged["config"]) == {str(tmp_path / "one.json"), str(tmp_path / "run2" / "report.json")}
    # The merged differences exist although neither input had both methods: 0.675 - 0.475.
    assert merged["differences"]["text_prompt"]["recognition_weighted"]["mean"] == pytest.approx(0.2)


def test_compare_rejects_bad_inputs(tmp_path):
    write_summary(tmp_path / "one.json", summarize(_run("none", 0, 0.3)))
    with pytest.raises(SchemaError, match="appears in both"):
        compare([tmp_path / "one.json", tmp_path / "one.json"])
    with pytest.raises(SchemaError, match="at least one"):
        compare([])
    with pytest.raises(SchemaError, match="does not exist"):
        compare([tmp_path / "empty_run_dir_without_report"])


def test_register_adds_the_compare_subcommand(tmp_path):
    write_summary(tmp_path / "a.json", summarize(_run("yochameleon", 33, 0.6, clip=0.7)))
    write_summary(tmp_path / "b.json", summarize(_run("none", 0, 0.3)))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "o")]
    )
    assert args.reference == "yochameleon" and args.n_boot == 2000
    args.func(args)
    assert (tmp_path / "o" / "report.md").is_file() and (tmp_path / "o" / "metrics.png").is_file()


def test_cli_compare_and_its_clear_error(tmp_path, capsys):
    write_summary(tmp_path / "a.json", summarize(_run("yochameleon", 33, 0.6, clip=0.7)))
    assert (
        cli_main(["compare", str(tmp_path / "a.json"), "--out", str(tmp_path / "o"), "--n-boot", "100"]) == 0
    )
    assert "| yochameleon | 33 |" in capsys.readouterr().out
    (tmp_path / "old.json").write_text(json.dumps({"schema_version": 0}))
    assert cli_main(["compare", str(tmp_path / "old.json"), "--out", str(tmp_path / "o2")]) == 2
    assert "schema_version 0, expected 1" in capsys.readouterr().err


def test_contact_sheet_places_rows_of_upscaled_tiles():
    from PIL import Image

    from yochameleon.eval.report import contact_sheet

    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    sheet = contact_sheet([[red, blue], [blue]], scale=2, pad=1)
    assert sheet.size == (2 * 17 + 1, 2 * 17 + 1)
    assert sheet.getpixel((1, 1)) == (255, 0, 0) and sheet.getpixel((18, 1)) == (0, 0, 255)
    assert sheet.getpixel((1, 18)) == (0, 0, 255)
    assert sheet.getpixel((18, 18)) == (255, 255, 255)  # a shorter row leaves a gap
    with pytest.raises(ValueError, match="at least one image"):
        contact_sheet([[]])
