"""Run directories: a lock, atomic checkpoints, and the state needed to resume bit-exactly.

A checkpoint is a directory ``checkpoints/step_NNNNNN/`` holding ``state.safetensors`` (concept rows
and AdamW moments, fp32) and ``state.json`` (step, epoch, RNG-free bookkeeping). It is written to a
temporary directory and renamed, then ``checkpoints/latest`` is replaced atomically, so a kill at any
instant (SIGKILL included) leaves the previous checkpoint intact. Nothing is pickled.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from yochameleon.errors import TrainingError


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock``; the OS releases it if the process dies."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fh = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise TrainingError(
                f"another run is writing {self.path.parent}; wait for it or use another output_dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def config_hash(config: dict[str, Any]) -> str:
    """Hash of the parts of a resolved config that change the result (logging is excluded)."""
    relevant = {k: v for k, v in config.items() if k not in ("logging",)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        path = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, path + ".")
        elif va != vb:
            out.append(f"{path}: {va!r} -> {vb!r}")
    return out


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
    tag: str | None = None,
) -> Path:
    """Atomically write a checkpoint and point ``latest`` (or ``tag``) at it; prune old ones."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = tag or f"step_{step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if tag is None:
        _write_pointer(root / "latest", name)
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_pointer(path: Path, value: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value)
    tmp.replace(path)


def load_checkpoint(
    run_dir: str | Path, tag: str = "latest"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and state of ``latest`` (or a named checkpoint), or ``None`` when there is none."""
    from safetensors.torch import load_file

    root = Path(run_dir) / "checkpoints"
    if tag == "latest":
        pointer = root / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
    ckpt = root / tag
    if not (ckpt / "state.json").is_file():
        return None
    return load_file(str(ckpt / "state.safetensors")), json.loads((ckpt / "state.json").read_text())
