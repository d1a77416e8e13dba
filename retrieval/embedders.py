"""Image/text embedders used to build and query retrieval indexes.

Every embedder returns L2-normalized ``float32`` vectors, so an inner-product index gives cosine similarity.
Each one also exposes an :attr:`Embedder.identity` dictionary describing exactly which model produced the
vectors; an index stores it and refuses to be searched with vectors from anything else.

Two implementations ship:

* :class:`OpenClipEmbedder` -- any OpenCLIP model (built-in names, ``hf-hub:`` names, or a custom
  architecture JSON), with weights from a pretrained tag, a local file, or random init for tests.
* :class:`TestEmbedder` -- a deterministic, content-based embedder with no neural network, for tests and
  CPU smoke runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from yochameleon.data.photos import PhotoError, open_image
from yochameleon.errors import ConfigError, DataError


class _DropRandomInitWarning(contextlib.AbstractContextManager, logging.Filter):
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" for the duration of a block.

    open_clip logs it through the root logger whenever it is told not to load weights, also when our own
    checkpoint is loaded right after, where it is a false alarm.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    def __enter__(self):
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeFilter(self)


ImageLike = Image.Image | str | Path

__all__ = [
    "Embedder",
    "ImageLike",
    "OpenClipEmbedder",
    "TestEmbedder",
    "build_embedder",
    "describe_embedder",
    "embedder_from_identity",
    "identities_match",
    "load_image_rgb",
    "comparable_identity",
    "resolve_embedder",
    "sha256_file",
]

# Keys of an identity that say *where* something was found, not *what* it is. Two identities that differ
# only here (e.g. the same weights file moved to another folder) describe the same embedding space.
_LOCATION_KEY = "locations"


@runtime_checkable
class Embedder(Protocol):
    """What the index and the mining code need from an embedder."""

    @property
    def identity(self) -> dict[str, Any]:
        """JSON-serialisable description of the embedding space (model, weights hash, ...)."""
        ...

    @property
    def dim(self) -> int:
        """Length of every returned vector."""
        ...

    def embed_images(self, images: Sequence[ImageLike], progress: bool = True) -> np.ndarray:
        """Embed images (PIL images or paths) into an ``[N, dim]`` float32 L2-normalized array."""
        ...

    def embed_texts(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        """Embed texts into an ``[N, dim]`` float32 L2-normalized array."""
        ...


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file's bytes (read in chunks, so huge files are fine)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def load_image_rgb(image: ImageLike) -> Image.Image:
    """Open an image (or take a PIL image) and convert it to 8-bit RGB.

    Handles the modes that a plain ``convert("RGB")`` gets wrong: 16/32-bit grayscale is rescaled rather than
    clipped, transparent images are composited onto white rather than onto black, and EXIF rotation is applied.

    Raises:
        DataError: the file is missing, not an image, truncated, or a decompression bomb.
    """
    if isinstance(image, Image.Image):
        img = image
    else:
        try:
            # The project's one pixel limit, checked from the header before decoding.
            img = open_image(image)
            img.load()
        except (PhotoError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read image {image}: {exc}") from exc
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken EXIF must not lose an otherwise good image
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Wide grayscale: scale the actual range to 0..255 instead of clipping everything above 255.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _normalize_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # A zero vector (e.g. a perfectly flat image) stays zero instead of becoming NaN.
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def comparable_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """Drop the location-only part of an identity, leaving what determines the embedding space."""
    return {key: value for key, value in identity.items() if key != _LOCATION_KEY}


def identities_match(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """True when two identities describe the same embedding space (file locations are ignored)."""
    return json.dumps(comparable_identity(first), sort_keys=True) == json.dumps(
        comparable_identity(second), sort_keys=True
    )


class TestEmbedder:
    """Deterministic content-based embedder without a neural network.

    Images are reduced to a small colour thumbnail, mean-centred and sent through a fixed random projection
    (seeded), then normalized. Random projections roughly preserve inner products, so visually similar images
    get similar vectors, which is all the retrieval tests need. Texts use a signed hashed bag of words.

    Args:
        dim: Output dimension.
        seed: Seed of the projection matrix; part of the identity.
        thumbnail: Side of the square thumbnail (pixels).
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, dim: int = 64, seed: int = 0, thumbnail: int = 8) -> None:
        if dim < 1:
            raise ConfigError(f"TestEmbedder dim must be >= 1, got {dim}")
        if thumbnail < 1:
            raise ConfigError(f"TestEmbedder thumbnail must be >= 1, got {thumbnail}")
        self._dim = int(dim)
        self.seed = int(seed)
        self.thumbnail = int(thumbnail)
        rng = np.random.default_rng(self.seed)
        features = 3 * self.thumbnail * self.thumbnail
        self._projection = rng.standard_normal((features, self._dim)).astype(np.float32) / np.sqrt(features)

    @property
    def identity(self) -> dict[str, Any]:
        return {"kind": "test", "dim": self._dim, "seed": self.seed, "thumbnail": self.thumbnail}

    @property
    def dim(self) -> int:
        return self._dim

    def _features(self, image: ImageLike) -> np.ndarray:
        rgb = load_image_rgb(image).resize((self.thumbnail, self.thumbnail), Image.Resampling.BILINEAR)
        pixels = np.asarray(rgb, dtype=np.float32).reshape(-1) / 255.0
        return pixels - pixels.mean()

    def embed_images(self, images: Sequence[ImageLike], progress: bool = True) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self._dim), dtype=np.float32)
        rows = [self._features(img) for img in tqdm(images, desc="embed (test)", disable=not progress)]
        return _normalize_rows(np.stack(rows) @ self._projection)

    def embed_texts(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(tqdm(texts, desc="embed texts (test)", disable=not progress)):
            for word in re.findall(r"\w+", text.lower()):
                # Seed-dependent hash so two seeds give two different text spaces, like the image side.
                digest = hashlib.sha256(f"{self.seed}:{word}".encode()).digest()
                bucket = int.from_bytes(digest[:4], "little") % self._dim
                out[row, bucket] += 1.0 if digest[4] & 1 else -1.0
        return _normalize_rows(out)


class OpenClipEmbedder:
    """OpenCLIP image/text embedder.

    Args:
        model: Any open_clip model name (``"ViT-H-14"``, ``"hf-hub:org/repo"``, or the file stem of
            ``model_config``).
        pretrained: An open_clip pretrained tag (e.g. ``"laion2b_s32b_b79k"``). Mutually exclusive with
            ``weights``.
        weights: A local checkpoint file (state dict, ``.pt``/``.bin``/``.safetensors``).
        model_config: A JSON file describing a custom architecture (open_clip's ``embed_dim`` / ``vision_cfg``
            / ``text_cfg`` format). It is registered with open_clip under its file stem, which is then the
            default ``model`` name.
        device: Torch device string.
        batch_size: Images or texts per forward pass.
        random_weights: Allow a randomly initialised model (tests and smoke runs only; embeddings are not
            meaningful). Initialisation is seeded by ``seed`` so the identity is reproducible.
        seed: Seed of the random initialisation when ``random_weights`` is true.

    Raises:
        ConfigError: no weight source (and not ``random_weights``), both a tag and a file, a missing file,
            a bad architecture JSON, or a model open_clip does not know.

    ``hf-hub:`` models carry their weights on the hub, so they need neither a tag nor a file.
    """

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        weights: str | Path | None = None,
        model_config: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        random_weights: bool = False,
        seed: int = 0,
    ) -> None:
        import open_clip
        import torch

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        config_info = None
        if model_config is not None:
            config_info = self._register_config(Path(model_config))
            if model and model != config_info["name"]:
                raise ConfigError(
                    f"--model-config {model_config} registers model {config_info['name']!r}; drop --model "
                    f"{model!r} or pass --model {config_info['name']}"
                )
            model = config_info["name"]
        if not model:
            raise ConfigError("OpenClipEmbedder needs a model name (or --model-config JSON)")
        is_hub = model.startswith("hf-hub:") or model.startswith("local-dir:")
        if pretrained and weights:
            raise ConfigError("pass either a pretrained tag or a weights file, not both")
        if is_hub and pretrained:
            raise ConfigError(f"{model!r} carries its own weights; drop the pretrained tag {pretrained!r}")
        if random_weights and (pretrained or weights):
            raise ConfigError("--random-weights cannot be combined with a pretrained tag or weights file")
        if not (pretrained or weights or random_weights or is_hub):
            raise ConfigError(
                f"OpenCLIP model {model!r} has no weights: pass a pretrained tag (--pretrained TAG), a local "
                "weights file (--weights FILE), or --random-weights for a randomly initialised test model"
            )
        if not is_hub and model not in open_clip.list_models():
            raise ConfigError(
                f"unknown open_clip model {model!r}; use a built-in name, an hf-hub: name, or --model-config"
            )
        weights_path = Path(weights).expanduser().resolve() if weights else None
        if weights_path is not None and not weights_path.is_file():
            raise ConfigError(f"weights file not found: {weights_path}")

        self.model_name = model
        self.pretrained = pretrained
        self.device = device
        self.batch_size = int(batch_size)
        self.random_weights = bool(random_weights)
        self.seed = int(seed)
        self._weights_path = weights_path
        self._config_info = config_info

        # Random init is seeded (without disturbing the caller's RNG) so the same identity means the same model.
        quiet = _DropRandomInitWarning() if weights_path is not None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[]), quiet:
            torch.manual_seed(self.seed)
            try:
                net, _, preprocess = open_clip.create_model_and_transforms(
                    model,
                    pretrained=pretrained,
                    load_weights=not (random_weights or weights_path is not None),
                    device=device,
                )
            except (RuntimeError, ValueError, OSError) as exc:
                raise ConfigError(f"cannot create open_clip model {model!r} ({pretrained=}): {exc}") from exc
        if weights_path is not None:
            try:
                open_clip.load_checkpoint(net, str(weights_path), device=device)
            except (RuntimeError, ValueError, OSError, KeyError, EOFError, pickle.UnpicklingError) as exc:
                raise ConfigError(f"cannot load weights {weights_path} into {model!r}: {exc}") from exc
        net.eval()
        self._net = net
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(model)
        self._weights_sha256 = sha256_file(weights_path) if weights_path is not None else None
        with torch.no_grad():
            probe = self._net.encode_text(self._tokenizer(["a"]).to(device))
        self._dim = int(probe.shape[-1])

    @staticmethod
    def _register_config(path: Path) -> dict[str, Any]:
        import open_clip

        if not path.is_file():
            raise ConfigError(f"model config not found: {path}")
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"model config {path} is not valid JSON: {exc}") from exc
        missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
        if not isinstance(config, dict) or missing:
            raise ConfigError(f"model config {path} lacks open_clip keys {missing}")
        # open_clip registers a config file under its stem; do the same so the name is predictable.
        open_clip.add_model_config(path)
        canonical = json.dumps(config, sort_keys=True)
        return {
            "name": path.stem,
            "sha256": hashlib.sha256(canonical.encode()).hexdigest(),
            "path": str(path),
        }

    @property
    def identity(self) -> dict[str, Any]:
        identity: dict[str, Any] = {
            "kind": "open_clip",
            "model": self.model_name,
            "pretrained": self.pretrained,
            "weights_sha256": self._weights_sha256,
            "model_config_sha256": self._config_info["sha256"] if self._config_info else None,
            "random_weights": self.random_weights,
            "seed": self.seed if self.random_weights else None,
            "dim": self._dim,
        }
        identity[_LOCATION_KEY] = {
            "weights": str(self._weights_path) if self._weights_path else None,
            "model_config": self._config_info["path"] if self._config_info else None,
        }
        return identity

    @property
    def dim(self) -> int:
        return self._dim

    def embed_images(self, images: Sequence[ImageLike], progress: bool = True) -> np.ndarray:
        import torch

        chunks = []
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc=f"embed {self.model_name}", unit="batch", disable=not progress):
            batch = [self._preprocess(load_image_rgb(img)) for img in images[start : start + self.batch_size]]
            with torch.no_grad():
                features = self._net.encode_image(torch.stack(batch).to(self.device))
            chunks.append(features.float().cpu().numpy())
        if not chunks:
            return np.zeros((0, self._dim), dtype=np.float32)
        return _normalize_rows(np.concatenate(chunks))

    def embed_texts(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        import torch

        chunks = []
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc=f"embed texts {self.model_name}", unit="batch", disable=not progress):
            tokens = self._tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            with torch.no_grad():
                chunks.append(self._net.encode_text(tokens).float().cpu().numpy())
        if not chunks:
            return np.zeros((0, self._dim), dtype=np.float32)
        return _normalize_rows(np.concatenate(chunks))


