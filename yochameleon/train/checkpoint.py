"""Run directories: a lock, atomic checkpoints, and the state needed to resume bit-exactly.

A checkpoint is a directory ``checkpoints/step_NNNNNN/`` holding ``state.safetensors`` (concept rows
and AdamW moments, fp32) and ``state.json`` (step, epoch, RNG-free bookkeeping). It is written to a
temporary directory (``.tmp-NAME-PID``) and renamed, then ``checkpoints/latest`` is replaced
atomically, so a kill at any instant (SIGKILL included) leaves the previous checkpoint intact; the
next start removes the temporary folder (:func:`remove_stale_tmp`). Nothing is pickled.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from yochameleon.errors import TrainingError

logger = logging.getLogger(__name__)


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


# Recipe keys that name files or folders: a resume compares them normalised (``a/b/`` is ``a/b``).
PATH_KEYS = (
    "output_dir",
    "model.name_or_path",
    "concept.concept_dir",
    "concept.data_dir",
    "concept.init_from",
    "data.index_dir",
    "data.eval_dir",
)
# What ``--resume`` may raise to extend a (finished) run; any other change is refused.
EXTENSIBLE_KEYS = ("optim.max_steps", "optim.epochs")


def _normalize_path(value: Any) -> Any:
    return os.path.normpath(os.path.expanduser(value)) if isinstance(value, str) and value else value


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config as a resume compares it: logging dropped, paths normalised."""
    out = copy.deepcopy({k: v for k, v in config.items() if k != "logging"})
    for key in PATH_KEYS:
        section, _, leaf = key.rpartition(".")
        holder = out.get(section) if section else out
        if isinstance(holder, dict) and leaf in holder:
            holder[leaf] = _normalize_path(holder[leaf])
    for item in (out.get("concept") or {}).get("extra") or []:
        for leaf in ("concept_dir", "data_dir", "init_from"):
            if isinstance(item, dict) and leaf in item:
                item[leaf] = _normalize_path(item[leaf])
    return out


def _extends(old: Any, new: Any) -> bool:
    # ``max_steps: null`` means no cap, which is larger than any number.
    if new is None:
        return old is not None
    return old is not None and isinstance(new, int) and isinstance(old, int) and new > old


def resume_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why the run recorded as ``old`` cannot resume under the recipe ``new`` (empty: it can).

    Logging settings may change; paths are compared normalised; a larger ``optim.max_steps`` or
    ``optim.epochs`` extends the run. Each other difference is one ``key: old -> new`` line.
    """
    a, b = comparable_config(old), comparable_config(new)
    notes = {}
    for key in EXTENSIBLE_KEYS:
        section, leaf = key.split(".")
        va, vb = (a.get(section) or {}).get(leaf), (b.get(section) or {}).get(leaf)
        if va == vb:
            continue
        if _extends(va, vb):
            a[section][leaf] = vb  # an extension is not a change
        else:
            notes[key] = " (a resume may only raise it, to extend the run)"
    return [line + notes.get(line.split(":", 1)[0], "") for line in diff_configs(a, b)]


def check_run_dir(run_dir: str | Path, resolved: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """Refuse a resume with a changed recipe, or a fresh start over an existing run.

    Read-only, and it needs no model: the trainer runs it before taking the lock, so a refused start
    leaves the run directory (lock file included) untouched, and ``yochameleon train`` runs it
    before loading the model, so the refusal comes at once.

    Args:
        run_dir: the run directory (``output_dir``).
        resolved: the resolved recipe of this start (``to_dict`` of its config).
        resume: whether this start resumes.

    Returns:
        The run's recorded ``run.json`` when resuming one, else ``None``.

    Raises:
        TrainingError: the recipe changed in a way a resume cannot take (each change listed), or
            the directory holds a run and this is not a resume.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if resume and meta_path.is_file():
        old = json.loads(meta_path.read_text())
        changes = resume_changes(old["config"], resolved)
        if changes:
            raise TrainingError(
                "cannot resume: the recipe changed since this run started:\n  " + "\n  ".join(changes[:10])
            )
        return old
    if not resume and (run_dir / "checkpoints" / "latest").exists():
        raise TrainingError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another output_dir"
        )
    return None


def write_run_meta(run_dir: str | Path, resolved: dict[str, Any], threads: int) -> None:
    """Write ``config.yaml`` and ``run.json`` (config hash, resolved config, CPU threads) of a run.

    Each is written whole and renamed: other ranks read ``run.json`` while rank 0 rewrites it.
    """
    run_dir = Path(run_dir)
    meta = {"config_hash": config_hash(resolved), "config": resolved, "threads": threads}
    for name, text in (
        ("config.yaml", yaml.safe_dump(resolved, sort_keys=False)),
        ("run.json", json.dumps(meta, indent=2)),
    ):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(run_dir / name)


def run_threads(old: dict[str, Any] | None, device: torch.device) -> int:
    """The intra-op thread count of a run: the recorded one on resume (CPU), else the current.

    On a CPU, matrix products split their sums by thread count, so rows computed with 1 and with
    2 threads differ in the last bits; resuming with the run's own count keeps the rows
    bit-identical to an uninterrupted run.

    Args:
        old: the run's recorded ``run.json`` when resuming, else ``None``.
        device: the device the run computes on.
    """
    threads = torch.get_num_threads()
    recorded = (old or {}).get("threads")
    if recorded and recorded != threads and device.type == "cpu":
        logger.info(
            "resuming with the run's %d CPU threads (this process had %d), so the rows match an "
            "uninterrupted run",
            recorded,
            threads,
        )
        return int(recorded)
    return threads


def remove_stale_tmp(run_dir: str | Path) -> list[Path]:
    """Delete ``checkpoints/.tmp-*`` folders that a killed run left behind; return them.

    Call it holding the run's :class:`RunLock`: no other trainer writes this directory then. A
    folder is removed only when the process id in its name is this process or no live process,
    so a writer that somehow runs without the lock keeps its half-written checkpoint.
    """
    removed = []
    for tmp in sorted((Path(run_dir) / "checkpoints").glob(".tmp-*")):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not tmp.is_dir() or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _pid_alive(int(pid)):
            logger.warning("keeping %s: process %s that writes it is still alive", tmp, pid)
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    if removed:
        logger.info("removed %d unfinished checkpoint(s) left by a killed run", len(removed))
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's live process
    return True


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
