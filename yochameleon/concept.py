"""Concept tokens: the layout (:class:`ConceptSpec`), attaching them to a frozen model, concept files.

A concept is ``<sks>`` plus ``n_g`` generation tokens and ``n_u`` understanding tokens, placed on
unused reserved vocabulary ids (the vocabulary is never resized). Attaching wraps the model's input
embedding and output head so that exactly those ids read their rows from fp32 master parameters;
every base weight stays bit-identical and detaching restores the original modules.

Why our own wrapper instead of peft's ``TrainableTokensLayer``: peft rebuilds the whole
``vocab × hidden`` matrix with ``index_copy`` on every forward (a 512 MB copy per step for
Anole-7B), keeps the delta in the base dtype (no fp32 master rows), and activates one adapter at a
time, whereas several concepts must be live at once, each on its own ids.
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from yochameleon import __version__
from yochameleon.errors import ConceptError, IncompatibleBaseModelError, TokenBudgetError

if TYPE_CHECKING:
    from yochameleon.backends.base import Backend

logger = logging.getLogger(__name__)

_FORBIDDEN = re.compile(r"[\s<>/\\]")
ROW_TENSORS = ("embed", "head")


def normalize_name(name: str) -> str:
    """The NFC form of a concept name.

    macOS input and file systems can spell ``mắm`` decomposed (``a`` + breve + acute); names are
    compared, stored and written to file names in the composed form so both spellings find one concept.
    """
    return unicodedata.normalize("NFC", name)


def validate_concept_name(name: str) -> str:
    """Return the NFC form of ``name`` if it can name a concept (and a file), else raise :class:`ConceptError`.

    Any Unicode letters, digits, ``-``, ``_`` and ``.`` are allowed; whitespace, angle brackets and
    path separators are refused because names end up in prompts and file names.
    """
    if not isinstance(name, str) or not name:
        raise ConceptError("a concept name must be a non-empty string")
    name = normalize_name(name)
    if _FORBIDDEN.search(name) or name in (".", ".."):
        raise ConceptError(
            f"invalid concept name {name!r}: spaces, angle brackets and path separators are not allowed"
        )
    for ch in name:
        cat = unicodedata.category(ch)
        if not (cat.startswith("L") or cat.startswith("N") or ch in "-_."):
            raise ConceptError(
                f"invalid concept name {name!r}: character {ch!r} is not a letter, digit, '-', '_' or '.'"
            )
    if len(name) > 64:
        raise ConceptError(f"concept name {name!r} is longer than 64 characters")
    return name


@dataclass(frozen=True)
class ConceptSpec:
    """The token layout of one concept.

    Args:
        name: the concept's name (letters in any script, digits, ``-_.``).
        n_g: number of generation tokens.
        n_u: number of understanding tokens. With ``shared=True`` there is one token set of
            ``n_g`` tokens used for both tasks (Yo'LLaVA-style) and ``n_u`` must be 0.
        shared: one shared token set instead of separate generation/understanding sets.
    """

    name: str
    n_g: int = 16
    n_u: int = 16
    shared: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", validate_concept_name(self.name))
        if self.n_g < 0 or self.n_u < 0:
            raise ConceptError("n_g and n_u must be non-negative")
        if self.shared and self.n_u:
            raise ConceptError("a shared token set uses n_g tokens for both tasks; set n_u=0")
        if self.n_g + self.n_u == 0:
            raise ConceptError("a concept needs at least one generation or understanding token")

    @property
    def n_tokens(self) -> int:
        """Total number of ids: ``<sks>`` + generation + understanding tokens."""
        return 1 + self.n_g + self.n_u


@dataclass
class ConceptTokens:
    """A spec placed on concrete vocabulary ids of one base model.

    Attributes:
        spec: the layout.
        ids: all ids in order ``[sks, g..., u...]``.
        strings: the vocabulary strings of ``ids``.
    """

    spec: ConceptSpec
    ids: list[int]
    strings: list[str]

    def __post_init__(self) -> None:
        if len(self.ids) != self.spec.n_tokens or len(self.strings) != self.spec.n_tokens:
            raise ConceptError(f"{self.spec.name}: expected {self.spec.n_tokens} ids, got {len(self.ids)}")

    @property
    def sks_id(self) -> int:
        return self.ids[0]

    @property
    def sks(self) -> str:
        return self.strings[0]

    @property
    def g_ids(self) -> list[int]:
        return self.ids[1 : 1 + self.spec.n_g]

    @property
    def u_ids(self) -> list[int]:
        # A shared set answers with the same tokens it draws with.
        return self.g_ids if self.spec.shared else self.ids[1 + self.spec.n_g :]

    @property
    def g_strings(self) -> list[str]:
        return self.strings[1 : 1 + self.spec.n_g]

    @property
    def u_strings(self) -> list[str]:
        return self.g_strings if self.spec.shared else self.strings[1 + self.spec.n_g :]

    def personalized_prompt(self) -> str:
        """``<sks> is <g1>…<gN><u1>…<uM>.``, prepended to every prompt about this concept."""
        from yochameleon.prompts import personalized_prompt

        latent = self.g_strings if self.spec.shared else self.g_strings + self.u_strings
        return personalized_prompt(self.sks, latent, [])


# ----------------------------------------------------------------------------------------------
# The wrappers
# ----------------------------------------------------------------------------------------------
class _ConceptRows(nn.Module):
    """Shared bookkeeping: fp32 master rows per concept and an id -> row lookup table."""

    def __init__(self, base: nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.base = base
        self.rows = nn.ParameterDict()
        self.concept_ids: dict[str, torch.Tensor] = {}
        self.register_buffer("slot_of_id", torch.full((vocab_size,), -1, dtype=torch.long), persistent=False)

    def add(self, name: str, ids: list[int], rows: torch.Tensor) -> None:
        self.rows[name] = nn.Parameter(
            rows.detach().to(device=self.slot_of_id.device, dtype=torch.float32).clone()
        )
        self.concept_ids[name] = torch.tensor(ids, dtype=torch.long)
        self._reindex()

    def remove(self, name: str) -> None:
        del self.rows[name]
        del self.concept_ids[name]
        self._reindex()

    def _reindex(self) -> None:
        self.slot_of_id.fill_(-1)
        offset = 0
        for name in self.rows:
            ids = self.concept_ids[name].to(self.slot_of_id.device)
            self.slot_of_id[ids] = torch.arange(offset, offset + len(ids), device=ids.device)
            offset += len(ids)

    def all_ids(self) -> torch.Tensor:
        if not self.rows:
            return torch.empty(0, dtype=torch.long, device=self.slot_of_id.device)
        return torch.cat([self.concept_ids[n] for n in self.rows]).to(self.slot_of_id.device)

    def all_rows(self) -> torch.Tensor:
        return torch.cat([self.rows[n] for n in self.rows], dim=0)


class ConceptEmbedding(_ConceptRows):
    """Input embedding whose concept ids read fp32 master rows; other ids use the frozen base."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        if not self.rows:
            return out
        slot = self.slot_of_id[input_ids]
        hit = slot >= 0
        if not bool(hit.any()):
            return out
        rows = self.all_rows().to(out.dtype)
        # F.embedding, not ``rows[slot]``: on CPU the backward of advanced indexing accumulates
        # with several threads in a varying order, so two runs (and a resumed run) would drift
        # apart by ~1e-6; the embedding backward partitions rows between threads and is exact.
        # torch.where keeps the base values bit-identical and routes gradients to the rows only.
        return torch.where(hit.unsqueeze(-1), F.embedding(slot.clamp(min=0), rows), out)

    @property
    def weight(self) -> torch.Tensor:
        # Upstream code (e.g. placeholder masks) reads ``.weight``; give it the frozen matrix.
        return self.base.weight


class ConceptHead(_ConceptRows):
    """Output head whose concept columns come from fp32 master rows; other columns are the base's."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)
        if not self.rows:
            return logits
        h = hidden.to(torch.float32)
        # One product per concept: a concept's logits then come from the same kernel call whatever
        # else is attached, so they are bit-identical alone and next to other concepts.
        concept = torch.cat([h @ self.rows[name].t() for name in self.rows], dim=-1)
        return logits.index_copy(-1, self.all_ids(), concept.to(logits.dtype))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight


# ----------------------------------------------------------------------------------------------
# Attaching and detaching
# ----------------------------------------------------------------------------------------------
class ConceptBank:
    """The concepts attached to one backend. Created on first attach; see :func:`attach`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.concepts: dict[str, ConceptTokens] = {}
        # Per concept, its relations to other concepts (the ``relations`` of its concept file).
        self.relations: dict[str, list[dict[str, Any]]] = {}
        self.embedding = ConceptEmbedding(backend.input_embeddings(), backend.vocab_size)
        self.head = ConceptHead(backend.output_head(), backend.vocab_size)
        device = backend.device
        self.embedding.to(device)
        self.head.to(device)

    def _install(self) -> None:
        self.backend.set_input_embeddings(self.embedding)
        self.backend.set_output_head(self.head)

    def _uninstall(self) -> None:
        self.backend.set_input_embeddings(self.embedding.base)
        self.backend.set_output_head(self.head.base)

    def used_ids(self) -> set[int]:
        return {i for c in self.concepts.values() for i in c.ids}

    def parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """The trainable rows (embedding and head) of one concept or of all of them."""
        names = [normalize_name(name)] if name else list(self.concepts)
        return [p for n in names for p in (self.embedding.rows[n], self.head.rows[n])]


def get_bank(backend: Backend) -> ConceptBank | None:
    """The :class:`ConceptBank` attached to ``backend``, if any."""
    return getattr(backend, "_concept_bank", None)


def allocate_ids(backend: Backend, spec: ConceptSpec, prefer: list[int] | None = None) -> ConceptTokens:
    """Place ``spec`` on free reserved ids that no attached concept uses.

    Args:
        backend: the base model.
        spec: the layout to place.
        prefer: ids to keep when every one of them is free (a concept file's own ids); otherwise
            the lowest free ids are taken.

    Raises:
        TokenBudgetError: not enough free ids remain; the message says how many are free.
    """
    bank = get_bank(backend)
    used = bank.used_ids() if bank else set()
    free = [i for i in backend.free_token_ids() if i not in used]
    if prefer is not None and len(prefer) == spec.n_tokens and set(prefer) <= set(free):
        ids = list(prefer)
    elif len(free) < spec.n_tokens:
        owners = ", ".join(f"{n} ({len(c.ids)})" for n, c in bank.concepts.items()) if bank else ""
        raise TokenBudgetError(
            f"concept {spec.name!r} needs {spec.n_tokens} token ids but only {len(free)} free reserved ids are "
            f"left on {backend.name_or_path}"
            + (f" (attached concepts use {len(used)}: {owners}); detach one first" if used else "")
        )
    else:
        ids = free[: spec.n_tokens]
    return ConceptTokens(spec, ids, [backend.id_to_token(i) for i in ids])


def attach(
    backend: Backend, concept: ConceptSpec | ConceptTokens, rows: dict[str, torch.Tensor] | None = None
) -> ConceptTokens:
    """Attach a concept to ``backend``; only its embedding and head rows become trainable.

    A concept's rows do not depend on which reserved ids hold them, so placed tokens (e.g. from a
    concept file) keep their ids when those are free and otherwise move to the lowest free ids: two
    concepts trained in separate runs on the same ids attach side by side. The returned tokens are
    the concept's own id/string mapping on this model.

    Args:
        backend: the frozen base model.
        concept: a spec (ids are allocated) or already-placed tokens (their ids are preferred).
        rows: optional ``{"embed": [k, H], "head": [k, H]}`` initial rows, in token order; by default
            the base model's current rows for the chosen ids (what the original method does).

    Returns:
        The placed tokens.

    Raises:
        ConceptError: a concept of the same name is already attached.
        TokenBudgetError: not enough free ids.
    """
    bank = get_bank(backend)
    spec = concept if isinstance(concept, ConceptSpec) else concept.spec
    if bank is not None and spec.name in bank.concepts:
        raise ConceptError(
            f"a concept named {spec.name!r} is already attached; two concepts cannot share a name "
            "(detach it, or train the other one under another concept.name)"
        )
    prefer = None if isinstance(concept, ConceptSpec) else list(concept.ids)
    tokens = allocate_ids(backend, spec, prefer)
    if prefer is not None and tokens.ids != prefer:
        logger.info(
            "concept %r placed on ids %d..%d (its ids %d..%d are taken or not free here)",
            spec.name,
            tokens.ids[0],
            tokens.ids[-1],
            prefer[0],
            prefer[-1],
        )
    ids = torch.tensor(tokens.ids, dtype=torch.long)
    if rows is None:
        emb_w = backend.base_weight("embed")
        head_w = backend.base_weight("head")
        rows = {
            "embed": emb_w.detach()[ids.to(emb_w.device)].float(),
            "head": head_w.detach()[ids.to(head_w.device)].float(),
        }
    if bank is None:
        bank = ConceptBank(backend)
        backend._concept_bank = bank
        bank._install()
    bank.embedding.add(tokens.spec.name, tokens.ids, rows["embed"])
    bank.head.add(tokens.spec.name, tokens.ids, rows["head"])
    bank.concepts[tokens.spec.name] = tokens
    return tokens


def description_rows(backend: Backend, tokens: ConceptTokens, description: str) -> dict[str, torch.Tensor]:
    """Initial rows whose latent tokens read like the words of ``description``.

    ``<sks>`` and every output-head row keep the base model's rows (as :func:`attach` would); the
    input row of the k-th latent token (``g…`` then ``u…``, the order of the personalized prompt) is
    the embedding of the description's ``k mod L``-th word piece. A leading ``"<sks> is"`` and a
    closing full stop are dropped, so ``"<sks> is a brown dog."`` and ``"a brown dog"`` start the
    same.

    Raises:
        ConceptError: the description has no words.
    """
    text = " ".join(description.replace("<sks>", " ").split()).rstrip(".").strip()
    text = text[3:] if text.startswith("is ") else text
    if not text:
        raise ConceptError(
            f"concept {tokens.spec.name!r} has no description to start its tokens from: write one in "
            "concept.yaml (description: a brown dog with a white patch) or use concept.init=base"
        )
    words = backend.tokenize(" " + text)
    ids = torch.tensor(tokens.ids, dtype=torch.long)
    embed_w, head_w = backend.base_weight("embed"), backend.base_weight("head")
    embed = embed_w.detach()[ids.to(embed_w.device)].float().cpu().clone()
    table = embed_w.detach()[torch.tensor(words, device=embed_w.device)].float().cpu()
    for k in range(1, len(tokens.ids)):
        embed[k] = table[(k - 1) % len(words)]
    return {"embed": embed, "head": head_w.detach()[ids.to(head_w.device)].float().cpu().clone()}


def file_rows(backend: Backend, path: str | Path, spec: ConceptSpec) -> dict[str, torch.Tensor]:
    """Initial rows copied from a concept file (a trained or an encoded concept) for ``spec``.

    Rows do not depend on which reserved ids hold them, so the file's rows start a concept of any
    name on whatever ids it is given; the token layout and the base model must match.

    Raises:
        ConceptError: see :func:`read_concept_file`; the file's layout differs from ``spec``'s.
        IncompatibleBaseModelError: the file was made on another base model.
    """
    meta, tensors = read_concept_file(path)
    if (meta.n_g, meta.n_u, meta.shared) != (spec.n_g, spec.n_u, spec.shared):
        raise ConceptError(
            f"concept file {path} has n_g={meta.n_g}, n_u={meta.n_u}, shared={meta.shared}; concept "
            f"{spec.name!r} has n_g={spec.n_g}, n_u={spec.n_u}, shared={spec.shared}"
        )
    check_base(meta, backend, f"concept file {path} ({meta.name!r})")
    return {k: v.clone() for k, v in tensors.items()}


def check_base(meta: ConceptFileMeta, backend: Backend, what: str | None = None) -> None:
    """Refuse a concept file made on another base model than ``backend`` (fingerprint, hidden size).

    Raises:
        IncompatibleBaseModelError: naming both models and fingerprints.
    """
    if meta.base_fingerprint != backend.fingerprint() or meta.hidden_size != backend.hidden_size:
        raise IncompatibleBaseModelError(
            f"{what or f'concept {meta.name!r}'} was trained on {meta.base_model!r} (fingerprint {meta.base_fingerprint}), "
            f"not on {backend.name_or_path!r} (fingerprint {backend.fingerprint()}); retrain it on this base model"
        )


def detach(backend: Backend, name: str) -> None:
    """Remove a concept; with none left, the original modules are put back unchanged."""
    name = normalize_name(name)
    bank = get_bank(backend)
    if bank is None or name not in bank.concepts:
        raise ConceptError(f"no concept named {name!r} is attached")
    bank.embedding.remove(name)
    bank.head.remove(name)
    del bank.concepts[name]
    bank.relations.pop(name, None)
    if not bank.concepts:
        bank._uninstall()
        backend._concept_bank = None


def add_relation(backend: Backend, name: str, entry: dict[str, Any]) -> None:
    """Record a relation of the attached concept ``name`` (written to its concept file on save).

    Args:
        backend: the model the concept is attached to.
        name: the concept.
        entry: ``{"with": OTHER, "facts": [...], "source": ..., "settings": {...}}`` (see the README).

    Raises:
        ConceptError: ``name`` is not attached, or the entry names no other concept.
    """
    name = normalize_name(name)
    bank = get_bank(backend)
    if bank is None or name not in bank.concepts:
        raise ConceptError(f"no concept named {name!r} is attached")
    other = entry.get("with")
    if not isinstance(other, str) or normalize_name(other) == name:
        raise ConceptError(f"a relation of {name!r} must name another concept in 'with', got {other!r}")
    bank.relations.setdefault(name, []).append({**entry, "with": normalize_name(other)})


def related_concepts(backend: Backend, names: list[str]) -> list[str]:
    """Attached concepts that a relation of one of ``names`` names, in the order they were attached.

    Relations are read from both sides, so a relation recorded only in ``mắm``'s file still
    makes ``bo`` and ``mắm`` related.
    """
    bank = get_bank(backend)
    if bank is None:
        return []
    wanted = {normalize_name(n) for n in names}
    linked: set[str] = set()
    for owner, entries in bank.relations.items():
        for entry in entries:
            if owner in wanted:
                linked.add(entry["with"])
            if entry["with"] in wanted:
                linked.add(owner)
    return [n for n in bank.concepts if n in linked and n not in wanted]


def concept_rows(backend: Backend, name: str) -> dict[str, torch.Tensor]:
    """The current fp32 rows ``{"embed", "head"}`` of an attached concept (detached copies)."""
    name = normalize_name(name)
    bank = get_bank(backend)
    if bank is None or name not in bank.concepts:
        raise ConceptError(f"no concept named {name!r} is attached")
    return {
        "embed": bank.embedding.rows[name].detach().cpu().clone(),
        "head": bank.head.rows[name].detach().cpu().clone(),
    }


# ----------------------------------------------------------------------------------------------
# Concept files
# ----------------------------------------------------------------------------------------------
@dataclass
class ConceptFileMeta:
    """The JSON half of a concept file (``NAME.json``)."""

    name: str
    n_g: int
    n_u: int
    shared: bool
    token_ids: list[int]
    token_strings: list[str]
    hidden_size: int
    base_model: str
    base_family: str
    base_fingerprint: str
    library_version: str = __version__
    format_version: int = 1
    training_config: dict[str, Any] = field(default_factory=dict)
    relations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def spec(self) -> ConceptSpec:
        return ConceptSpec(self.name, self.n_g, self.n_u, self.shared)


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_concept(
    backend: Backend,
    name: str,
    path: str | Path,
    training_config: dict[str, Any] | None = None,
    relations: list[dict[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """Write ``NAME.safetensors`` (the rows only, fp32) and ``NAME.json`` next to each other.

    Both files are written to temporary names and renamed, so an interrupted save never leaves a
    half-written concept behind.

    Args:
        backend: the model the concept is attached to.
        name: the concept.
        path: ``DIR/NAME`` (either suffix, or none).
        training_config: how the rows were trained (the resolved recipe).
        relations: the concept's relations to other concepts; by default the ones recorded on the
            model (loaded with the concept file, or added by :func:`add_relation`).

    Returns:
        The two paths.
    """
    from safetensors.torch import save_file

    name = normalize_name(name)
    bank = get_bank(backend)
    if bank is None or name not in bank.concepts:
        raise ConceptError(f"no concept named {name!r} is attached")
    tokens = bank.concepts[name]
    rows = concept_rows(backend, name)
    # The file name in NFC form too, so it is the name every other spelling is looked up under.
    path = Path(path)
    st_path, json_path = _paths(path.with_name(normalize_name(path.name)))
    st_path.parent.mkdir(parents=True, exist_ok=True)
    meta = ConceptFileMeta(
        name=name,
        n_g=tokens.spec.n_g,
        n_u=tokens.spec.n_u,
        shared=tokens.spec.shared,
        token_ids=tokens.ids,
        token_strings=tokens.strings,
        hidden_size=backend.hidden_size,
        base_model=backend.name_or_path,
        base_family=backend.family,
        base_fingerprint=backend.fingerprint(),
        training_config=training_config or {},
        relations=list(bank.relations.get(name, [])) if relations is None else relations,
    )
    tmp_st, tmp_json = st_path.with_suffix(".safetensors.tmp"), json_path.with_suffix(".json.tmp")
    save_file({k: v.contiguous() for k, v in rows.items()}, str(tmp_st), metadata={"concept": name})
    tmp_json.write_text(json.dumps(asdict(meta), indent=2, ensure_ascii=False))
    tmp_st.replace(st_path)
    tmp_json.replace(json_path)
    return st_path, json_path


def read_concept_file(path: str | Path) -> tuple[ConceptFileMeta, dict[str, torch.Tensor]]:
    """Read and validate a concept file without touching any model.

    Raises:
        ConceptError: missing, truncated or malformed files; wrong tensor names, shapes or dtype;
            non-finite rows.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st_path, json_path = _paths(path)
    if not st_path.is_file() and not json_path.is_file():
        # A decomposed spelling (macOS input) finds the file saved under the composed name.
        composed = _paths(normalize_name(str(path)))
        if composed[0].is_file():
            st_path, json_path = composed
    for p in (st_path, json_path):
        if not p.is_file():
            raise ConceptError(f"concept file {p} does not exist")
    try:
        raw = json.loads(json_path.read_text(encoding="utf-8"))
        meta = ConceptFileMeta(**raw)
        meta.spec  # noqa: B018 - validates name and counts
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise ConceptError(f"{json_path} is not a valid concept JSON: {exc}") from exc
    if not isinstance(meta.relations, list) or not all(
        isinstance(r, dict)
        and isinstance(r.get("with"), str)
        and normalize_name(r["with"]) != normalize_name(meta.name)
        for r in meta.relations
    ):
        raise ConceptError(
            f"{json_path}: relations must be a list of objects, each naming another concept in 'with'"
        )
    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConceptError(f"{st_path} is truncated or not a safetensors file: {exc}") from exc
    if set(tensors) != set(ROW_TENSORS):
        raise ConceptError(
            f"{st_path} must hold exactly the tensors {list(ROW_TENSORS)}, found {sorted(tensors)}"
        )
    k = len(meta.token_ids)
    if k != meta.spec.n_tokens or len(meta.token_strings) != k:
        raise ConceptError(f"{json_path}: {k} token ids do not match n_g={meta.n_g}, n_u={meta.n_u}")
    for key, t in tensors.items():
        if t.dtype != torch.float32:
            raise ConceptError(f"{st_path}: tensor {key!r} has dtype {t.dtype}, expected float32")
        if tuple(t.shape) != (k, meta.hidden_size):
            raise ConceptError(
                f"{st_path}: tensor {key!r} has shape {tuple(t.shape)}, expected {(k, meta.hidden_size)}"
            )
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).any(dim=1).nonzero().flatten().tolist()
            raise ConceptError(f"{st_path}: tensor {key!r} has NaN/inf in rows {bad[:5]}")
    return meta, tensors


def load_concept(backend: Backend, path: str | Path) -> ConceptTokens:
    """Attach a saved concept to ``backend``, refusing files made for another base model.

    The concept keeps the ids recorded in its file when they are free; when another attached
    concept holds them (two concepts trained in separate runs), it moves to free reserved ids (see
    :func:`attach`). Every check runs before anything is attached, so a refused file leaves the
    model unchanged.

    Returns:
        The concept's tokens on this model (the ids it was placed on).

    Raises:
        IncompatibleBaseModelError: fingerprint, hidden size or token strings differ from this base.
        ConceptError: see :func:`read_concept_file`; the same name is already attached.
        TokenBudgetError: too few free reserved ids are left (the message says how many).
    """
    meta, tensors = read_concept_file(path)
    check_base(meta, backend)
    strings = [backend.id_to_token(i) if 0 <= i < backend.vocab_size else None for i in meta.token_ids]
    if strings != meta.token_strings:
        raise IncompatibleBaseModelError(
            f"token strings of {meta.name!r} do not match this base model's vocabulary"
        )
    tokens = ConceptTokens(meta.spec, list(meta.token_ids), list(meta.token_strings))
    placed = attach(backend, tokens, rows=tensors)
    for entry in meta.relations:
        add_relation(backend, placed.spec.name, entry)
    return placed


def concept_file_bytes(n_tokens: int, hidden_size: int) -> int:
    """Payload size of a concept's safetensors file: two fp32 matrices ``[n_tokens, hidden_size]``."""
    return 2 * n_tokens * hidden_size * 4


def rows_finite(backend: Backend) -> bool:
    """True when every attached concept row is finite (used to guard against NaN steps)."""
    bank = get_bank(backend)
    return bank is None or all(math.isfinite(float(p.detach().abs().sum())) for p in bank.parameters())
