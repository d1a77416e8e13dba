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


def detect_family(name_or_path: str) -> str:
    """The ``model_type`` of a checkpoint, read from its config without loading weights."""
    from transformers import AutoConfig

    local = Path(name_or_path)
    if not local.exists() and (name_or_path.startswith((".", "/")) or local.suffix):
        raise BackendError(f"model path {name_or_path!r} does not exist")
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
