"""Zero-shot concepts: a concept encoder maps a few photos to a concept's rows in one forward pass.

A :class:`ConceptEncoder` reads one feature vector per photo (``k`` photos, 1 to ``max_photos``), or
one per image token of each photo, lets them attend to each other (a small set transformer; the
order of the photos does not matter: image tokens carry only their place in the image grid), and has one learned query per concept token (``<sks>``, the generation
tokens, the understanding tokens) attend to the set. A query's result becomes that token's
input-embedding row and output-head row, so the encoder writes exactly the tensors a trained
concept file holds. The output layers start at zero and the rows at a learned offset initialised
from the base model's rows: before any training the encoder writes the rows ``concept.init=base``
starts a trained concept from.

Photo features come from the frozen base model itself (``features``):

* ``hidden``: the mean final hidden state over the photo's image span (the base model reading the
  photo, with the same VQ ids training uses);
* ``embedding``: the mean input embedding of the photo's VQ ids (no transformer pass);
* ``tokens``: the final hidden state at every image token of the photo, ``[image_seq_len, H]`` per
  photo. A mean over the image keeps what fills it (shape, colour) but dilutes what covers a cell or
  two (a mark), which is what tells an object from its twins; per-token features keep it.

An encoder file is ``NAME.safetensors`` (the weights, fp32) plus ``NAME.json``: the token layout,
the architecture, the base model's name and fingerprint (encoders, like concept files, only load on
the base they were trained on), and the identities it was trained on (names, folders and photo
hashes, so a benchmark can check that no test identity leaked into training).

:func:`encode_concept` turns photos into a standard concept file (the same writer as ``train``), which
then loads wherever a trained concept does. Nothing here imports training code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from yochameleon import __version__
from yochameleon.concept import ConceptSpec, allocate_ids, attach, detach, save_concept
from yochameleon.errors import ConceptError, ConfigError, DataError, IncompatibleBaseModelError

if TYPE_CHECKING:
    from PIL import Image

    from yochameleon.backends.base import Backend

logger = logging.getLogger(__name__)

FEATURES = ("hidden", "embedding", "tokens")
ENCODER_FORMAT = "yochameleon-concept-encoder"
ENCODER_FORMAT_VERSION = 1
# The most photos a concept is encoded from: the method is designed for 3-5 (see DESIGN.md).
MAX_PHOTOS = 5


@dataclass
class EncoderConfig:
    """The concept encoder's architecture and the photo features it reads (a recipe's ``encoder`` section).

    Args:
        features: ``hidden`` (mean final hidden state over a photo's image span), ``embedding``
            (mean input embedding of its VQ ids) or ``tokens`` (the final hidden state at each of its
            image tokens).
        d_model: width of the set transformer.
        layers: self-attention layers over the photos.
        heads: attention heads (must divide ``d_model``).
        min_photos: fewest photos per training example (each example draws ``k`` photos at random
            between ``min_photos`` and ``max_photos``).
        max_photos: most photos per example, and the most ``encode`` uses (at most 5).

    Raises:
        ConfigError: (from ``__post_init__``) an unknown feature source or a value out of range.
    """

    features: str = "hidden"
    d_model: int = 256
    layers: int = 2
    heads: int = 4
    min_photos: int = 1
    max_photos: int = MAX_PHOTOS

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ConfigError(f"encoder.features must be one of {list(FEATURES)}, got {self.features!r}")
        if self.d_model < 1 or self.layers < 0 or self.heads < 1:
            raise ConfigError("encoder.d_model and encoder.heads must be >= 1, encoder.layers >= 0")
        if self.d_model % self.heads:
            raise ConfigError(f"encoder.heads ({self.heads}) must divide encoder.d_model ({self.d_model})")
        if not 1 <= self.min_photos <= self.max_photos <= MAX_PHOTOS:
            raise ConfigError(
                f"encoder photos must satisfy 1 <= min_photos <= max_photos <= {MAX_PHOTOS}, "
                f"got min_photos={self.min_photos}, max_photos={self.max_photos}"
            )


class ConceptEncoder(nn.Module):
    """Photo features ``[B, k, F]`` (or ``[B, k, T, F]``) -> concept rows ``{"embed", "head"}``, each ``[B, n_tokens, H]``.

    Args:
        feature_dim: size of one feature vector.
        hidden_size: the base model's hidden size (the rows' width).
        n_tokens: the concept's token count (``1 + n_g + n_u``).
        config: the architecture.
        base_rows: optional ``{"embed", "head"}`` ``[n_tokens, H]`` the output starts from (the
            base model's rows of some reserved ids); zeros when omitted (a file's weights follow).
        feature_tokens: feature vectors per photo (``T``; 1 for one vector per photo). With more, each
            of the ``T`` places gets a learned position, shared by every photo.
    """

    def __init__(
        self,
        feature_dim: int,
        hidden_size: int,
        n_tokens: int,
        config: EncoderConfig,
        base_rows: dict[str, torch.Tensor] | None = None,
        feature_tokens: int = 1,
    ) -> None:
        super().__init__()
        d = config.d_model
        self.n_tokens = n_tokens
        self.feature_tokens = feature_tokens
        # Where in the image grid a token sits (a mark's cell); photos themselves stay unordered.
        self.positions = nn.Parameter(torch.randn(feature_tokens, d) * 0.02) if feature_tokens > 1 else None
        self.in_norm = nn.LayerNorm(feature_dim)
        self.in_proj = nn.Linear(feature_dim, d)
        layer = nn.TransformerEncoderLayer(
            d, config.heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        # No dropout anywhere: a training step is a function of the step number alone, so a resumed
        # run continues exactly as an uninterrupted one.
        self.set_layers = (
            nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False) if config.layers else None
        )
        self.queries = nn.Parameter(torch.randn(n_tokens, d) * 0.02)
        self.pool = nn.MultiheadAttention(d, config.heads, dropout=0.0, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU())
        self.out_embed = nn.Linear(d, hidden_size)
        self.out_head = nn.Linear(d, hidden_size)
        for lin in (self.out_embed, self.out_head):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        rows = base_rows or {}
        self.base_embed = nn.Parameter(_rows(rows.get("embed"), n_tokens, hidden_size))
        self.base_head = nn.Parameter(_rows(rows.get("head"), n_tokens, hidden_size))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Rows for each set of photos.

        Args:
            features: ``[B, k, F]`` photo features, or ``[B, k, T, F]`` with ``T = feature_tokens``.
            mask: ``[B, k]`` bool, ``True`` for real photos (padding ``False``); ``None``: all real.

        Returns:
            ``{"embed": [B, n_tokens, H], "head": [B, n_tokens, H]}`` in float32.
        """
        x = self.in_proj(self.in_norm(features.float()))
        pad = None if mask is None else ~mask
        if self.positions is not None:
            if x.dim() != 4 or x.shape[2] != self.feature_tokens:
                raise ConceptError(
                    f"this encoder reads {self.feature_tokens} feature vectors per photo, got features of "
                    f"shape {tuple(features.shape)}"
                )
            b, k, t, d = x.shape
            x = (x + self.positions).reshape(b, k * t, d)
            pad = None if pad is None else pad.repeat_interleave(t, dim=1)
        if self.set_layers is not None:
            x = self.set_layers(x, src_key_padding_mask=pad)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        pooled, _ = self.pool(q, x, x, key_padding_mask=pad, need_weights=False)
        h = self.mlp(pooled + q)
        return {"embed": self.base_embed + self.out_embed(h), "head": self.base_head + self.out_head(h)}


