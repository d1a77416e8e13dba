"""CLIP-I is computed by CLIP: the eval command's embedder, MyVLM's head, and the embedder named in results."""

from __future__ import annotations

import json

import pytest
import torch

from yochameleon.cli import main
from yochameleon.errors import ConfigError
from yochameleon.eval.report import markdown_table
from yochameleon.eval.schema import ConceptResult, SchemaError, load_summary, summarize
from yochameleon.retrieval import (
    OpenClipEmbedder,
    TestEmbedder,
    build_index,
    describe_embedder,
    identities_match,
    resolve_embedder,
)

# A tiny random-init OpenCLIP architecture (nothing can be downloaded in tests).
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A concept folder, a pool, OpenCLIP weights on disk, an OpenCLIP index, a test-embedder index and
    a test directory."""
    from yochameleon.demo import make_concept_folder, make_pool

    root = tmp_path_factory.mktemp("clip_i")
    config = root / "yochameleon-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    clip = OpenClipEmbedder(model_config=config, random_weights=True)
    weights = root / "tiny-clip.pt"
    torch.save(clip._net.state_dict(), weights)
    concept = make_concept_folder(root)
    pool = make_pool(root, per_photo=1)
    build_index(pool, root / "clip-index", clip, progress=False)
    build_index(pool, root / "test-index", TestEmbedder(), progress=False)
    photos = sorted((concept / "photos").glob("*.png"))
    (root / "test" / "positives").mkdir(parents=True)
    for f in photos[:1]:
        (root / "test" / "positives" / f.name).write_bytes(f.read_bytes())
    return {
        "root": root,
        "config": config,
        "weights": weights,
        "clip": clip,
        "concept": concept,
        "pool": pool,
    }


def test_resolve_embedder_takes_openclip_options_then_the_index_and_test_only_by_name(world):
    root = world["root"]
    given = resolve_embedder(model_config=world["config"], weights=world["weights"])
    assert given.identity["kind"] == "open_clip" and given.identity["weights_sha256"]
    from_index = resolve_embedder(index_dir=root / "clip-index")
    assert identities_match(from_index.identity, world["clip"].identity)
    # Options win over the index.
    assert resolve_embedder(
        model_config=world["config"], weights=world["weights"], index_dir=root / "clip-index"
    ).identity["weights_sha256"]

    assert isinstance(resolve_embedder("test"), TestEmbedder)
    with pytest.raises(ConfigError, match="test embedder, which is not CLIP"):
        resolve_embedder(index_dir=root / "test-index")
    with pytest.raises(ConfigError, match="no image embedder"):
        resolve_embedder()
    with pytest.raises(ConfigError, match="takes no OpenCLIP options"):
        resolve_embedder("test", pretrained="openai")
    with pytest.raises(ConfigError, match="unknown embedder"):
        resolve_embedder("dino")


def test_describe_embedder_names_the_model_and_its_weights(world):
    sha = world["clip"].identity
    assert describe_embedder(sha) == "OpenCLIP yochameleon-tiny-clip (random init, seed 0; not trained)"
    loaded = OpenClipEmbedder(model_config=world["config"], weights=world["weights"])
    assert describe_embedder(loaded.identity).startswith("OpenCLIP yochameleon-tiny-clip (weights sha256 ")
    assert "not CLIP" in describe_embedder(TestEmbedder().identity)
    pretrained = {"kind": "open_clip", "model": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"}
    assert describe_embedder(pretrained) == "OpenCLIP ViT-H-14 (pretrained laion2b_s32b_b79k)"


def _eval(world, model, out, *extra):
    root = world["root"]
    argv = ["eval", "--model", str(model), "--method", "none", "--concept", str(world["concept"])]
    argv += ["--test-dir", str(root / "test"), "--out", str(out), *extra]
    return main(argv)


def test_eval_scores_clip_i_with_openclip_and_names_it(world, tiny_dir, tmp_path, capsys):
    weights = ["--model-config", str(world["config"]), "--weights", str(world["weights"])]
    assert _eval(world, tiny_dir, tmp_path / "given", *weights) == 0
    summary = load_summary(tmp_path / "given" / "report.json")
    name = summary["embedders"]["clip_i"]
    assert name.startswith("OpenCLIP yochameleon-tiny-clip (weights sha256 ")
    assert summary["per_concept"][0]["clip_i"] is not None
    assert summary["per_concept"][0]["embedders"] == {"clip_i": name}
    assert f"CLIP-I computed with {name}." in (tmp_path / "given" / "report.md").read_text()

    # By default, the embedder stored with the index.
    assert _eval(world, tiny_dir, tmp_path / "index", "--index", str(world["root"] / "clip-index")) == 0
    by_index = load_summary(tmp_path / "index" / "report.json")
    assert by_index["embedders"]["clip_i"] == describe_embedder(world["clip"].identity)

    # The test embedder only when asked for by name; never by default.
    assert _eval(world, tiny_dir, tmp_path / "test", "--embedder", "test") == 0
    assert "not CLIP" in load_summary(tmp_path / "test" / "report.json")["embedders"]["clip_i"]
    capsys.readouterr()
    assert _eval(world, tiny_dir, tmp_path / "refused", "--index", str(world["root"] / "test-index")) == 2
    assert "not CLIP" in capsys.readouterr().err
    assert _eval(world, tiny_dir, tmp_path / "nothing") == 2
    assert "no image embedder" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_myvlm_head_uses_the_index_embedder_or_the_test_one_by_name(world, backend, tmp_path):
    from yochameleon.baselines import ConceptData, build_method

    photos = sorted((world["concept"] / "photos").glob("*.png"))
    negatives = sorted(world["pool"].glob("*.png"))[:4]
    data = ConceptData("sks", world["concept"], photos, index_dir=world["root"] / "clip-index")
    myvlm = build_method("myvlm", backend, negatives=negatives, steps=1)
    myvlm.fit(data, tmp_path)
    assert identities_match(myvlm.embedder.identity, world["clip"].identity)
    assert myvlm.concepts[0].head.linear.in_features == TINY_CLIP["embed_dim"]
    myvlm.close()

    with pytest.raises(ConfigError, match="not CLIP"):
        build_method("myvlm", backend, negatives=negatives, steps=1).fit(
            ConceptData("sks", world["concept"], photos, index_dir=world["root"] / "test-index"), tmp_path
        )
    by_name = build_method("myvlm", backend, negatives=negatives, steps=1, embedder="test")
    by_name.fit(data, tmp_path)
    assert isinstance(by_name.embedder, TestEmbedder)
    by_name.close()


def test_results_from_two_embedders_are_not_summarized_together():
    a = ConceptResult("none", "a", clip_i=0.5, embedders={"clip_i": "OpenCLIP ViT-H-14 (pretrained x)"})
    b = ConceptResult("none", "b", clip_i=0.4, embedders={"clip_i": "OpenCLIP ViT-B-32 (pretrained y)"})
    with pytest.raises(SchemaError, match="cannot be compared"):
        summarize([a, b])
    summary = summarize([a, ConceptResult("none", "c", clip_i=0.4, embedders=a.embedders)])
    assert summary["embedders"] == {"clip_i": "OpenCLIP ViT-H-14 (pretrained x)"}
    assert "CLIP-I computed with OpenCLIP ViT-H-14 (pretrained x)." in markdown_table(summary)
    unnamed = summarize([ConceptResult("none", "a", clip_i=0.5)])
    assert "CLIP-I computed with an embedder the results do not name." in markdown_table(unnamed)
    with pytest.raises(SchemaError, match="embedders must map image metrics"):
        ConceptResult("none", "a", embedders={"vqa": "a VLM"})
