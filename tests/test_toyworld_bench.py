"""The toy-world quality benchmark: config and method validation, concept drawing, test directories, the
summary's CIs and paired differences, the CLI; ``--quick`` end to end on a reduced build (slow)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from yochameleon.errors import ConfigError
from yochameleon.eval.harness import TestSet as HarnessTestSet
from yochameleon.eval.metrics import shuffle_options
from yochameleon.eval.schema import METRICS, ConceptResult, validate_summary
from yochameleon.eval.toyworld import ToyWorld
from yochameleon.eval.toyworld.bench import (
    QUICK_METHODS,
    REQUIRED_ARTIFACTS,
    BenchConfig,
    BenchError,
    bench_methods,
    bench_summary,
    check_artifacts,
    draw_concepts,
    missing_artifacts,
    run_bench,
    write_test_dir,
)
from yochameleon.eval.toyworld.cli import bench_config_from_args, register

# The metrics the toy world measures for every method: the schema's, less clip_t and face_sim, which
# the toy benchmark does not score.
TOY_METRICS = tuple(m for m in METRICS if m not in ("clip_t", "face_sim"))


@pytest.fixture(scope="module")
def world():
    return ToyWorld(0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser


# ---- config ------------------------------------------------------------------------------------------
def test_default_config_is_the_issue_s_benchmark():
    config = BenchConfig()
    assert (config.n_concepts, config.seeds, config.split, config.n_photos) == (8, 2, "heldout", 4)
    assert config.methods == bench_methods()
    train = config.train_config(0)
    # The recipe chosen on the development split: ~250 samples per concept, 4 epochs at lr 1e-3, and
    # 4 understanding tokens; the pool is the build's 10,000 photos (1,000 with --quick).
    assert (train.optim.epochs, train.optim.lr, train.concept.n_u) == (4, 1e-3, 4)
    assert train.data.n_recognition == 80 and train.data.n_soft_positives == 52
    assert train.logging.sample_images == 0
    assert config.pool_size == 10_000 and BenchConfig.create(quick=True).pool_size == 1000


def test_summaries_record_paths_inside_the_checkout_relative_to_it(monkeypatch, tmp_path):
    from yochameleon.eval.toyworld.encoder import ToyEncoderConfig
    from yochameleon.eval.toyworld.relations import RelationsConfig

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    for config in (BenchConfig(), RelationsConfig(), ToyEncoderConfig(out=str(tmp_path))):
        assert config.artifacts == "eval/toyworld/artifacts", config
        assert config.recipe.startswith("recipes/") and (root / config.recipe).is_file()
    monkeypatch.chdir(tmp_path)  # outside the checkout a path stays as given
    assert Path(BenchConfig().artifacts).is_absolute()


def test_quick_sizes_and_explicit_settings_win():
    quick = BenchConfig.create(quick=True)
    assert (quick.n_concepts, quick.seeds, quick.methods, quick.quick) == (2, 1, QUICK_METHODS, True)
    assert QUICK_METHODS == ("none", "yochameleon")
    wider = BenchConfig.create(quick=True, n_concepts=3, methods=["none"], seeds=None)
    assert (wider.n_concepts, wider.methods, wider.seeds) == (3, ("none",), 1)
    assert BenchConfig.create().n_concepts == 8


def test_seed_and_overrides_reach_the_training_config(tmp_path):
    config = BenchConfig.create(artifacts=tmp_path, overrides=["optim.epochs=2", "data.n_recognition=40"])
    train = config.train_config(3)
    assert (train.optim.epochs, train.data.n_recognition, train.seed, train.data.seed) == (2, 40, 3, 3)
    assert train.model.name_or_path == str(tmp_path / "base")
    assert config.to_dict()["overrides"] == ["optim.epochs=2", "data.n_recognition=40"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n_concepts": 0}, "n_concepts"),
        ({"seeds": 0}, "seeds"),
        ({"n_concepts": 33}, "32 identities"),
        ({"split": "dev", "n_concepts": 17}, "16 identities"),
        ({"split": "pretrain"}, "split must be one of heldout, dev"),
        ({"n_photos": 2}, "at least 3 photos"),
        ({"n_hard": 0, "n_easy": 0}, "negatives"),
        ({"pool_size": 10}, "pool_size"),
        ({"n_generated": 0}, "n_generated"),
        ({"concept_seed": -1}, "concept_seed"),
        ({"methods": []}, "no methods selected"),
        ({"methods": ["none", "yochameleon", "none"]}, "listed twice: none"),
        ({"recipe": "/nonexistent/recipe.yaml"}, "does not exist"),
        ({"n_boot": 0}, "n_boot"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(BenchError, match=message):
        BenchConfig.create(**settings)


def test_bad_override_and_unknown_setting_are_refused():
    with pytest.raises(ConfigError, match="optim.epoch"):
        BenchConfig.create(overrides=["optim.epoch=3"])
    with pytest.raises(ConfigError, match="optim.epochs"):
        BenchConfig.create(overrides=["optim.epochs=0"])
    with pytest.raises(BenchError, match="unknown benchmark settings"):
        BenchConfig.create(concepts=3)


def test_default_methods_are_every_harness_method_with_the_reference_rows_last():
    from yochameleon.baselines import method_names
    from yochameleon.baselines.encoded import ENCODER_METHODS

    default = BenchConfig.create().methods
    # Every ablation, none left out; the encoder methods only when named (they need an encoder file).
    assert sorted(default) == sorted(set(method_names()) - set(ENCODER_METHODS))
    ours = [m for m in default if m.startswith("yochameleon")]
    assert default[-len(ours) :] == tuple(ours) and ours[0] == "yochameleon"
    assert {"yochameleon_und_only", "yochameleon_gen_only", "yochameleon_no_soft"} <= set(ours)


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(BenchError) as err:
        BenchConfig.create(methods=["none", "yochameleon_tiny", "llava"])
    text = str(err.value)
    assert "'yochameleon_tiny'" in text and "'llava'" in text
    for name in bench_methods():
        assert name in text
    # Every ablation is accepted by its exact name.
    assert BenchConfig.create(methods=list(bench_methods())).methods == bench_methods()


# ---- encoder methods ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_encoder(tmp_path_factory):
    """An untrained encoder on the committed toy base with the bench recipe's layout (n_g 16, n_u 4)."""
    from data_helpers import untrained_encoder

    from yochameleon.backends import load_backend

    path = tmp_path_factory.mktemp("toy-encoder") / "encoder"
    backend = load_backend(Path(BenchConfig().artifacts) / "base")
    return untrained_encoder(backend, path, n_g=16, n_u=4)