def _rows(value: torch.Tensor | None, n: int, hidden: int) -> torch.Tensor:
    if value is None:
        return torch.zeros(n, hidden)
    if tuple(value.shape) != (n, hidden):
        raise ConceptError(f"base rows have shape {tuple(value.shape)}, expected {(n, hidden)}")
    return value.detach().float().cpu().clone()


# ----------------------------------------------------------------------------------------------
# Photo features
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def photo_features(backend: Backend, images: list[Image.Image], source: str = "hidden") -> torch.Tensor:
    """One feature vector per photo from the frozen base model, ``[k, hidden_size]`` float32 on CPU.

    Args:
        backend: the base model.
        images: RGB photos.
        source: ``hidden`` or ``embedding`` (see :class:`EncoderConfig`).
    """
    if not images:
        raise DataError("no photos to compute features from")
    ids = backend.encode_images(images).to(backend.device)
    return image_id_features(backend, ids, source)


@torch.no_grad()
def image_id_features(backend: Backend, ids: torch.Tensor, source: str = "hidden") -> torch.Tensor:
    """:func:`photo_features` of already VQ-encoded photos ``ids`` ``[k, image_seq_len]``."""
    if source not in FEATURES:
        raise ConfigError(f"feature source must be one of {list(FEATURES)}, got {source!r}")
    ids = ids.to(backend.device)
    if source == "embedding":
        weight = backend.base_weight("embed")
        return weight.detach()[ids].float().mean(dim=1).cpu()
    if source == "tokens":
        seqs, codes = _image_spans(backend, ids)
        hidden, _ = backend.hidden_states(seqs, attention_mask=torch.ones_like(seqs))
        # Every span has the same layout, so each row keeps exactly image_seq_len positions.
        return torch.stack([h[c] for h, c in zip(hidden.float(), codes, strict=True)]).cpu()
    seq, codes = _image_spans(backend, ids)
    hidden, _ = backend.hidden_states(seq, attention_mask=torch.ones_like(seq))
    # Mean over the image codes only (not bos/boi/eoi or layout tokens), so it describes the photo.
    weights = codes.float().unsqueeze(-1)
    return ((hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)).cpu()


