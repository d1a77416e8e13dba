"""The VQGAN decoder that upstream Chameleon lacks, and reading/writing its weights.

Upstream transformers' ``ChameleonVQVAE`` holds the encoder, the codebook (``quantize``),
``quant_conv`` and ``post_quant_conv``, but no decoder: loading an Anole-format checkpoint drops
every ``model.vqmodel.decoder.*`` tensor as an unexpected key. :class:`ChameleonVQDecoder` is the
mirror of the upstream encoder (taming-transformers VQGAN layout) with parameter names and shapes
that match those checkpoint tensors exactly, so :func:`load_vq_decoder_state` can read them straight
from the safetensors shards and :meth:`torch.nn.Module.load_state_dict` takes them as they are.

Image codes here are VQ codebook indices (``0 .. num_embeddings-1``), not vocabulary ids; the
backend maps between the two with upstream's ``ChameleonImageVocabularyMapping``
(``bpe2img`` / ``img2bpe``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from yochameleon.errors import BackendError, ConfigError

VQ_PREFIX = "model.vqmodel."
DECODER_PREFIX = VQ_PREFIX + "decoder."
POST_QUANT_CONV_PREFIX = VQ_PREFIX + "post_quant_conv."
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Written next to a model that has no single file to merge into (e.g. a fresh or sharded directory).
DECODER_SHARD = "vq_decoder.safetensors"

GROUPS = 32  # GroupNorm groups in every VQGAN norm; channel counts must be multiples of it
_SUPPORTED_ATTN_TYPES = ("vanilla", None, "none")
_MAX_LISTED = 5  # how many differences an error message lists


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=GROUPS, num_channels=channels, eps=1e-6, affine=True)


class _ResnetBlock(nn.Module):
    """Pre-activation residual block; a 1x1 ``nin_shortcut`` only where the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class _AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (the VQGAN "vanilla" block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1, H*W, C]
            return t.reshape(batch, channels, height * width).transpose(1, 2).unsqueeze(1)

        # SDPA's default 1/sqrt(C) scale is exactly the VQGAN softmax(q k^T / sqrt(C)) v.
        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class _Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (named ``upsample.conv`` in checkpoints)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _config_value(config: Any, name: str) -> Any:
    if isinstance(config, Mapping):
        if name not in config:
            raise ConfigError(f"VQ config is missing {name!r}")
        return config[name]
    if not hasattr(config, name):
        raise ConfigError(f"VQ config is missing {name!r}")
    return getattr(config, name)


def _checked_config(config: Any) -> dict[str, Any]:
    """The decoder-relevant fields of a ``ChameleonVQVAEConfig`` (or a dict), validated."""
    names = (
        "embed_dim",
        "latent_channels",
        "base_channels",
        "channel_multiplier",
        "num_res_blocks",
        "attn_resolutions",
        "resolution",
        "in_channels",
        "dropout",
        "attn_type",
    )
    cfg = {name: _config_value(config, name) for name in names}
    multipliers = cfg["channel_multiplier"]
    if not isinstance(multipliers, Iterable) or not list(multipliers):
        raise ConfigError(f"channel_multiplier must be a non-empty list, got {multipliers!r}")
    cfg["channel_multiplier"] = [int(m) for m in multipliers]
    if any(m < 1 for m in cfg["channel_multiplier"]):
        raise ConfigError(f"channel_multiplier entries must be >= 1, got {multipliers!r}")
    for name in (
        "embed_dim",
        "latent_channels",
        "base_channels",
        "num_res_blocks",
        "resolution",
        "in_channels",
    ):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ConfigError(f"VQ config {name} must be a positive integer, got {cfg[name]!r}")
    bad = [cfg["base_channels"] * m for m in cfg["channel_multiplier"] if cfg["base_channels"] * m % GROUPS]
    if bad:
        raise ConfigError(
            f"VQ base_channels x channel_multiplier must be multiples of {GROUPS} (GroupNorm), got {bad}"
        )
    factor = 2 ** (len(cfg["channel_multiplier"]) - 1)
    if cfg["resolution"] % factor:
        raise ConfigError(
            f"VQ resolution {cfg['resolution']} is not divisible by the downsampling factor {factor}"
        )
    if cfg["attn_type"] not in _SUPPORTED_ATTN_TYPES:
        raise ConfigError(f"VQ attn_type must be 'vanilla' or None, got {cfg['attn_type']!r}")
    if not 0.0 <= float(cfg["dropout"]) < 1.0:
        raise ConfigError(f"VQ dropout must be in [0, 1), got {cfg['dropout']!r}")
    cfg["attn_resolutions"] = [int(r) for r in (cfg["attn_resolutions"] or [])]
    return cfg