def test_encoder_methods_need_an_encoder_and_the_recipe_s_layout(tmp_path, toy_encoder):
    with pytest.raises(BenchError, match="yochameleon_zeroshot need a concept encoder.*--encoder"):
        BenchConfig.create(methods=["none", "yochameleon_zeroshot"])
    with pytest.raises(BenchError, match="does not exist"):
        BenchConfig.create(methods=["yochameleon_warmstart"], encoder=tmp_path / "nope.safetensors")
    config = BenchConfig.create(
        methods=["yochameleon_zeroshot", "yochameleon_warmstart"], encoder=toy_encoder
    )
    assert config.encoder == str(toy_encoder) and config.to_dict()["encoder"] == str(toy_encoder)
    with pytest.raises(BenchError, match="n_u=4.*n_u=16"):
        BenchConfig.create(
            methods=["yochameleon_warmstart"], encoder=toy_encoder, overrides=["concept.n_u=16"]
        )
    # The default run needs no encoder, and an encoder alone adds no rows.
    assert BenchConfig.create(encoder=toy_encoder).methods == bench_methods()


def test_cli_passes_the_encoder(toy_encoder):
    args = _parser().parse_args(
        ["toyworld", "bench", "--json", "e.json", "--methods", "none", "yochameleon_zeroshot"]
        + ["--encoder", str(toy_encoder)]
    )
    config = bench_config_from_args(args)
    assert config.methods == ("none", "yochameleon_zeroshot") and config.encoder == str(toy_encoder)


