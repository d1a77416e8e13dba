"""Typed configs: YAML recipes, dotted overrides, validation, and every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from yochameleon.config import load_config, parse_override
from yochameleon.errors import ConfigError
from yochameleon.train.config import TrainConfig
from yochameleon.train.encoder import EncoderTrainConfig

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads_validates_and_documents_itself(recipe):
    # Encoder recipes (``yochameleon encoder train``) are their own schema.
    cls = EncoderTrainConfig if recipe.stem.endswith("encoder") else TrainConfig
    cfg = load_config(cls, recipe)
    assert isinstance(cfg, cls)
    header = recipe.read_text().splitlines()
    assert header[0].startswith("#"), "recipes open with a comment header"
    assert any("yochameleon " in line for line in header if line.startswith("#")), "header gives the command"


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"yochameleon-anole7b.yaml", "yollava-anole7b.yaml", "tiny-cpu.yaml"} <= names


def test_recipes_are_found_by_name_as_package_data(tmp_path, monkeypatch):
    from yochameleon.config import recipe_path, shipped_recipes

    assert shipped_recipes() == sorted(p.stem for p in RECIPES)
    # From any working directory: the import system finds them, not a path from __file__.
    monkeypatch.chdir(tmp_path)
    for name in ("tiny-cpu", "tiny-cpu.yaml", "recipes/tiny-cpu.yaml"):
        assert recipe_path(name).read_text() == (RECIPES[0].parent / "tiny-cpu.yaml").read_text()
    own = tmp_path / "tiny-cpu.yaml"
    own.write_text("seed: 3\n")
    assert recipe_path("tiny-cpu.yaml").resolve() == own  # a file of that name wins
    assert load_config(TrainConfig, "tiny-cpu.yaml").seed == 3
    with pytest.raises(
        ConfigError, match="neither a file nor a shipped recipe: multi-concept-tiny, tiny-cpu"
    ):
        recipe_path("tiny-gpu")
    with pytest.raises(ConfigError, match="does not exist"):
        recipe_path(tmp_path / "elsewhere" / "tiny-cpu.yaml")


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(
        TrainConfig,
        RECIPES[0],
        [
            "optim.lr=1e-4",
            "concept.n_g=8",
            "method.self_prompting=false",
            "data.tasks=[recognition, text_qa]",
            "model.quantization=4bit",
        ],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.concept.n_g == 8 and cfg.method.self_prompting is False
    assert cfg.data.tasks == ["recognition", "text_qa"] and cfg.model.quantization == "4bit"


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lrr=1e-3", "did you mean 'lr'"),
        ("optm.lr=1e-3", "did you mean 'optim'"),
        ("concept.n_g=many", "expected an integer"),
        ("method.self_prompting=maybe", "expected true/false"),
        ("data.soft_prompt_form=poem", "not one of"),
        ("data.tasks=[dancing]", "subset of"),
        ("optim.lr=-1", "positive"),
        ("--lr=3", "key.sub=value"),
    ],
)
def test_bad_overrides_fail_clearly(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, None, [override])


def test_unknown_yaml_key_names_nearest(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optim:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_config(TrainConfig, p)


def test_missing_and_invalid_recipe(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, bad)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="n_u=0"):
        load_config(TrainConfig, None, ["concept.shared=true", "concept.n_u=4"])


def test_parse_override_values():
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)


def test_yaml_bool_words_map_back_to_choices():
    assert load_config(TrainConfig, None, ["mixed_precision=no"]).mixed_precision == "no"
