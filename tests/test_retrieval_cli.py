"""`yochameleon index` and `yochameleon bench retrieval` through argparse, and the benchmark itself (tiny)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from yochameleon.errors import ConfigError
from yochameleon.retrieval import load_index
from yochameleon.retrieval.bench import bench_retrieval, format_bench, synthetic_vectors
from yochameleon.retrieval.cli import add_bench_retrieval_args, register

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yochameleon")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    bench = subparsers.add_parser("bench").add_subparsers(dest="bench_command", required=True)
    add_bench_retrieval_args(bench.add_parser("retrieval"))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    root = tmp_path / "pool"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((40, 40)).save(root / f"{i}.png")
    return root


def test_index_command_with_test_embedder_builds_then_reuses(pool: Path, tmp_path: Path, capsys):
    out = tmp_path / "idx"
    argv = ["index", str(pool), "--out", str(out), "--embedder", "test", "--dim", "24", "--no-progress"]
    assert _run(argv) == 0
    printed = capsys.readouterr().out
    assert "indexed 7 images" in printed and "embedded 7, reused 0" in printed
    assert load_index(out).dim == 24
    assert _run(argv) == 0
    assert "embedded 0, reused 7" in capsys.readouterr().out


def test_index_command_open_clip_needs_a_weight_source(pool: Path, tmp_path: Path, capsys):
    config = tmp_path / "cli-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    base = ["index", str(pool), "--out", str(tmp_path / "idx"), "--embedder", "open_clip", "--no-progress"]
    with pytest.raises(ConfigError, match="--random-weights"):
        _run(base + ["--model-config", str(config)])
    assert (
        _run(
            base + ["--model-config", str(config), "--random-weights", "--kind", "hnsw", "--batch-size", "3"]
        )
        == 0
    )
    assert "indexed 7 images" in capsys.readouterr().out
    index = load_index(tmp_path / "idx")
    assert index.kind == "hnsw" and index.identity["model"] == "cli-tiny-clip"


def test_index_command_rejects_bad_flag_combinations(pool: Path, tmp_path: Path, capsys):
    base = ["index", str(pool), "--out", str(tmp_path / "idx")]
    with pytest.raises(SystemExit):  # argparse: mutually exclusive
        _run(base + ["--embedder", "open_clip", "--pretrained", "openai", "--weights", "w.pt"])
    with pytest.raises(SystemExit):
        _run(base + ["--embedder", "siglip"])
    with pytest.raises(SystemExit):
        _run(base + ["--embedder", "test", "--kind", "annoy"])
    capsys.readouterr()
    with pytest.raises(ConfigError, match="no open_clip options"):
        _run(base + ["--embedder", "test", "--model", "ViT-B-32"])
    with pytest.raises(ConfigError, match="batch-size"):
        _run(base + ["--embedder", "test", "--batch-size", "0"])


def test_bench_retrieval_tiny_reports_all_figures(tmp_path: Path, capsys):
    result = bench_retrieval(n_exact=500, n_approx=3000, dim=16, n_queries=20, k=5, progress=False)
    for section in ("exact", "approx"):
        row = result[section]
        assert row["build_s"] >= 0 and row["search_ms_per_query"] > 0 and "peak_rss_delta_mb" in row
    assert result["exact"]["n"] == 500 and result["approx"]["n"] == 3000
    assert result["approx"]["params"]["kind"] == "ivf" and result["approx"]["params"]["nlist"] >= 1
    assert 0.5 <= result["approx"]["recall_at_k"] <= 1.0
    assert "recall@5" in format_bench(result)

    hnsw = bench_retrieval(
        n_exact=200, n_approx=1000, dim=8, n_queries=5, k=3, approx_kind="hnsw", progress=False
    )
    assert hnsw["approx"]["params"]["kind"] == "hnsw" and hnsw["approx"]["recall_at_k"] > 0.5

    json_path = tmp_path / "bench.json"
    argv = ["bench", "retrieval", "--n-exact", "300", "--n-approx", "800", "--dim", "8", "--queries", "4"]
    assert _run(argv + ["--no-progress", "--json", str(json_path)]) == 0
    assert "recall@10" in capsys.readouterr().out
    assert json.loads(json_path.read_text())["approx"]["n"] == 800


def test_bench_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="n_exact"):
        bench_retrieval(n_exact=0, progress=False)
    with pytest.raises(ConfigError, match="approx_kind"):
        bench_retrieval(n_exact=10, n_approx=10, dim=4, approx_kind="lsh", progress=False)
    with pytest.raises(ConfigError, match="k must"):
        bench_retrieval(n_exact=10, n_approx=10, dim=4, k=0, progress=False)


def test_synthetic_vectors_are_unit_clustered_and_seeded():
    first = synthetic_vectors(1000, 32, seed=3, clusters=10)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(first, synthetic_vectors(1000, 32, seed=3, clusters=10))
    # Clustered: each vector's nearest other vector is far more similar than in uniform noise.
    sims = first[:100] @ first.T
    np.fill_diagonal(sims[:, :100], -1)
    assert np.median(sims.max(axis=1)) > 0.5