def test_encoder_leaks_name_trained_concepts_and_photos(world, tmp_path):
    from data_helpers import untrained_encoder

    from yochameleon.backends import load_backend
    from yochameleon.encoder import file_sha256
    from yochameleon.eval.toyworld.bench import encoder_leaks

    dev = draw_concepts(2, 0, "dev", world)
    folder = world.write_concept_folder(dev[0], tmp_path / dev[0].name)
    photos = sorted((folder / "photos").glob("*.png"))
    backend = load_backend(Path(BenchConfig().artifacts) / "base")
    clean = untrained_encoder(
        backend, tmp_path / "clean", 16, 4, [{"name": "toy-00000000", "photo_sha256": []}]
    )
    assert encoder_leaks(clean, [d.name for d in dev], photos) == []
    leaky = untrained_encoder(
        backend, tmp_path / "leaky", 16, 4, [{"name": dev[1].name, "photo_sha256": [file_sha256(photos[2])]}]
    )
    assert encoder_leaks(leaky, [d.name for d in dev], photos) == [
        f"concept {dev[1].name}",
        f"photo {photos[2]}",
    ]


def test_table_shows_wall_time_per_concept_beside_quality():
    from yochameleon.eval.report import markdown_table
    from yochameleon.eval.toyworld.bench import per_concept_timings

    cells = {"yochameleon": [{"fit": 30.0, "evaluate": 9.0}, {"fit": 34.0, "evaluate": 11.0}], "none": []}
    timings = per_concept_timings(cells)
    assert timings == {
        "yochameleon": {"fit_mean": 32.0, "fit_min": 30.0, "fit_max": 34.0, "evaluate_mean": 10.0, "n": 2}
    }
    summary = bench_summary(_synthetic_records(), {"timings": {"per_concept": timings}}, n_boot=100)
    table = markdown_table(summary).splitlines()
    assert table[0].startswith("| method | tokens | fit s | Recognition")
    main = table[2 : table.index("")]  # the method rows, before the paired differences
    rows = {line.split(" | ")[0][2:]: line for line in main}
    assert "| 32.0 |" in rows["yochameleon"] and "| – |" in rows["none"]
    # Without timings (e.g. `yochameleon compare`) the table has no such column.
    assert "fit s" not in markdown_table(bench_summary(_synthetic_records(), n_boot=100))


# ---- concepts ----------------------------------------------------------------------------------------
def test_concepts_are_seeded_held_out_and_never_pretraining(world):
    first = draw_concepts(8, 0, world=world)
    assert first == draw_concepts(8, 0, world=ToyWorld(0))  # deterministic from the seed alone
    assert len(set(first)) == 8 and set(first) <= set(world.splits["heldout"])
    assert not set(first) & set(world.splits["pretrain"])
    assert not set(first) & set(world.splits["dev"])
    assert draw_concepts(2, 0, world=world) == first[:2]  # --quick's concepts are among the default ones
    other = draw_concepts(8, 1, world=world)
    assert other != first and set(other) <= set(world.splits["heldout"])
    dev = draw_concepts(5, 0, split="dev", world=world)
    assert set(dev) <= set(world.splits["dev"]) and not set(dev) & set(world.splits["heldout"])


def test_concepts_refuse_pretraining_split_and_too_many(world):
    with pytest.raises(BenchError, match="heldout or dev"):
        draw_concepts(2, 0, split="pretrain", world=world)
    with pytest.raises(BenchError, match="cannot draw 17"):
        draw_concepts(17, 0, split="dev", world=world)


