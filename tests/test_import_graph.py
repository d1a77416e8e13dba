"""The layers import one way: read from the source, every ``import`` counted, lazy ones inside
functions included, and followed transitively (importing ``a.b.c`` also runs ``a`` and ``a.b``).

* backends import nothing above them;
* ``retrieval`` imports no model code;
* ``infer`` imports no training code;
* the library imports nothing from ``eval``, except the demo's loading of the committed toy world
  (the CLI sits above the library and may).
"""

from __future__ import annotations

import ast
import os
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where each installed package's source lives (pyproject.toml's package-dir mapping).
SOURCES = {"yochameleon": "yochameleon", "yochameleon.retrieval": "retrieval", "yochameleon.eval": "eval"}


def _sources(root: Path) -> list[Path]:
    """The .py files under ``root``, not descending into data folders (the toy world's artifacts)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [
            d for d in subfolders if d not in ("artifacts", "__pycache__") and not d.startswith(".")
        ]
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    return found


@cache
def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        root = REPO / folder
        for path in _sources(root):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """The yochameleon modules ``name`` imports anywhere in its source (and their parent packages)."""
    known = modules()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                )
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` imports mod.
            out.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    with_parents = set()
    for module in out:
        parts = module.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in with_parents if m in known and m != name}


@cache
def graph() -> dict[str, frozenset[str]]:
    return {name: frozenset(_imports(name, path)) for name, path in modules().items()}


def reachable(start: str, skip: frozenset[tuple[str, str]] = frozenset()) -> set[str]:
    """Every module importing ``start`` runs, leaving out the edges in ``skip``."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in graph()[node]:
            if nxt not in seen and (node, nxt) not in skip:
                seen.add(nxt)
                todo.append(nxt)
    return seen - {start}


def _paths_to(start: str, bad: set[str]) -> list[str]:
    """``start -> ... -> bad`` chains, for a message that shows where an unwanted import comes from."""
    parent, todo, chains = {start: None}, [start], []
    while todo:
        node = todo.pop(0)
        for nxt in sorted(graph()[node]):
            if nxt in parent:
                continue
            parent[nxt] = node
            todo.append(nxt)
            if nxt in bad:
                chain, at = [nxt], node
                while at is not None:
                    chain.append(at)
                    at = parent[at]
                chains.append(" -> ".join(reversed(chain)))
    return chains


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_source_tree_is_read():
    # A broken reader would make every rule below pass vacuously.
    assert {"yochameleon.backends.base", "yochameleon.retrieval.index", "yochameleon.eval.harness"} <= set(
        modules()
    )
    assert "yochameleon.backends.base" in graph()["yochameleon.concept"]
    assert "yochameleon.retrieval.embedders" in graph()["yochameleon.retrieval.index"]


def test_backends_import_nothing_above_them():
    allowed = ("yochameleon.backends", "yochameleon.errors")
    for name in [m for m in modules() if _under(m, "yochameleon.backends")]:
        above = {m for m in reachable(name) if m != "yochameleon" and not _under(m, *allowed)}
        assert not above, _paths_to(name, above)


def test_retrieval_imports_no_model_code():
    allowed = ("yochameleon.retrieval", "yochameleon.errors", "yochameleon.data.photos")
    for name in [m for m in modules() if _under(m, "yochameleon.retrieval")]:
        model = {
            m
            for m in reachable(name)
            if m not in ("yochameleon", "yochameleon.data") and not _under(m, *allowed)
        }
        assert not model, _paths_to(name, model)


def test_infer_imports_no_training_code():
    training = {m for m in reachable("yochameleon.infer") if _under(m, "yochameleon.train")}
    assert not training, _paths_to("yochameleon.infer", training)


def test_encoding_a_concept_imports_no_training_code():
    # ``encode`` (and a benchmark's zero-shot method) runs where inference runs.
    training = {m for m in reachable("yochameleon.encoder") if _under(m, "yochameleon.train")}
    assert not training, _paths_to("yochameleon.encoder", training)


def test_the_library_imports_nothing_from_eval_but_the_demos_toy_world():
    # The demo loads the committed toy world (importing it also runs its parent packages).
    toy_world = ("yochameleon.eval", "yochameleon.eval.toyworld", "yochameleon.eval.toyworld.demo")
    assert set(toy_world) <= graph()["yochameleon.demo"]  # the one exception is still used; else drop it
    demo_edges = frozenset(("yochameleon.demo", m) for m in toy_world)
    for name in [m for m in modules() if not _under(m, "yochameleon.eval", "yochameleon.cli")]:
        evals = {m for m in reachable(name, skip=demo_edges) if _under(m, "yochameleon.eval")}
        assert not evals, _paths_to(name, evals)


def test_nothing_imports_the_private_base_weight():
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert "_base_weight" not in {a.name for a in node.names}, f"{name} imports _base_weight"
