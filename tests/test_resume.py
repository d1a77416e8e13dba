"""Resume and checkpoints: bit-identical with several threads, stale temporaries, extending a run, the lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from yochameleon.concept import concept_rows, detach
from yochameleon.config import from_dict
from yochameleon.errors import TrainingError
from yochameleon.train.config import TrainConfig
from yochameleon.train.trainer import Trainer


def _records() -> list[dict]:
    recs = []
    for i in range(2):
        recs.append(
            {
                "id": f"pos{i}",
                "task": "understanding",
                "kind": "recognition",
                "question": "Is <sks> in this photo?<image>",
                "answer": "Yes, it is <sks>.",
                "image": f"img{i}",
                "flip": False,
                "label": "pos",
            }
        )
        recs.append(
            {
                "id": f"gen{i}",
                "task": "generation",
                "kind": "generation_real",
                "question": "A photo of <sks>.",
                "answer": None,
                "image": f"img{i}",
                "flip": False,
                "n_g": 4,
            }
        )
    recs.append(
        {
            "id": "qa",
            "task": "understanding",
            "kind": "text_qa",
            "question": "What is <sks>?",
            "answer": "<sks> is a cat.",
            "image": None,
            "flip": False,
        }
    )
    return recs


@pytest.fixture
def lookup(backend, photos):
    ids = backend.encode_images(photos[:2])
    return lambda rec: ids[int(rec["image"][-1])].tolist()


def _config(run, **optim) -> TrainConfig:
    return from_dict(
        TrainConfig,
        {
            "output_dir": str(run),
            "model": {"name_or_path": "unused", "dtype": "float32", "device": "cpu"},
            "concept": {"name": "cat", "n_g": 4, "n_u": 4},
            "optim": {"lr": 1e-2, "batch_size": 2, "epochs": 4, **optim},
            "save_every": 2,
            "logging": {"loggers": ["jsonl"], "progress": False, "sample_images": 0},
        },
    )


def _train(backend, lookup, cfg, resume=False):
    trainer = Trainer(cfg, backend=backend)
    trainer.setup(records={"cat": _records()}, image_ids=lookup)
    try:
        return trainer.train(resume=resume), concept_rows(backend, "cat")
    finally:
        detach(backend, "cat")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resume_with_two_threads_is_bit_identical(backend, lookup, tmp_path, monkeypatch, threads):
    threads(2)
    # Two epochs (6 steps) only: two threads on busy shared cores wait on each other at every kernel.
    _, want = _train(backend, lookup, _config(tmp_path / "straight", epochs=2))

    # Kill the second run in step 5 (the last checkpoint is step 4).
    import yochameleon.train.trainer as tr

    real, calls = tr.label_only_loss, {"n": 0}

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "label_only_loss", dies)
    run = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        _train(backend, lookup, _config(run, epochs=2))
    monkeypatch.setattr(tr, "label_only_loss", real)
    assert (run / "checkpoints" / "latest").read_text() == "step_000004"
    # What a SIGKILL mid-save leaves behind, and a folder a live process is still writing.
    stale = run / "checkpoints" / f".tmp-step_000006-{_dead_pid()}"
    live = run / "checkpoints" / f".tmp-step_000006-{os.getppid()}"
    for d in (stale, live):
        d.mkdir()
        (d / "state.json").write_text("{")

    threads(1)  # the resume runs with the run's recorded 2 threads
    result, got = _train(backend, lookup, _config(run, epochs=2), resume=True)
    assert torch.get_num_threads() == 1  # and gives the process its own count back
    assert result.steps == 6
    assert torch.equal(want["embed"], got["embed"]) and torch.equal(want["head"], got["head"])
    assert json.loads((run / "run.json").read_text())["threads"] == 2
    assert not stale.exists() and live.exists()


def test_remove_stale_tmp_keeps_live_writers(tmp_path):
    from yochameleon.train.checkpoint import remove_stale_tmp

    ckpt = tmp_path / "checkpoints"
    mine, dead, live = (ckpt / f".tmp-best-{pid}" for pid in (os.getpid(), _dead_pid(), os.getppid()))
    for d in (mine, dead, live, ckpt / "step_000002"):
        d.mkdir(parents=True)
    assert sorted(remove_stale_tmp(tmp_path)) == sorted([mine, dead])
    assert live.is_dir() and (ckpt / "step_000002").is_dir()


def test_resume_extends_a_finished_run(backend, lookup, tmp_path):
    _, want = _train(backend, lookup, _config(tmp_path / "straight", max_steps=8))
    run = tmp_path / "run"
    first, _ = _train(backend, lookup, _config(run, max_steps=4))
    assert first.steps == 4
    # A trailing slash in a path is not a change; more steps extend the run to the same rows.
    cfg = _config(str(run) + "/", max_steps=8)
    result, got = _train(backend, lookup, cfg, resume=True)
    assert result.steps == 8
    assert torch.equal(want["embed"], got["embed"]) and torch.equal(want["head"], got["head"])
    assert json.loads((run / "run.json").read_text())["config"]["optim"]["max_steps"] == 8
    # More epochs extend a run that finished at an epoch's end the same way.
    _, want = _train(backend, lookup, _config(tmp_path / "straight-epochs", epochs=2))
    run2 = tmp_path / "run-epochs"
    assert _train(backend, lookup, _config(run2, epochs=1))[0].steps == 3
    result, got = _train(backend, lookup, _config(run2, epochs=2), resume=True)
    assert result.steps == 6
    assert torch.equal(want["embed"], got["embed"]) and torch.equal(want["head"], got["head"])
    # Fewer steps, or any other change, is still refused.
    for changed, key in (
        ({"max_steps": 6}, "optim.max_steps: 8 -> 6"),
        ({"max_steps": 8, "lr": 5e-3}, "optim.lr"),
    ):
        with pytest.raises(TrainingError, match=key):
            _train(backend, lookup, _config(run, **changed), resume=True)


def test_resume_changes_compares_paths_normalised_and_allows_extension_only():
    from yochameleon.train.checkpoint import resume_changes

    old = {
        "output_dir": "outputs/run",
        "model": {"name_or_path": "outputs/tiny-model"},
        "concept": {"concept_dir": "c", "extra": [{"name": "b", "concept_dir": "d/b"}]},
        "optim": {"epochs": 2, "max_steps": None, "lr": 1e-3},
        "logging": {"every": 1},
    }
    new = json.loads(json.dumps(old))
    new["output_dir"] = "./outputs/run/"
    new["model"]["name_or_path"] = "outputs//tiny-model/"
    new["concept"]["extra"][0]["concept_dir"] = "d/b/"
    new["optim"]["epochs"] = 3
    new["logging"]["every"] = 5
    assert resume_changes(old, new) == []
    new["optim"]["max_steps"] = 10  # a cap where there was none shortens the run
    assert resume_changes(old, new) == [
        "optim.max_steps: None -> 10 (a resume may only raise it, to extend the run)"
    ]


def test_refused_resume_leaves_the_lock_file_untouched(backend, lookup, tmp_path):
    run = tmp_path / "run"
    _train(backend, lookup, _config(run, max_steps=2))
    lock = run / ".lock"
    lock.write_text("4242")
    os.utime(lock, ns=(1_000_000_000, 1_000_000_000))
    before = (lock.read_bytes(), lock.stat().st_mtime_ns)
    with pytest.raises(TrainingError, match="optim.lr"):
        _train(backend, lookup, _config(run, max_steps=2, lr=5e-3), resume=True)
    with pytest.raises(TrainingError, match="already holds a run"):
        _train(backend, lookup, _config(run, max_steps=2))
    assert (lock.read_bytes(), lock.stat().st_mtime_ns) == before


def test_train_command_refuses_before_loading_the_model(tmp_path, capsys):
    from yochameleon.cli import main
    from yochameleon.config import load_config, to_dict

    run = tmp_path / "run"
    # The model path does not exist: a refusal that came after loading it would read differently.
    overrides = [f"output_dir={run}", "model.name_or_path=outputs/no-such-model"]
    # What a finished run leaves behind: its recorded recipe, a checkpoint and the lock file.
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000004")
    recorded = to_dict(load_config(TrainConfig, "tiny-cpu", overrides))
    (run / "run.json").write_text(json.dumps({"config": recorded, "threads": 1}))
    (run / ".lock").write_text("4242")
    assert main(["train", "tiny-cpu", *overrides, "optim.lr=0.001", "--resume"]) == 2
    assert capsys.readouterr().err == (
        "error: cannot resume: the recipe changed since this run started:\n  optim.lr: 0.03 -> 0.001\n"
    )
    assert main(["train", "tiny-cpu", *overrides]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert (run / ".lock").read_text() == "4242"