def test_test_directory_loads_in_the_harness(world, tmp_path):
    identity = world.splits["dev"][0]
    tests = world.test_set(identity, seed=0, n_positives=3, n_hard=2, n_easy=2, n_vqa=2)
    root = write_test_dir(tests, tmp_path / "test")
    test = HarnessTestSet.load(root)
    labels = [label for _, label in test.recognition]
    assert labels.count("pos") == 3 and labels.count("neg_hard") == 2 and labels.count("neg_easy") == 2
    assert len(test.vqa) == 2 and all((root / item["image"]).is_file() for item in test.vqa)
    assert {item["kind"] for item in test.vqa} == {"twin_location", "other_shape"}
    assert [item["factor"] for item in test.text_qa] == ["shape", "colour", "pattern", "size"]
    for item in test.vqa + test.text_qa:
        shuffled = shuffle_options(item, seed=0)  # the harness's scoring accepts every item
        assert shuffled["correct"] == item["options"][item["answer"]]
    saved = json.loads((root / "identities.json").read_text())
    assert saved["concept"] == identity.to_dict()
    assert all(twin != identity.to_dict() for twin in saved["negatives_hard"])
    # Rewriting replaces the folder rather than mixing two test sets.
    smaller = world.test_set(identity, seed=1, n_positives=1, n_hard=1, n_easy=1, n_vqa=0)
    labels = [label for _, label in HarnessTestSet.load(write_test_dir(smaller, root)).recognition]
    assert labels == ["pos", "neg_hard", "neg_easy"]


# ---- artifacts ---------------------------------------------------------------------------------------
def test_missing_artifacts_are_named_with_the_build_command(tmp_path):
    assert missing_artifacts(tmp_path) == list(REQUIRED_ARTIFACTS)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "scorer.json").write_text("{}")
    assert "base/config.json" not in missing_artifacts(tmp_path)
    with pytest.raises(BenchError) as err:
        check_artifacts(tmp_path)
    text = str(err.value)
    assert "yochameleon toyworld build" in text and "scorer.safetensors" in text
    assert "embedder/toyworld-vit.safetensors" in text and "scorer.json" not in text


def test_run_bench_stops_before_any_work_without_artifacts(tmp_path):
    config = BenchConfig.create(quick=True, artifacts=tmp_path / "nowhere")
    with pytest.raises(BenchError, match="toyworld build"):
        run_bench(config, tmp_path / "out" / "quick.json", progress=False, log=lambda _: None)
    assert not (tmp_path / "out").exists()


# ---- summary: CIs and paired differences -------------------------------------------------------------
def _synthetic_records() -> list[ConceptResult]:
    """Hand-made test inputs (not results): yochameleon beats none by 0.3 on every pair, text_prompt ties."""
    rows = []
    for c, concept in enumerate(("a", "b", "c")):
        for seed in (0, 1):
            jitter = 0.01 * (c + 2 * seed)
            shared = {"concept": concept, "seed": seed, "vqa": 0.5, "text_qa": 0.25 + jitter}
            rows.append(
                ConceptResult(
                    "yochameleon",
                    recognition_weighted=0.8 + jitter,
                    gen_fidelity=0.5,
                    prompt_tokens=32,
                    **shared,
                )
            )
            rows.append(ConceptResult("none", recognition_weighted=0.5 + jitter, **shared))
            rows.append(
                ConceptResult("text_prompt", recognition_weighted=0.8 + jitter, prompt_tokens=9, **shared)
            )
    return rows


def test_summary_has_every_ci_and_paired_differences_against_yochameleon():
    summary = bench_summary(_synthetic_records(), {"split": "heldout"}, n_boot=500)
    validate_summary(summary)
    assert summary["reference"] == "yochameleon" and summary["config"]["split"] == "heldout"
    assert list(summary["methods"]) == ["yochameleon", "none", "text_prompt"]
    for stats in summary["methods"].values():
        assert stats["n"] == 6 and all(m in stats and m + "_ci" in stats for m in METRICS)
    assert summary["methods"]["yochameleon"]["prompt_tokens"] == 32
    better = summary["differences"]["none"]["recognition_weighted"]
    assert better["mean"] == pytest.approx(0.3) and better["n"] == 6
    assert better["ci"][0] > 0 and not better["crosses_zero"]
    tie = summary["differences"]["text_prompt"]["recognition_weighted"]
    assert tie["mean"] == pytest.approx(0.0) and tie["crosses_zero"]
    # A metric only the reference has (generation here) yields no difference rather than a fake one.
    assert "gen_fidelity" not in summary["differences"]["none"]
    assert summary["methods"]["none"]["gen_fidelity"] is None
    assert "yochameleon" not in summary["differences"]


