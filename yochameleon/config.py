"""Typed configs that validate themselves: YAML recipes plus ``key.sub=value`` overrides.

One override syntax everywhere: ``yochameleon train RECIPE.yaml optim.lr=1e-4 concept.n_g=8``.
Values are parsed as YAML scalars/lists (``true``, ``1e-4``, ``[a, b]``). An unknown key fails and
names the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from yochameleon.errors import ConfigError

T = TypeVar("T")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted no/off/yes/on as a bool; take the word back if it is a choice.
            words = [
                w
                for w in (("no", "off", "false") if not value else ("yes", "on", "true"))
                if w in get_args(tp)
            ]
            value = words[0] if words else value
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = get_args(tp) or (Any, Any)
        return {k: _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys fail with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {full!r}{_suggest(key, list(fields))}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc
    except TypeError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> ``(["optim", "lr"], 1e-4)``."""
    if "=" not in text or text.startswith("-"):
        raise ConfigError(f"override {text!r} must look like key.sub=value (flags are not accepted here)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value: {exc}") from exc
    if isinstance(value, str) and _FLOAT.fullmatch(value):
        value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    return key.split("."), value


def apply_overrides(cls: type, data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw mapping, checking every key against the dataclass tree."""
    data = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node, tp = data, cls
        for i, part in enumerate(path):
            names = [f.name for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else None
            if names is not None and part not in names:
                where = ".".join(path[: i + 1])
                raise ConfigError(f"unknown config key {where!r}{_suggest(part, names)}")
            sub_tp = typing.get_type_hints(tp)[part] if names is not None else Any
            if i == len(path) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
                tp = sub_tp
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def shipped_recipes() -> list[str]:
    """Names of the recipes installed with the package (``tiny-cpu``, ``yochameleon-anole7b``…)."""
    from importlib.resources import files

    return sorted(
        f.name[: -len(".yaml")] for f in files("yochameleon.recipes").iterdir() if f.name.endswith(".yaml")
    )


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: ``name_or_path`` itself when it is a file, else the shipped recipe of that name.

    Shipped recipes are package data (``yochameleon.recipes``), found through the import system
    rather than a path relative to this file, so they are there in a wheel install too.

    Args:
        name_or_path: a YAML file, or a shipped recipe's name with or without ``.yaml``.

    Raises:
        ConfigError: neither a file nor a shipped recipe (the message lists the shipped ones).
    """
    from importlib.resources import files

    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    shipped = files("yochameleon.recipes") / f"{name}.yaml"
    if path.parent == Path(".") or path.parent.name == "recipes":
        if shipped.is_file():
            return Path(str(shipped))
    raise ConfigError(
        f"recipe {name_or_path} does not exist (neither a file nor a shipped recipe: "
        f"{', '.join(shipped_recipes())})"
    )


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file or shipped recipe (optional) and dotted overrides, validating everything.

    Raises:
        ConfigError: missing recipe, bad YAML, unknown key, wrong type or a failed validation rule.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = recipe_path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {p} must be a mapping at the top level")
    data = apply_overrides(cls, data, overrides or [])
    return from_dict(cls, data)