class ChameleonVQDecoder(nn.Module):
    """VQGAN decoder for Chameleon / Anole image codes, the mirror of upstream's encoder.

    Layout (names as in ``model.vqmodel.decoder.*`` of Anole checkpoints): ``conv_in`` ->
    ``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2`` -> ``up.{level}.block.{j}``
    (``num_res_blocks + 1`` per level, walked from the deepest level up), ``up.{level}.attn.{j}``
    where the level's resolution is in ``attn_resolutions``, ``up.{level}.upsample.conv`` on every
    level but 0 -> ``norm_out`` -> SiLU -> ``conv_out``.

    Args:
        config: a ``ChameleonVQVAEConfig`` (or a mapping with the same fields).

    Raises:
        ConfigError: the config is incomplete or describes a network that cannot be built.

    Example:
        >>> from transformers import ChameleonVQVAEConfig
        >>> decoder = ChameleonVQDecoder(ChameleonVQVAEConfig(resolution=32, base_channels=32,
        ...                              channel_multiplier=[1, 2], latent_channels=16, embed_dim=16))
        >>> decoder(torch.zeros(1, 16, 16, 16)).shape
        torch.Size([1, 3, 32, 32])
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        cfg = _checked_config(config)
        multipliers = cfg["channel_multiplier"]
        self.num_levels = len(multipliers)
        self.num_res_blocks = cfg["num_res_blocks"]
        self.latent_channels = cfg["latent_channels"]
        self.out_channels = cfg["in_channels"]
        self.resolution = cfg["resolution"]
        self.latent_grid = self.resolution // 2 ** (self.num_levels - 1)
        vanilla = cfg["attn_type"] == "vanilla"

        block_in = cfg["base_channels"] * multipliers[-1]
        self.conv_in = nn.Conv2d(self.latent_channels, block_in, kernel_size=3, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = _ResnetBlock(block_in, block_in, cfg["dropout"])
        self.mid.attn_1 = _AttnBlock(block_in) if vanilla else nn.Identity()
        self.mid.block_2 = _ResnetBlock(block_in, block_in, cfg["dropout"])

        # Built deepest level first (the order data flows), stored by level index like the encoder.
        levels: dict[int, nn.Module] = {}
        current_res = self.latent_grid
        for level in reversed(range(self.num_levels)):
            block_out = cfg["base_channels"] * multipliers[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(self.num_res_blocks + 1):
                stage.block.append(_ResnetBlock(block_in, block_out, cfg["dropout"]))
                block_in = block_out
                if vanilla and current_res in cfg["attn_resolutions"]:
                    stage.attn.append(_AttnBlock(block_in))
            if level != 0:
                stage.upsample = _Upsample(block_in)
                current_res *= 2
            levels[level] = stage
        self.up = nn.ModuleList(levels[level] for level in range(self.num_levels))

        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, self.out_channels, kernel_size=3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode post-quant-conv latents ``[B, latent_channels, h, w]`` to pixels ``[B, C, h*f, w*f]``.

        The output is not clamped (so it stays differentiable everywhere); trained decoders produce
        values in about ``[-1, 1]``.
        """
        h = self.conv_in(latents)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_levels)):
            stage = self.up[level]
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[j](h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def expected_decoder_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter names (without prefix) and shapes of the decoder for ``config``; allocates nothing."""
    with torch.device("meta"):
        decoder = ChameleonVQDecoder(config)
    return {name: tuple(t.shape) for name, t in decoder.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Codes <-> pixels


def _decoder_dtype(decoder: nn.Module) -> torch.dtype:
    return next(decoder.parameters()).dtype


def _check_pair(vqmodel: nn.Module, decoder: ChameleonVQDecoder) -> None:
    post = vqmodel.post_quant_conv
    if post.out_channels != decoder.latent_channels:
        raise BackendError(
            f"VQ model post_quant_conv gives {post.out_channels} channels but the decoder expects "
            f"{decoder.latent_channels}; were they built from different VQ configs?"
        )
    if vqmodel.quantize.embedding.embedding_dim != post.in_channels:
        raise BackendError(
            f"VQ codebook dim {vqmodel.quantize.embedding.embedding_dim} != post_quant_conv input "
            f"channels {post.in_channels}"
        )


def decode_codes(
    vqmodel: nn.Module, decoder: ChameleonVQDecoder, codes: torch.Tensor, *, clamp: bool = True
) -> torch.Tensor:
    """Decode VQ codebook indices to images.

    Codebook lookup -> square latent grid -> ``vqmodel.post_quant_conv`` -> ``decoder``.

    Args:
        vqmodel: upstream ``ChameleonVQVAE`` (``model.model.vqmodel``); supplies the codebook and
            ``post_quant_conv``.
        decoder: a :class:`ChameleonVQDecoder` built from the same VQ config.
        codes: integer tensor ``[B, h*w]`` of codebook indices (not vocabulary ids), row-major,
            with ``h == w``.
        clamp: clamp the output to ``[-1, 1]``.

    Returns:
        Float tensor ``[B, 3, H, W]`` (``H = h * 2**(levels-1)``) in ``[-1, 1]`` when ``clamp``.

    Raises:
        BackendError: ``codes`` is not a 2-D integer tensor of square length with indices inside
            the codebook, or the VQ model and decoder do not fit together.
    """
    _check_pair(vqmodel, decoder)
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise BackendError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
    if codes.dim() != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise BackendError(f"codes must have shape [batch, h*w] with both > 0, got {tuple(codes.shape)}")
    side = math.isqrt(codes.shape[1])
    if side * side != codes.shape[1]:
        raise BackendError(f"{codes.shape[1]} codes per image do not form a square grid")
    codebook = vqmodel.quantize.embedding
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= codebook.num_embeddings:
        raise BackendError(f"codes must lie in [0, {codebook.num_embeddings}), got range [{low}, {high}]")
    embedded = codebook(codes.to(codebook.weight.device).long())  # [B, h*w, embed_dim]
    grid = embedded.reshape(codes.shape[0], side, side, -1).permute(0, 3, 1, 2).contiguous()
    latents = vqmodel.post_quant_conv(grid.to(vqmodel.post_quant_conv.weight.dtype))
    pixels = decoder(latents.to(_decoder_dtype(decoder)))
    return pixels.clamp(-1.0, 1.0) if clamp else pixels


@dataclass
class Reconstruction:
    """Result of :func:`reconstruct`.

    Attributes:
        pixels: decoded images ``[B, C, H, W]``, not clamped, differentiable w.r.t. encoder,
            codebook and decoder (straight-through quantization).
        codes: codebook indices ``[B, h*w]`` chosen by the quantizer.
        embedding_loss: the VQ codebook + commitment loss from upstream's quantizer.
        quantized: the quantized latents ``[B, embed_dim, h, w]`` (straight-through: their values are
            codebook rows, their gradients reach the encoder), e.g. for a loss on what the codes carry.
    """

    pixels: torch.Tensor
    codes: torch.Tensor
    embedding_loss: torch.Tensor
    quantized: torch.Tensor | None = None


def reconstruct(vqmodel: nn.Module, decoder: ChameleonVQDecoder, pixels: torch.Tensor) -> Reconstruction:
    """Encode, quantize and decode images: the full VQ autoencoder pass, for training a VQ tokenizer.

    ``vqmodel.encoder`` -> ``quant_conv`` -> ``quantize`` (straight-through) -> ``post_quant_conv``
    -> ``decoder``. A training loss is typically ``mse(out.pixels, pixels) + out.embedding_loss``.

    Args:
        vqmodel: upstream ``ChameleonVQVAE``. Upstream puts it in eval mode; call ``.train()`` to train.
        decoder: a :class:`ChameleonVQDecoder` built from the same VQ config.
        pixels: float images ``[B, C, H, W]`` in ``[-1, 1]``; ``H`` and ``W`` divisible by the
            downsampling factor.

    Raises:
        BackendError: ``pixels`` has the wrong rank, channel count or size.
    """
    _check_pair(vqmodel, decoder)
    factor = 2 ** (decoder.num_levels - 1)
    if not isinstance(pixels, torch.Tensor) or not pixels.dtype.is_floating_point or pixels.dim() != 4:
        raise BackendError("pixels must be a float tensor [batch, channels, height, width]")
    if pixels.shape[1] != decoder.out_channels:
        raise BackendError(
            f"pixels have {pixels.shape[1]} channels, the VQ model expects {decoder.out_channels}"
        )
    if pixels.shape[2] % factor or pixels.shape[3] % factor or pixels.shape[2] == 0:
        raise BackendError(f"image size {tuple(pixels.shape[2:])} is not a positive multiple of {factor}")
    hidden = vqmodel.encoder(pixels.to(vqmodel.quant_conv.weight.dtype))
    quantized, embedding_loss, indices = vqmodel.quantize(vqmodel.quant_conv(hidden))
    latents = vqmodel.post_quant_conv(quantized)
    out = decoder(latents.to(_decoder_dtype(decoder)))
    return Reconstruction(
        pixels=out,
        codes=indices.reshape(pixels.shape[0], -1),
        embedding_loss=embedding_loss,
        quantized=quantized,
    )


# ----------------------------------------------------------------------------------------------
# Checkpoint I/O: straight from safetensors shards, without going through from_pretrained


def _safetensors_error(path: Path, exc: Exception) -> BackendError:
    return BackendError(f"cannot read safetensors file {path}: {exc}")


def _file_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise _safetensors_error(path, exc) from exc


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"{index_path} is not a valid safetensors index: {exc}") from exc
    if not isinstance(weight_map, dict):
        raise BackendError(f"{index_path}: weight_map must be an object")
    return weight_map


def _tensor_locations(source: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, Path]:
    """Map every tensor name of a checkpoint to the safetensors file that holds it.

    A directory is read through ``model.safetensors.index.json`` when present; top-level
    ``*.safetensors`` files the index does not mention (a side file such as ``vq_decoder.safetensors``)
    are read too, so a decoder written next to a model is always found.
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.exists():
            raise BackendError(f"checkpoint path {root} does not exist")
        if root.is_file():
            files, listed = [root], {}
        else:
            listed = {}
            if (root / INDEX_FILE).is_file():
                listed = {name: root / shard for name, shard in _read_index(root / INDEX_FILE).items()}
                missing = sorted({str(p) for p in listed.values() if not p.is_file()})
                if missing:
                    raise BackendError(
                        f"index {root / INDEX_FILE} names missing shards: {missing[:_MAX_LISTED]}"
                    )
            indexed = set(listed.values())
            files = [p for p in sorted(root.glob("*.safetensors")) if p not in indexed]
            if not files and not listed:
                raise BackendError(f"{root} holds no safetensors checkpoint (*.safetensors)")
    else:
        files, listed = [Path(p) for p in source], {}
        if not files:
            raise BackendError("no checkpoint files given")
        for path in files:
            if not path.is_file():
                raise BackendError(f"checkpoint file {path} does not exist")
    locations = dict(listed)
    for path in files:
        for name in _file_keys(path):
            locations.setdefault(name, path)  # the index wins over an unlisted duplicate
    return locations


def _read_prefixed(locations: Mapping[str, Path], prefix: str) -> dict[str, torch.Tensor]:
    """Read only the tensors whose names start with ``prefix`` (prefix stripped), file by file."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in locations.items():
        if name.startswith(prefix):
            by_file.setdefault(path, []).append(name)
    state: dict[str, torch.Tensor] = {}
    for path, names in sorted(by_file.items()):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                available = set(handle.keys())
                for name in names:
                    if name not in available:
                        raise BackendError(f"{path} should hold {name} (per the index) but does not")
                    state[name[len(prefix) :]] = handle.get_tensor(name)
        except BackendError:
            raise
        except Exception as exc:
            raise _safetensors_error(path, exc) from exc
    return state


def _check_shapes(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{name}: {tuple(state[name].shape)} != expected {expected[name]}"
        for name in set(state) & set(expected)
        if tuple(state[name].shape) != tuple(expected[name])
    )
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            parts.append(f"{label} {len(items)}: {', '.join(items[:_MAX_LISTED])}{more}")
    raise BackendError(f"{what} do not match the VQ config; " + "; ".join(parts))


def load_vq_decoder_state(
    source: str | os.PathLike | Iterable[str | os.PathLike],
    config: Any | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Read the ``model.vqmodel.decoder.*`` tensors of a checkpoint, prefix stripped.

    Only those tensors are read (``safetensors.safe_open``), so this is cheap even for a 7B
    checkpoint. The result loads with ``ChameleonVQDecoder(config).load_state_dict(state)``.

    Args:
        source: a checkpoint directory (single ``model.safetensors``, sharded with
            ``model.safetensors.index.json``, and/or a side ``vq_decoder.safetensors``), one
            ``.safetensors`` file, or a list of files.
        config: the model's ``ChameleonVQVAEConfig``; when given, names and shapes are checked
            against the decoder it describes.
        dtype: cast the tensors to this dtype (default: as stored).

    Raises:
        BackendError: the path is missing or unreadable, the checkpoint has no decoder weights,
            or (with ``config``) names/shapes differ; the message lists the first differences.
    """
    locations = _tensor_locations(source)
    state = _read_prefixed(locations, DECODER_PREFIX)
    if not state:
        raise BackendError(
            f"checkpoint {source} has no VQ decoder weights ({DECODER_PREFIX}*); Meta's Chameleon "
            "checkpoints ship without them, Anole-format checkpoints and yochameleon tiny models have them"
        )
    if config is not None:
        _check_shapes(state, expected_decoder_shapes(config), f"VQ decoder weights in {source}")
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    return state


def load_vq_post_quant_conv_state(
    source: str | os.PathLike | Iterable[str | os.PathLike], config: Any | None = None
) -> dict[str, torch.Tensor]:
    """Read ``model.vqmodel.post_quant_conv.{weight,bias}`` of a checkpoint (keys ``weight``, ``bias``).

    Upstream transformers 5.x keeps and loads ``post_quant_conv`` itself; this exists for
    :func:`attach_vq_decoder`, which makes sure the pair the decoder was trained with is the one used.

    Raises:
        BackendError: the tensors are absent or (with ``config``) have the wrong shape.
    """
    state = _read_prefixed(_tensor_locations(source), POST_QUANT_CONV_PREFIX)
    if not state:
        raise BackendError(f"checkpoint {source} has no {POST_QUANT_CONV_PREFIX}* weights")
    if config is not None:
        embed_dim, latent = _config_value(config, "embed_dim"), _config_value(config, "latent_channels")
        _check_shapes(
            state,
            {"weight": (latent, embed_dim, 1, 1), "bias": (latent,)},
            f"post_quant_conv weights in {source}",
        )
    return state


def _cpu_copy(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if tensor.is_meta:
        raise BackendError("cannot save a module that lives on the meta device (it has no weights)")
    # A private contiguous copy: safetensors refuses shared or strided storage.
    return tensor.detach().to("cpu", dtype or tensor.dtype).contiguous().clone()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _merge_into_file(new: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``new`` into ``path``, keeping its other tensors and metadata."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt"}
    if path.exists():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or metadata
                for name in handle.keys():
                    if name not in new:
                        tensors[name] = handle.get_tensor(name)
        except Exception as exc:
            raise _safetensors_error(path, exc) from exc
    tensors.update(new)
    _atomic_save(tensors, path, metadata)


def _tensor_bytes(path: Path, names: Iterable[str]) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        total = 0
        for name in names:
            piece = handle.get_slice(name)
            total += math.prod(piece.get_shape()) * _DTYPE_BYTES.get(piece.get_dtype(), 4)
        return total


_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U8": 1,
    "I8": 1,
    "BOOL": 1,
}


def save_vq_decoder_state(
    decoder: nn.Module,
    target: str | os.PathLike,
    *,
    post_quant_conv: nn.Module | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write decoder weights as ``model.vqmodel.decoder.*`` tensors, the Anole checkpoint layout.

    Where they go:

    - ``target`` ends in ``.safetensors``: that file (its other tensors are kept if it exists).
    - a directory with ``model.safetensors.index.json``: a ``vq_decoder.safetensors`` shard,
      registered in the index's ``weight_map``.
    - a directory with ``model.safetensors``: merged into it (other tensors and metadata kept).
    - any other directory (created if needed): ``vq_decoder.safetensors``.

    Transformers ignores these tensors when loading the model, and :func:`load_vq_decoder_state`
    reads them back bit-exactly.

    Args:
        decoder: the decoder to save.
        target: a ``.safetensors`` file or a model directory.
        post_quant_conv: also write this conv as ``model.vqmodel.post_quant_conv.*`` (not needed
            next to a ``save_pretrained`` model, which already holds it).
        dtype: cast on save (default: keep the parameters' dtype).

    Returns:
        The file written.

    Raises:
        BackendError: the module is on the meta device or an existing file cannot be read.
    """
    tensors = {DECODER_PREFIX + name: _cpu_copy(t, dtype) for name, t in decoder.state_dict().items()}
    if post_quant_conv is not None:
        tensors.update(
            {
                POST_QUANT_CONV_PREFIX + name: _cpu_copy(t, dtype)
                for name, t in post_quant_conv.state_dict().items()
            }
        )
    target = Path(target)
    if target.suffix == ".safetensors" and not target.is_dir():
        _merge_into_file(tensors, target)
        return target
    index_path = target / INDEX_FILE
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        weight_map = _read_index(index_path)
        shard = target / DECODER_SHARD
        _merge_into_file(tensors, shard)
        # Older copies of these tensors in other shards stay on disk but the index no longer points at them.
        weight_map.update({name: DECODER_SHARD for name in tensors})
        index["weight_map"] = dict(sorted(weight_map.items()))
        by_shard: dict[str, list[str]] = {}
        for name, shard_name in weight_map.items():
            by_shard.setdefault(shard_name, []).append(name)
        total = sum(_tensor_bytes(target / s, names) for s, names in by_shard.items())
        index.setdefault("metadata", {})["total_size"] = total
        fd, tmp = tempfile.mkstemp(prefix=INDEX_FILE, suffix=".tmp", dir=target)
        with os.fdopen(fd, "w") as handle:
            json.dump(index, handle, indent=2)
        os.replace(tmp, index_path)
        return shard
    path = target / SINGLE_FILE if (target / SINGLE_FILE).is_file() else target / DECODER_SHARD
    _merge_into_file(tensors, path)
    return path


def attach_vq_decoder(
    vqmodel: nn.Module,
    source: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    dtype: torch.dtype | None = None,
) -> ChameleonVQDecoder:
    """Build the decoder for ``vqmodel`` and fill it from a checkpoint, ready for :func:`decode_codes`.

    The decoder is built on the meta device and its weights assigned from the checkpoint, so no
    time goes into a random init. ``vqmodel.post_quant_conv`` is also set from the checkpoint when
    it holds one, so decoder and post-quant conv always come from the same file.

    Args:
        vqmodel: upstream ``ChameleonVQVAE`` (``model.model.vqmodel``), already loaded.
        source: as for :func:`load_vq_decoder_state`.
        dtype: decoder dtype (default: the codebook's dtype); placed on the codebook's device.

    Returns:
        The decoder in eval mode with ``requires_grad=False``.

    Raises:
        BackendError: as for :func:`load_vq_decoder_state`.
    """
    config = vqmodel.config
    reference = vqmodel.quantize.embedding.weight
    state = load_vq_decoder_state(source, config)
    with torch.device("meta"):
        decoder = ChameleonVQDecoder(config)
    decoder.load_state_dict(state, assign=True)
    decoder = decoder.to(reference.device, dtype or reference.dtype).eval().requires_grad_(False)
    post = _read_prefixed(_tensor_locations(source), POST_QUANT_CONV_PREFIX)
    if post:  # absent in a decoder-only file: keep the post_quant_conv transformers loaded
        _check_shapes(
            post,
            {name: tuple(t.shape) for name, t in vqmodel.post_quant_conv.state_dict().items()},
            f"post_quant_conv weights in {source}",
        )
        with torch.no_grad():
            for name, tensor in post.items():
                getattr(vqmodel.post_quant_conv, name).copy_(tensor)
    return decoder


__all__ = [
    "ChameleonVQDecoder",
    "DECODER_PREFIX",
    "POST_QUANT_CONV_PREFIX",
    "Reconstruction",
    "attach_vq_decoder",
    "decode_codes",
    "expected_decoder_shapes",
    "load_vq_decoder_state",
    "load_vq_post_quant_conv_state",
    "reconstruct",
    "save_vq_decoder_state",
]