def test_differences_use_only_shared_concept_seed_pairs():
    records = [r for r in _synthetic_records() if not (r.method == "none" and r.concept == "c")]
    summary = bench_summary(records, n_boot=200)
    assert summary["differences"]["none"]["recognition_weighted"]["n"] == 4
    assert summary["methods"]["none"]["n"] == 4


def test_summary_without_the_reference_has_no_differences():
    records = [r for r in _synthetic_records() if r.method != "yochameleon"]
    summary = bench_summary(records, n_boot=200)
    assert summary["reference"] is None and "differences" not in summary


# ---- CLI ---------------------------------------------------------------------------------------------
def test_cli_parses_bench_options():
    args = _parser().parse_args(
        [
            "toyworld",
            "bench",
            "--json",
            "out/b.json",
            "--concepts",
            "3",
            "--concept-seed",
            "5",
            "--seeds",
            "2",
            "--methods",
            "none,yochameleon",
            "myvlm",
            "--split",
            "dev",
            "--override",
            "optim.epochs=2",
            "--artifacts",
            "art",
        ]
    )
    assert args.toyworld_command == "bench" and args.json == "out/b.json"
    config = bench_config_from_args(args)
    assert config.methods == ("none", "yochameleon", "myvlm")
    assert (config.n_concepts, config.concept_seed, config.seeds, config.split) == (3, 5, 2, "dev")
    assert config.overrides == ("optim.epochs=2",) and config.artifacts == "art"
    assert not config.diagnose
    diagnosed = _parser().parse_args(["toyworld", "bench", "--json", "d.json", "--diagnose"])
    assert bench_config_from_args(diagnosed).diagnose


def test_cli_quick_and_defaults():
    quick = bench_config_from_args(_parser().parse_args(["toyworld", "bench", "--quick", "--json", "q.json"]))
    assert (quick.n_concepts, quick.seeds, quick.methods) == (2, 1, QUICK_METHODS)
    full = bench_config_from_args(_parser().parse_args(["toyworld", "bench", "--json", "f.json"]))
    assert full.methods == bench_methods() and full.split == "heldout"
    with pytest.raises(SystemExit):
        _parser().parse_args(["toyworld", "bench"])  # --json is required
    with pytest.raises(SystemExit):
        _parser().parse_args(["toyworld", "bench", "--json", "x.json", "--split", "pretrain"])
    build = _parser().parse_args(["toyworld", "build", "--reduced", "--out", "x"])
    assert build.toyworld_command == "build" and build.reduced


