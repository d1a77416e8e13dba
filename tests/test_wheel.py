"""A wheel install runs the tiny quick start: ``make-tiny``, ``train tiny-cpu`` and ``ask`` from a fresh
venv, outside the repository, with the recipe found as package data.

Offline: the wheel is built without build isolation, and the fresh venv sees this venv's packages
(torch, transformers…) through a ``.pth`` line while yochameleon itself comes from the wheel only.
The toy world's artifacts are left out of the copied tree: the quick start does not use them and
zipping 130 MB would dominate the test.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import make_concept

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"{' '.join(map(str, args))} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    )
    return out


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    tree = tmp / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "artifacts", "build", "dist")
    for name in ("yochameleon", "retrieval", "eval", "recipes"):
        shutil.copytree(REPO / name, tree / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    wheels = tmp / "wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(wheels),
            str(tree),
        ],
        cwd=tmp,
    )
    (wheel,) = wheels.glob("yochameleon-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    # This venv's packages, but not its editable yochameleon (a .pth file is only read in a site dir).
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp)
    Path(purelib.stdout.strip(), "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp)
    return venv


def test_wheel_install_runs_make_tiny_train_and_ask(fresh_venv, tmp_path):
    bin_dir = fresh_venv / "bin"
    where = _run(
        [
            str(bin_dir / "python"),
            "-c",
            "import yochameleon, yochameleon.config as c; print(yochameleon.__file__); print(c.recipe_path('tiny-cpu'))",
        ],
        cwd=tmp_path,
    ).stdout.split()
    assert all(line.startswith(str(fresh_venv)) for line in where), where  # the wheel, not the repository

    cli = str(bin_dir / "yochameleon")
    _run([cli, "make-tiny", "outputs/tiny-model"], cwd=tmp_path)
    # The recipe's own relative paths: outputs/tiny-model, outputs/demo/concept, outputs/runs/tiny-cpu.
    make_concept(
        tmp_path / "outputs" / "demo" / "concept",
        4,
        qa_lines=[{"question": "What colour is <sks>?", "answer": "Grey and white."}],
    )
    trained = _run([cli, "train", "tiny-cpu", "optim.epochs=1"], cwd=tmp_path)
    concept = tmp_path / "outputs" / "runs" / "tiny-cpu" / "concepts" / "sks.safetensors"
    assert "concept sks:" in trained.stdout and concept.is_file()
    photo = tmp_path / "outputs" / "demo" / "concept" / "photos" / "p0.png"
    # A random-init model after one epoch may well answer with nothing; the command must run.
    _run(
        [
            cli,
            "ask",
            "--model",
            "outputs/tiny-model",
            "--concept",
            str(concept),
            "--image",
            str(photo),
            "Is <sks> here?",
        ],
        cwd=tmp_path,
    )