def build_embedder(name: str, **options: Any) -> Embedder:
    """Create an embedder by name.

    Args:
        name: ``"open_clip"`` or ``"test"``.
        **options: Constructor arguments of :class:`OpenClipEmbedder` or :class:`TestEmbedder`. ``None``
            values are dropped so CLI namespaces can be passed straight through.

    Raises:
        ConfigError: unknown name or unknown option.
    """
    options = {key: value for key, value in options.items() if value is not None}
    factories = {"open_clip": OpenClipEmbedder, "test": TestEmbedder}
    if name not in factories:
        raise ConfigError(f"unknown embedder {name!r}; choose one of {sorted(factories)}")
    try:
        return factories[name](**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for embedder {name!r}: {exc}") from exc


def embedder_from_identity(identity: dict[str, Any], device: str = "cpu", batch_size: int = 32) -> Embedder:
    """Re-create the embedder an index was built with, from its stored identity.

    Raises:
        ConfigError: the identity is unknown, its weights/config files are gone, or the re-created embedder
            does not reproduce the stored identity (e.g. the weights file changed).
    """
    kind = identity.get("kind")
    if kind == "test":
        embedder: Embedder = TestEmbedder(
            dim=identity["dim"], seed=identity["seed"], thumbnail=identity.get("thumbnail", 8)
        )
    elif kind == "open_clip":
        locations = identity.get(_LOCATION_KEY, {})
        embedder = OpenClipEmbedder(
            model=identity["model"],
            pretrained=identity.get("pretrained"),
            weights=locations.get("weights"),
            model_config=locations.get("model_config"),
            device=device,
            batch_size=batch_size,
            random_weights=bool(identity.get("random_weights")),
            seed=identity.get("seed") or 0,
        )
    else:
        raise ConfigError(f"unknown embedder kind in identity: {kind!r}")
    if not identities_match(embedder.identity, identity):
        raise ConfigError(
            "re-created embedder does not match the stored identity (weights or config changed?): "
            f"stored {comparable_identity(identity)}, got {comparable_identity(embedder.identity)}"
        )
    return embedder


def describe_embedder(identity: dict[str, Any]) -> str:
    """A short name of an embedding space for reports, e.g. ``OpenCLIP ViT-H-14 (pretrained laion2b_s32b_b79k)``.

    The test embedder says that it is not CLIP, so a number computed with it is never read as CLIP-I.
    """
    kind = identity.get("kind")
    if kind == "test":
        side = identity.get("thumbnail", 8)
        return (
            f"test embedder (random projection of {side}x{side} thumbnails, dim {identity.get('dim')}, "
            f"seed {identity.get('seed')}; not CLIP)"
        )
    if kind == "open_clip":
        if identity.get("pretrained"):
            source = f"pretrained {identity['pretrained']}"
        elif identity.get("weights_sha256"):
            source = f"weights sha256 {identity['weights_sha256'][:12]}"
        elif identity.get("random_weights"):
            source = f"random init, seed {identity.get('seed')}; not trained"
        else:
            source = "hub weights"
        return f"OpenCLIP {identity.get('model')} ({source})"
    return f"embedder {comparable_identity(identity)}"


def resolve_embedder(
    name: str | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    weights: str | Path | None = None,
    model_config: str | Path | None = None,
    index_dir: str | Path | None = None,
    device: str = "cpu",
) -> Embedder:
    """The embedder of image metrics (CLIP-I) and of MyVLM's concept head.

    In order: the test embedder when ``name`` is ``"test"``; an OpenCLIP model when any OpenCLIP
    option is given; otherwise the embedder stored with the index at ``index_dir``. The test
    embedder is used only when asked for by name, so an index built with it is refused here.

    Args:
        name: ``"open_clip"`` (the default) or ``"test"``.
        model: open_clip model name (or the stem of ``model_config``).
        pretrained: an open_clip pretrained tag.
        weights: a local open_clip checkpoint file.
        model_config: a custom open_clip architecture JSON.
        index_dir: a retrieval index whose stored embedder is the default.
        device: torch device of an OpenCLIP model.

    Raises:
        ConfigError: an unknown name, OpenCLIP options with the test embedder, no source for an
            OpenCLIP model, or an index built with the test embedder.
    """
    options = {"model": model, "pretrained": pretrained, "weights": weights, "model_config": model_config}
    given = [key for key, value in options.items() if value]
    if name == "test":
        if given:
            raise ConfigError(f"the test embedder takes no OpenCLIP options (got {', '.join(given)})")
        return TestEmbedder()
    if name not in (None, "open_clip"):
        raise ConfigError(f"unknown embedder {name!r}; choose open_clip or test")
    if given:
        return OpenClipEmbedder(model, pretrained, weights, model_config, device=device)
    if index_dir is not None:
        from .index import ImageIndex

        identity = ImageIndex.load(index_dir).identity
        if identity.get("kind") == "test":
            raise ConfigError(
                f"the index {index_dir} was built with the test embedder, which is not CLIP; pass an "
                "OpenCLIP model (a pretrained tag or a weights file), or ask for the test embedder by name"
            )
        return embedder_from_identity(identity, device=device)
    raise ConfigError(
        "no image embedder: pass an OpenCLIP model (a pretrained tag, or a weights file with its model "
        "config), or a retrieval index built with one; the test embedder must be asked for by name"
    )