def test_cli_reports_unknown_methods_and_missing_artifacts(tmp_path, capsys):
    from yochameleon.cli import main

    out = str(tmp_path / "b.json")
    assert main(["toyworld", "bench", "--json", out, "--methods", "none,bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) 'bogus'" in err and "yochameleon_no_selfprompt" in err
    assert main(["toyworld", "bench", "--quick", "--json", out, "--artifacts", str(tmp_path / "art")]) == 2
    assert "toyworld build" in capsys.readouterr().err
    assert not Path(out).exists()


# ---- --quick end to end on a reduced build (slow) ----------------------------------------------------
@pytest.fixture
def reduced_artifacts(reduced_toyworld):
    return Path(reduced_toyworld[0].out)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the shared reduced build may be made here
def test_quick_bench_end_to_end(reduced_artifacts, tmp_path, capsys):
    from yochameleon.cli import main

    out = tmp_path / "bench" / "quick.json"
    code = main(
        [
            "toyworld",
            "bench",
            "--quick",
            "--artifacts",
            str(reduced_artifacts),
            "--json",
            str(out),
            "--quiet",
            "--diagnose",
        ]
    )
    assert code == 0
    assert "| yochameleon |" in capsys.readouterr().out  # the table on stdout
    summary = json.loads(out.read_text())
    validate_summary(summary)
    assert list(summary["methods"]) == ["none", "yochameleon"]
    config = summary["config"]
    assert config["split"] == "heldout" and config["seeds"] == [0] and len(config["concepts"]) == 2
    assert config["samples_per_concept"]["mean"] > 50 and config["train"]["epochs"] == 4
    assert {"load", "pool_index", "fit", "evaluate", "total"} <= set(config["timings"]["stages"])
    records = summary["per_concept"]
    assert len(records) == 4 and {r["seed"] for r in records} == {0}
    for method, stats in summary["methods"].items():
        assert stats["n"] == 2
        for metric in TOY_METRICS:
            assert stats[metric] is not None, (method, metric)
            assert stats[metric + "_ci"] is not None, (method, metric)
    assert summary["methods"]["none"]["prompt_tokens"] == 0
    assert summary["methods"]["yochameleon"]["prompt_tokens"] == 1 + 16 + 4  # <sks>, g- and u-tokens
    diffs = summary["differences"]["none"]
    for metric in TOY_METRICS:
        assert diffs[metric]["n"] == 2 and len(diffs[metric]["ci"]) == 2, metric
    # The table and plots of `yochameleon compare` sit beside the JSON.
    assert (out.parent / "report.md").is_file() and (out.parent / "metrics.png").is_file()
    assert "| none |" in (out.parent / "report.md").read_text()
    # A contact sheet per method: a row per concept, its training photos then the generated images.
    from PIL import Image

    n_photos, n_generated = config["bench"]["n_photos"], config["bench"]["n_generated"]
    for method in ("none", "yochameleon"):
        generated = sorted((out.parent / "quick_work" / "images" / method).glob("*/seed0/*.png"))
        assert len(generated) == 2 * n_generated
        sheet = Image.open(out.parent / f"contact_{method}.png")
        side = Image.open(generated[0]).size[0] * 4
        assert sheet.size == ((n_photos + n_generated) * (side + 2) + 2, 2 * (side + 2) + 2)
    assert records[0]["embedders"]["gen_fidelity"] == "toyworld-scorer:identity"
    # --diagnose: one row per trained method, concept and seed, with every look.
    diagnostics = json.loads((out.parent / "diagnostics.json").read_text())
    assert [(d["method"], d["seed"]) for d in diagnostics] == [("yochameleon", 0)] * 2
    for row in diagnostics:
        assert set(row["recognition"]) == {"training", "new", "twins", "random"}
        assert set(row["token_drift"]) == {"sks", "g", "u"} and row["token_drift"]["u"]["embed"] > 0
        assert row["loss_by_kind"]["recognition"]["last"] < row["loss_by_kind"]["recognition"]["first"]
        assert len(row["answers"]) == 3


# ---- the encoder methods end to end on the committed base (slow) -------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_encoder_methods_end_to_end_on_the_committed_base(tmp_path, toy_encoder):
    """One development concept, zero-shot and warm start with a (tiny, untrained) encoder, small sizes."""
    config = BenchConfig.create(
        methods=["yochameleon_zeroshot", "yochameleon_warmstart"],
        encoder=toy_encoder,
        split="dev",
        n_concepts=1,
        seeds=1,
        n_positives=2,
        n_hard=2,
        n_easy=2,
        n_vqa=1,
        n_generated=1,
        pool_size=50,
        n_boot=50,
        overrides=[
            "data.n_recognition=8",
            "data.n_hard_negatives=4",
            "data.n_easy_negatives=4",
            "data.n_soft_positives=6",
            "optim.epochs=2",
        ],
    )
    out = tmp_path / "enc.json"
    summary = run_bench(config, out, progress=False, log=lambda line: None)
    validate_summary(summary)
    assert list(summary["methods"]) == ["yochameleon_zeroshot", "yochameleon_warmstart"]
    for stats in summary["methods"].values():
        assert stats["n"] == 1 and stats["prompt_tokens"] == 1 + 16 + 4
    timings = summary["config"]["timings"]["per_concept"]
    assert set(timings) == set(config.methods) and all(t["n"] == 1 for t in timings.values())
    encoder = summary["config"]["encoder"]
    assert encoder["path"] == str(toy_encoder) and encoder["training_identities"] == 0
    (warm,) = encoder["warmstart_steps"].values()
    assert warm["steps"] == -(-warm["recipe_steps"] // 5)
    assert "| fit s |" in (out.parent / "report.md").read_text()
    # The zero-shot method prepared no training data: only the warm start needed it.
    assert (out.parent / "enc_work" / "data").is_dir()
