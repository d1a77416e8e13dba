"""Model-family backends behind one protocol (:class:`~yochameleon.backends.base.Backend`)."""

from __future__ import annotations

from pathlib import Path

from yochameleon.backends.base import Backend, LoadOptions, SpecialIds
from yochameleon.errors import BackendError

# model_type in config.json -> (module, class). Imported lazily so one family's deps never block another.
FAMILIES = {
    "chameleon": ("yochameleon.backends.chameleon", "ChameleonBackend"),
    "emu3": ("yochameleon.backends.emu3", "Emu3Backend"),
    "janus": ("yochameleon.backends.janus", "JanusBackend"),
}


# Top-level folders this project writes models and runs to (README, recipes): a name under them is a
# path, never a Hugging Face id, even before the folder exists.
_LOCAL_ROOTS = ("outputs", "runs")


def looks_local(name_or_path: str) -> bool:
    """True when ``name_or_path`` can only mean a local path, not a Hugging Face id (``org/name``).

    That is: it starts with ``.``, ``/`` or ``~``, has a backslash or more than one ``/``, or its first
    component is an existing local folder or one of ``outputs/``, ``runs/``. (A dot is no sign of a
    path: ``leloy/Anole-7b-v0.1-hf`` is a hub id.)
    """
    parts = name_or_path.replace("\\", "/").split("/")
    return (
        name_or_path.startswith((".", "/", "~"))
        or "\\" in name_or_path
        or len(parts) > 2
        or (len(parts) == 2 and (parts[0] in _LOCAL_ROOTS or Path(parts[0]).is_dir()))
    )


def detect_family(name_or_path: str) -> str:
    """The ``model_type`` of a checkpoint, read from its config without loading weights.

    Raises:
        BackendError: a local-looking path that does not exist (at once, without trying the hub), or
            a config that cannot be read.
    """
    from transformers import AutoConfig

    local = Path(name_or_path).expanduser()
    if not local.exists() and looks_local(name_or_path):
        raise BackendError(
            f"model path {name_or_path!r} does not exist; write a tiny test model there with "
            f"`yochameleon make-tiny {name_or_path}`, or pass an existing model folder or a Hugging Face id"
        )
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot read a model config from {name_or_path!r}: {exc}") from exc
    return config.model_type


def load_backend(name_or_path: str | Path, options: LoadOptions | None = None) -> Backend:
    """Load any supported checkpoint (HF id or local directory) behind the backend protocol.

    Raises:
        BackendError: the path is missing or the model type is not supported.
    """
    import importlib

    name_or_path = str(name_or_path)
    family = detect_family(name_or_path)
    if family not in FAMILIES:
        raise BackendError(
            f"unknown model type {family!r} in {name_or_path!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    module, cls = FAMILIES[family]
    return getattr(importlib.import_module(module), cls).load(name_or_path, options)


__all__ = [
    "Backend",
    "BackendError",
    "LoadOptions",
    "SpecialIds",
    "detect_family",
    "load_backend",
    "FAMILIES",
]
