"""Shared fixtures: a tiny random-init model built once per session, loaded fresh per test."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# Keep the shared token cache of the tests out of the user's home.
os.environ.setdefault("YOCHAMELEON_CACHE", tempfile.mkdtemp(prefix="yoc-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads and lose a lot when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A ``make-tiny`` checkpoint directory (seed 0)."""
    from yochameleon.backends.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory):
    """A second tiny checkpoint with different weights (another base model)."""
    from yochameleon.backends.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny2") / "model", seed=1)


@pytest.fixture
def backend(tiny_dir):
    """A freshly loaded tiny backend; tests may attach concepts freely."""
    from yochameleon.backends import load_backend

    torch.manual_seed(0)
    return load_backend(tiny_dir)


@pytest.fixture
def photos():
    """Real photos that ship with scikit-image."""
    from PIL import Image
    from skimage import data

    return [
        Image.fromarray(getattr(data, name)()).convert("RGB")
        for name in ("astronaut", "chelsea", "coffee", "rocket")
    ]


@pytest.fixture(scope="session")
def reduced_toyworld(tmp_path_factory):
    """``(config, report)`` of one reduced toy-world build shared by the slow tests (minutes).

    ``TOYWORLD_REDUCED_ARTIFACTS`` may name a folder to build into (or resume, when it holds one).
    """
    from yochameleon.eval.toyworld.build import BuildConfig, build

    existing = os.environ.get("TOYWORLD_REDUCED_ARTIFACTS")
    out = existing or tmp_path_factory.mktemp("toyworld") / "artifacts"
    config = BuildConfig.create(out=out, seed=0, reduced=True, threads=1)
    return config, build(config, progress=False, log=lambda _: None)