def _image_spans(backend: Backend, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``<bos>`` + each photo's image span as a batch, and where its image codes are (bool, same shape)."""
    spans = [[backend.special.bos, *backend.image_span(row.tolist())] for row in ids]
    seq = torch.tensor(spans, dtype=torch.long, device=backend.device)
    return seq, torch.isin(seq, torch.tensor(backend.special.image_token_ids, device=seq.device))


# ----------------------------------------------------------------------------------------------
# Encoder files
# ----------------------------------------------------------------------------------------------
@dataclass
class EncoderFileMeta:
    """The JSON half of an encoder file (``NAME.json``).

    Attributes:
        n_g, n_u, shared: the token layout of the concepts it writes.
        architecture: the :class:`EncoderConfig` as a mapping.
        feature_dim: size of a photo feature vector.
        feature_tokens: feature vectors per photo (1, or the image tokens for ``tokens``).
        hidden_size, base_model, base_family, base_fingerprint: the base model it was trained on.
        training_identities: ``[{name, concept_dir, photo_sha256: [...]}]``, every identity it
            was trained on, so a benchmark can check its test identities are not among them.
        steps: optimizer steps it was trained for.
        training_config: the resolved training recipe.
    """

    n_g: int
    n_u: int
    shared: bool
    architecture: dict[str, Any]
    feature_dim: int
    hidden_size: int
    base_model: str
    base_family: str
    base_fingerprint: str
    training_identities: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    training_config: dict[str, Any] = field(default_factory=dict)
    feature_tokens: int = 1
    format: str = ENCODER_FORMAT
    format_version: int = ENCODER_FORMAT_VERSION
    library_version: str = __version__

    @property
    def spec(self) -> ConceptSpec:
        """The layout of the concepts this encoder writes (named ``sks``; :func:`encode_concept` renames)."""
        return ConceptSpec("sks", self.n_g, self.n_u, self.shared)

    @property
    def config(self) -> EncoderConfig:
        return EncoderConfig(**self.architecture)


def encoder_paths(path: str | Path) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` of an encoder file given either of them or the stem."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_encoder(encoder: ConceptEncoder, meta: EncoderFileMeta, path: str | Path) -> tuple[Path, Path]:
    """Write the encoder's weights (fp32 safetensors) and its JSON sidecar, each atomically.

    Returns:
        The two paths.
    """
    from safetensors.torch import save_file

    st_path, json_path = encoder_paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}
    tmp_st, tmp_json = st_path.with_suffix(".safetensors.tmp"), json_path.with_suffix(".json.tmp")
    save_file(tensors, str(tmp_st), metadata={"format": ENCODER_FORMAT})
    tmp_json.write_text(json.dumps(asdict(meta), indent=2, ensure_ascii=False))
    tmp_st.replace(st_path)
    tmp_json.replace(json_path)
    return st_path, json_path


def read_encoder_file(path: str | Path) -> tuple[EncoderFileMeta, dict[str, torch.Tensor]]:
    """Read and validate an encoder file without touching any model.

    Raises:
        ConceptError: a missing or malformed file, or a concept file given in its place.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st_path, json_path = encoder_paths(path)
    for p in (st_path, json_path):
        if not p.is_file():
            raise ConceptError(
                f"encoder file {p} does not exist (an encoder is NAME.safetensors + NAME.json, "
                "written by `yochameleon encoder train`)"
            )
    try:
        raw = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConceptError(f"{json_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != ENCODER_FORMAT:
        raise ConceptError(
            f"{json_path} is not a concept-encoder file (a concept file? encoders are written by "
            "`yochameleon encoder train`)"
        )
    if raw.get("format_version") != ENCODER_FORMAT_VERSION:
        raise ConceptError(
            f"{json_path} has encoder format {raw.get('format_version')!r}; this version reads {ENCODER_FORMAT_VERSION}"
        )
    try:
        meta = EncoderFileMeta(**raw)
        meta.spec  # noqa: B018 - validates the token layout
        meta.config  # noqa: B018 - validates the architecture
    except (TypeError, ConfigError) as exc:
        raise ConceptError(f"{json_path} is not a valid encoder sidecar: {exc}") from exc
    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConceptError(f"{st_path} is truncated or not a safetensors file: {exc}") from exc
    return meta, tensors


def load_encoder(path: str | Path, backend: Backend | None = None) -> tuple[ConceptEncoder, EncoderFileMeta]:
    """An encoder from its file, in eval mode on CPU, checked against ``backend`` when given.

    Raises:
        ConceptError: see :func:`read_encoder_file`; weights that do not fit the recorded architecture.
        IncompatibleBaseModelError: the encoder was trained on another base model.
    """
    meta, tensors = read_encoder_file(path)
    if backend is not None:
        check_encoder_base(meta, backend, path)
    encoder = ConceptEncoder(
        meta.feature_dim,
        meta.hidden_size,
        meta.spec.n_tokens,
        meta.config,
        feature_tokens=meta.feature_tokens,
    )
    try:
        encoder.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ConceptError(
            f"{encoder_paths(path)[0]} does not fit the architecture in its sidecar: {exc}"
        ) from exc
    return encoder.eval(), meta


def check_encoder_base(meta: EncoderFileMeta, backend: Backend, path: str | Path = "encoder") -> None:
    """Refuse an encoder trained on another base model than ``backend``.

    Raises:
        IncompatibleBaseModelError: fingerprint or hidden size differ.
    """
    if meta.base_fingerprint != backend.fingerprint() or meta.hidden_size != backend.hidden_size:
        raise IncompatibleBaseModelError(
            f"encoder {path} was trained on {meta.base_model!r} (fingerprint {meta.base_fingerprint}), "
            f"not on {backend.name_or_path!r} (fingerprint {backend.fingerprint()}); train an encoder "
            "on this base model"
        )


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Encoding a concept
# ----------------------------------------------------------------------------------------------
def choose_photos(n: int, limit: int) -> list[int]:
    """Indices of at most ``limit`` of ``n`` photos, evenly spread (all of them when ``n <= limit``)."""
    if n <= limit:
        return list(range(n))
    # Half up, not Python's round-half-even, so the choice is symmetric: 7 photos -> 1, 3, 4, 6, 7.
    return [int(i * (n - 1) / (limit - 1) + 0.5) for i in range(limit)] if limit > 1 else [0]


def encode_rows(
    encoder: ConceptEncoder, meta: EncoderFileMeta, backend: Backend, images: list[Image.Image]
) -> dict[str, torch.Tensor]:
    """The concept rows ``{"embed", "head"}`` ``[n_tokens, H]`` (fp32, CPU) the encoder writes for ``images``."""
    features = photo_features(backend, images, meta.config.features)
    with torch.no_grad():
        rows = encoder(features.unsqueeze(0))
    return {k: v[0].detach().float().cpu().contiguous() for k, v in rows.items()}


def encode_concept(
    encoder_path: str | Path,
    backend: Backend,
    photos: Sequence[str | Path | Image.Image],
    name: str,
    out: str | Path | None = None,
) -> Path:
    """Write the concept file an encoder makes from a few photos; it loads wherever a trained one does.

    The concept is attached to ``backend`` only while it is written (the same writer as ``train``:
    :func:`~yochameleon.concept.save_concept`) and detached again, so ``backend`` is left as it was.

    Args:
        encoder_path: the encoder file (``.safetensors``, ``.json`` or their common stem).
        backend: the base model the encoder was trained on.
        photos: 1 to 5 photos (paths or RGB images); of more, 5 evenly spread ones are used (a warning
            says so), since the encoder was trained on sets of at most ``max_photos``.
        name: the concept's name.
        out: the concept file to write (``DIR/NAME`` stem or ``.safetensors`` path); default
            ``concepts/NAME`` in the working directory.

    Returns:
        The ``.safetensors`` path of the concept file (its ``.json`` lies beside it).

    Raises:
        DataError: no photos, or a photo that cannot be read.
        ConceptError: a missing or malformed encoder file, an invalid name, a name already attached.
        IncompatibleBaseModelError: the encoder was trained on another base model.
    """
    from yochameleon.data.photos import load_image_file

    if not photos:
        raise DataError(f"no photos to encode concept {name!r} from; give 1 to {MAX_PHOTOS} photos")
    encoder, meta = load_encoder(encoder_path, backend)
    spec = ConceptSpec(name, meta.n_g, meta.n_u, meta.shared)
    limit = meta.config.max_photos
    chosen = choose_photos(len(photos), limit)
    if len(chosen) < len(photos):
        logger.warning(
            "concept %r: %d photos given, the encoder was trained on sets of at most %d; using photos %s",
            spec.name,
            len(photos),
            limit,
            [i + 1 for i in chosen],
        )
    images = [
        photos[i] if not isinstance(photos[i], (str, Path)) else load_image_file(photos[i]) for i in chosen
    ]
    rows = encode_rows(encoder, meta, backend, images)
    tokens = allocate_ids(backend, spec)
    attach(backend, tokens, rows)
    try:
        target = Path(out) if out is not None else Path("concepts") / spec.name
        provenance = {
            "init": "encoder",
            "encoder": {
                "path": str(encoder_paths(encoder_path)[0]),
                "sha256": file_sha256(encoder_paths(encoder_path)[0]),
                "steps": meta.steps,
                "features": meta.config.features,
            },
            "photos": [
                str(photos[i]) if isinstance(photos[i], (str, Path)) else f"image {i}" for i in chosen
            ],
        }
        st_path, _ = save_concept(backend, spec.name, target, training_config=provenance)
    finally:
        detach(backend, spec.name)
    return st_path


def encode_folder(
    encoder_path: str | Path,
    backend: Backend,
    concept_dir: str | Path,
    out_dir: str | Path,
    name: str | None = None,
) -> Path:
    """:func:`encode_concept` for a concept folder: its photos, its name (``concept.yaml`` or folder).

    Returns:
        ``OUT_DIR/NAME.safetensors``.

    Raises:
        DataError: the folder is missing, has no ``photos/`` or no usable photo.
    """
    from yochameleon.data.concept_folder import ConceptFolder

    folder = ConceptFolder.load(concept_dir, min_photos=1)
    name = name or folder.name
    return encode_concept(encoder_path, backend, folder.photo_paths, name, Path(out_dir) / name)


__all__ = [
    "FEATURES",
    "ConceptEncoder",
    "EncoderConfig",
    "EncoderFileMeta",
    "check_encoder_base",
    "encode_concept",
    "encode_folder",
    "encode_rows",
    "image_id_features",
    "load_encoder",
    "photo_features",
    "read_encoder_file",
    "save_encoder",
]
