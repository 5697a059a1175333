"""The AutoEncoders of the learned codec: the paper's convolutional AE, a light per-block one and a shared one.

    canvas [H, W] ──▶ Encoder ──▶ latent (ratio x H·W values) ──▶ Decoder ──▶ canvas [H, W]

`conv` (CG-FedLLM's "ResNet" AE): `stages` stride-2 convolutions, each followed by residual blocks,
then a 1x1 convolution to `latent_channels`; the decoder mirrors it with transposed convolutions.
With six stages and 64 latent channels the latent is 1/64 of the canvas, as in the paper; the ratio is
latent_channels / 4**stages, so 1/16 and 1/256 are 256 and 16 channels (`AEConfig.conv(ratio=...)`).
The canvas is zero-padded to a multiple of 2**stages; any width works (the AE is fully convolutional).

`block` (the light variant): the canvas is cut into tiles of [block_rows, block_cols]; each tile is
projected to `latents` values by a learned matrix of its own (one per tile position), squashed by tanh
and quantised to a fixed range (no latent scales travel); the decoder is a learned linear map back.
Per-position weights are what make it work: the updates of one LoRA factor, across clients and
rounds, concentrate in a low-dimensional subspace of their own, which a shared (convolutional) filter
cannot represent. TGAP initialises it from each tile position's principal components. Its whole
encoder and decoder are single fused kernels (gradcodec.kernels.block_encode / block_decode), from
adapter tensors to int8 codes and back, which makes it the choice for CPU-only clients. Its size is
2 x canvas values x latents per tile: per-factor tiles suit small adapters; large ones need short
tiles (block_rows=64, block_cols=1 at 1/64 is 2 x 8.4M weights for LLaMA-7B q/k/v/o, rank 8).

`shared` (the scalable variant, for 1B-70B adapters): the block AE's per-position maps, shared across
layers. Factors whose names differ only in their numbers ("layers.3.self_attn.q_proj.lora_A") and that
have one shape form a *type*; the long side of each factor is cut into bands of `block_rows`, a tile
is one band across the whole rank, and every (type, band) has one encoder and one decoder matrix,
used for that band of every layer. A small per-layer part, one gain per (layer, band), rescales each
layer's latents to the fixed code range. Its encoder holds (values of one layer's factors) x latents
per tile weights, whatever the number of layers: with 512-value tiles at 1/64 (8 latents) that is 8 x
a layer, 8.4 MB for LLaMA-2-7B q/k/v/o r8 against 33.5 MB for one fp32 update of its 32 layers. It
works on the factors as they are, with no canvas: a tile is read in the tensor's own orientation (an
[r, L] LoRA A gives [r, band] tiles), and each factor's RMS scale is applied to the latent, not the
input. Grouped-query k/v factors are types of their own shape. The codec's paths (SharedEncoder.
encode_factors, SharedDecoder.decode_factors) stage each type's tiles in a reused per-thread scratch
buffer (scratch_chunks), so that an encode or decode moves the update's bytes about three times and
allocates nothing the size of the update beyond the decoded factors.

Encoders and decoders are separate modules: a client loads only the encoder, a server only the decoder
(gradcodec.learned.modelfile).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..codecs.base import all_finite
from ..errors import InvalidInput
from .canvas import CanvasLayout

ARCHS = ("conv", "block", "shared")
LATENT_QMAX = {8: 127, 4: 7}


@dataclass(frozen=True)
class AEConfig:
    """Everything that defines an AE's architecture and the adapter layout it was trained on.

    Saved as JSON in the model file; two files with equal configs and weights have one fingerprint.
    """

    arch: str
    canvas_height: int
    canvas_width: int
    layout_digest: str  # CanvasLayout.digest() of the adapter the AE was trained on
    # conv
    channels: tuple[int, ...] = ()  # one per stride-2 stage
    latent_channels: int = 0
    res_blocks: int = 1
    # block
    block_rows: int = 0
    block_cols: int = 0
    latents: int = 0  # per tile
    # shared: one (pattern, rows, cols, layers, band, latents) per factor type, block_rows the requested band
    types: tuple[tuple[str, int, int, int, int, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "types", tuple((str(t[0]), *(int(v) for v in t[1:])) for t in self.types))
        if self.arch not in ARCHS:
            raise InvalidInput(f"AE arch must be one of {ARCHS}, got {self.arch!r}")
        if min(self.canvas_height, self.canvas_width) < 1:
            raise InvalidInput(f"canvas shape must be positive, got {self.canvas_height}x{self.canvas_width}")
        if self.arch == "conv" and (not self.channels or min(self.channels) < 1 or self.latent_channels < 1
                                    or self.res_blocks < 0):
            raise InvalidInput("a conv AE needs channels (one per stage), latent_channels >= 1 and res_blocks >= 0")
        if self.arch == "block":
            if min(self.block_rows, self.block_cols, self.latents) < 1:
                raise InvalidInput("a block AE needs block_rows, block_cols and latents >= 1")
            if self.canvas_width % self.block_cols:
                raise InvalidInput(f"block_cols={self.block_cols} must divide the canvas width {self.canvas_width}")
        if self.arch == "shared" and (not self.types or any(len(t) != 6 or min(t[1:]) < 1 for t in self.types)):
            raise InvalidInput("a shared AE needs one (pattern, rows, cols, layers, band, latents >= 1) per factor type")

    # ------------------------------------------------------------------ construction
    @classmethod
    def conv(cls, layout: CanvasLayout, ratio: float = 1 / 64, stages: int = 6, width: int = 16,
             max_channels: int = 128, res_blocks: int = 1) -> "AEConfig":
        """The paper's AE for `layout`: `stages` stride-2 stages, channels width * 2**s (capped), and
        latent channels 4**stages * ratio (1/64 at six stages: 64 channels)."""
        latent = 4**stages * ratio
        if stages < 1 or latent < 1 or abs(latent - round(latent)) > 1e-9:
            raise InvalidInput(f"ratio {ratio} needs 4**stages * ratio to be a whole number of channels (stages={stages})")
        channels = tuple(min(width * 2**s, max_channels) for s in range(stages))
        return cls("conv", *layout.shape, layout.digest(), channels=channels, latent_channels=round(latent),
                   res_blocks=res_blocks)

    @classmethod
    def block(cls, layout: CanvasLayout, ratio: float = 1 / 64, block_rows: int | None = None,
              block_cols: int | None = None) -> "AEConfig":
        """The light AE for `layout`: by default one tile per factor fold (block_rows = height,
        block_cols = the largest power of two dividing every rank); latents = tile * ratio."""
        rows = block_rows or layout.height
        if block_cols is None:
            block_cols = math.gcd(*(f.rank for f in layout.factors))
            block_cols &= -block_cols  # the kernels need a power of two
        if block_cols & (block_cols - 1) or any(f.rank % block_cols for f in layout.factors):
            raise InvalidInput(f"block_cols={block_cols} must be a power of two dividing every factor's rank")
        latents = rows * block_cols * ratio
        if abs(latents - round(latents)) > 1e-9 or latents < 1:
            raise InvalidInput(f"ratio {ratio} of a {rows}x{block_cols} tile is not a whole number of latents")
        return cls("block", *layout.shape, layout.digest(), block_rows=rows, block_cols=block_cols,
                   latents=round(latents))

    @classmethod
    def shared(cls, layout: CanvasLayout, ratio: float = 1 / 64, block_rows: int | None = None) -> "AEConfig":
        """The scalable AE for `layout`: bands of `block_rows` (default: 512-value tiles, 64 rows at rank 8,
        32 at rank 16), a type's whole long side when shorter; latents = tile * ratio per type."""
        types = []
        for t in factor_types(layout):
            rows = block_rows or max(1, 512 // t.rank)
            band = min(rows, t.length)
            latents = band * t.rank * ratio
            if latents < 1 or abs(latents - round(latents)) > 1e-9:
                raise InvalidInput(f"ratio {ratio} of a {band}x{t.rank} tile of {t.pattern!r} is not a whole number "
                                   "of latents; choose --block-rows so that block_rows * rank * ratio is")
            types.append((t.pattern, *t.shape, len(t.members), band, round(latents)))
        return cls("shared", *layout.shape, layout.digest(), block_rows=block_rows or 0, types=tuple(types))

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        if not data["types"]:  # configs written before the shared AE existed keep their JSON (and fingerprint)
            del data["types"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "AEConfig":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise InvalidInput("AE config is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"AE config has unknown fields {unknown}; written by a newer gradcodec?")
        return cls(**data)

    # ------------------------------------------------------------------ derived shapes
    @property
    def multiple(self) -> int:
        """The canvas is zero-padded to a multiple of this in both dimensions (conv) or rows (block)."""
        return 2 ** len(self.channels) if self.arch == "conv" else self.block_rows

    @property
    def padded_shape(self) -> tuple[int, int]:
        h = math.ceil(self.canvas_height / self.multiple) * self.multiple
        if self.arch == "block":
            return h, self.canvas_width
        return h, math.ceil(self.canvas_width / self.multiple) * self.multiple

    @property
    def latent_shape(self) -> tuple[int, ...]:
        if self.arch == "shared":
            return (sum(n * bands * k for (_, a, b, n, band, k) in self.types
                        for bands in [-(-max(a, b) // band)]),)
        h, w = self.padded_shape
        if self.arch == "conv":
            return self.latent_channels, h // self.multiple, w // self.multiple
        return h // self.block_rows, w // self.block_cols, self.latents

    @property
    def latent_numel(self) -> int:
        return math.prod(self.latent_shape)

    @property
    def ratio(self) -> float:
        """Latent values per canvas value (the paper's compression rate, before quantisation); for the
        shared AE, which has no canvas, per adapter value."""
        if self.arch == "shared":
            return self.latent_numel / sum(n * a * b for (_, a, b, n, _, _) in self.types)
        return self.latent_numel / (self.canvas_height * self.canvas_width)


# ------------------------------------------------------------------------------------------ conv AE


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(x)))


class ConvEncoder(nn.Module):
    """canvas [B, H, W] -> latent [B, latent_channels, H/2**S, W/2**S] (after zero-padding)."""

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = 1
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.GELU()]
            layers += [ResBlock(c) for _ in range(config.res_blocks)]
            c_in = c
        layers.append(nn.Conv2d(c_in, config.latent_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, canvas: torch.Tensor) -> torch.Tensor:
        h, w = self.config.padded_shape
        x = F.pad(canvas, (0, w - canvas.shape[-1], 0, h - canvas.shape[-2]))
        return self.net(x.unsqueeze(1))


class ConvDecoder(nn.Module):
    """latent [B, latent_channels, h, w] -> canvas [B, H, W] (cropped to the layout's canvas)."""

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        chans = list(config.channels)
        layers: list[nn.Module] = [nn.Conv2d(config.latent_channels, chans[-1], 1)]
        for i in reversed(range(len(chans))):
            layers += [ResBlock(chans[i]) for _ in range(config.res_blocks)]
            c_out = chans[i - 1] if i else 1
            layers.append(nn.ConvTranspose2d(chans[i], c_out, 4, stride=2, padding=1))
            if i:
                layers.append(nn.GELU())
        self.net = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        out = self.net(latent).squeeze(1)
        return out[..., : self.config.canvas_height, : self.config.canvas_width]


# ------------------------------------------------------------------------------------------ block AE


class BlockEncoder(nn.Module):
    """canvas [B, H, W] -> pre-activations z [B, bands, groups, latents]; the latent is tanh(z).

    Tile (band, group) = canvas rows [band * block_rows, ...) x columns [group * block_cols, ...),
    flattened row-major; z = tile @ weight[band, group] + bias[band, group], as kernels.block_encode
    computes it.
    """

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        bands, groups, k = config.latent_shape
        tile = config.block_rows * config.block_cols
        self.weight = nn.Parameter(torch.randn(bands, groups, tile, k) / math.sqrt(tile))
        self.bias = nn.Parameter(torch.zeros(bands, groups, k))

    def forward(self, canvas: torch.Tensor) -> torch.Tensor:
        c = self.config
        h, w = c.padded_shape
        x = F.pad(canvas, (0, 0, 0, h - canvas.shape[-2]))
        tiles = x.reshape(-1, h // c.block_rows, c.block_rows, w // c.block_cols, c.block_cols)
        tiles = tiles.permute(0, 1, 3, 2, 4).reshape(x.shape[0], h // c.block_rows, w // c.block_cols, -1)
        return torch.einsum("nbgi,bgik->nbgk", tiles, self.weight) + self.bias


class BlockDecoder(nn.Module):
    """latent [B, bands, groups, latents] (values in [-1, 1]) -> canvas [B, H, W]."""

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        bands, groups, k = config.latent_shape
        tile = config.block_rows * config.block_cols
        self.weight = nn.Parameter(torch.randn(bands, groups, k, tile) / math.sqrt(k))
        self.bias = nn.Parameter(torch.zeros(bands, groups, tile))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        c = self.config
        n, bands, groups, _ = latent.shape
        y = torch.einsum("nbgk,bgki->nbgi", latent, self.weight) + self.bias
        y = y.view(n, bands, groups, c.block_rows, c.block_cols).permute(0, 1, 3, 2, 4)
        return y.reshape(n, bands * c.block_rows, groups * c.block_cols)[:, : c.canvas_height]


# ------------------------------------------------------------------------------------------ shared AE

LAYER_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class FactorType:
    """Factors of one name pattern and shape (one per layer): they share the shared AE's weights."""

    pattern: str  # the name with every number replaced by "#"
    shape: tuple[int, int]
    members: tuple[int, ...]  # their indices in the layout, in layout order

    @property
    def length(self) -> int:
        return max(self.shape)

    @property
    def rank(self) -> int:
        return min(self.shape)


def factor_types(layout: CanvasLayout) -> tuple[FactorType, ...]:
    """The layout's factors grouped by (name with numbers masked, shape), in order of first appearance.

    Any number in a name counts as a layer index ("layers.3", "l3", "h.3"); two same-shaped targets
    told apart only by a number (fc1 / fc2) share a type, which costs quality, not correctness."""
    groups: dict[tuple[str, tuple[int, int]], list[int]] = {}
    for i, f in enumerate(layout.factors):
        groups.setdefault((LAYER_NUMBER.sub("#", f.name), f.shape), []).append(i)
    return tuple(FactorType(p, shape, tuple(m)) for (p, shape), m in groups.items())


def band_views(tensors: Sequence[torch.Tensor], band: int) -> list[torch.Tensor]:
    """Each factor as [bands, *tile] (a view; a copy only where the last band is zero-padded): (rank,
    band) tiles of an [r, L] LoRA A, (band, rank) tiles of an [L, r] LoRA B."""
    a, b = tensors[0].shape
    long = max(a, b)
    bands = -(-long // band)
    views = []
    for t in tensors:
        if bands * band != long:
            t = F.pad(t, (0, bands * band - b) if a < b else (0, 0, 0, bands * band - a))
        views.append(t.view(a, bands, band).transpose(0, 1) if a < b else t.view(bands, band, b))
    return views


def band_stack(tensors: Sequence[torch.Tensor], band: int) -> torch.Tensor:
    """[bands, N, tile]: the tiles of N factors of one shape, band-major (one copy, no other pass).

    A factor's long side is cut into bands of `band` (the last zero-padded); a tile is one band across
    the whole rank, flattened in the tensor's own orientation: (rank, band) for an [r, L] LoRA A,
    (band, rank) for an [L, r] LoRA B. Band-major, every band's tiles of all N factors are one matrix,
    which meets that band's weights in one product."""
    views = band_views(tensors, band)
    return torch.stack(views, dim=1).view(views[0].shape[0], len(tensors), -1)


def unband(y: torch.Tensor, member: int, shape: tuple[int, int], band: int) -> torch.Tensor:
    """Factor `member` of a band-major [bands, N, tile] stack, as a new contiguous tensor of `shape`."""
    a, b = shape
    bands = y.shape[0]
    t = y[:, member]
    if a < b:
        out = t.view(bands, a, band).transpose(0, 1).reshape(a, bands * band)
        return out[:, :b].contiguous() if bands * band != b else out
    return t.reshape(bands * band, b)[:a]


def safe_scales(scales: torch.Tensor) -> torch.Tensor:
    """Scales to divide by: a zero scale (an all-zero factor) divides by 1."""
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def _shared_params(config: AEConfig, decoder: bool) -> tuple[nn.ParameterList, nn.ParameterList, nn.ParameterList]:
    weight, bias, gain = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
    for _, a, b, n, band, k in config.types:
        tile, bands = band * min(a, b), -(-max(a, b) // band)
        # [bands, latents, tile] in both halves: the encoder's product reads it transposed (dot products
        # along contiguous tiles, the fast GEMM form for a handful of latents)
        weight.append(nn.Parameter(torch.randn(bands, k, tile) / math.sqrt(k if decoder else tile)))
        bias.append(nn.Parameter(torch.zeros(bands, tile if decoder else k)))
        gain.append(nn.Parameter(torch.ones(bands, n)))
    return weight, bias, gain


class SharedEncoder(nn.Module):
    """Per type, band-major tiles x [bands, layers, tile] and the factors' RMS scales [layers] ->
    pre-activations z [bands, layers, latents] (the latent is tanh(z)).

    z = (x @ weight[band]^T) * gain[band, layer] / scale[layer] + bias[band]: the product of the
    unnormalised tiles, then the scale, so the factors are never divided."""

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        self.weight, self.bias, self.gain = _shared_params(config, decoder=False)

    def forward(self, tiles: Sequence[torch.Tensor], scales: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.encode_type(i, x, s) for i, (x, s) in enumerate(zip(tiles, scales))]

    def encode_factors(self, i: int, factors: Sequence[torch.Tensor], scales: torch.Tensor) -> torch.Tensor:
        """z of type `i` from its factors themselves (float32, one per layer, in member order), no gradient:
        forward(band_stack(factors)) bit for bit, with the tiles staged chunk by chunk of bands in a reused
        scratch buffer (scratch_chunks) that the product reads while it is in cache, instead of a fresh
        type-sized stack."""
        _, a, b, n, band, k = self.config.types[i]
        views = band_views(factors, band)
        bands = views[0].shape[0]
        if factors[0].dtype != torch.float32 or bands * band != max(a, b):
            return self.encode_type(i, torch.stack(views, dim=1).view(bands, n, -1).float(), scales)
        with torch.no_grad():
            w = self.weight[i].transpose(1, 2)
            z = torch.empty(bands, n, k, dtype=torch.float32, device=factors[0].device)
            for b0, b1, t in scratch_chunks(bands, n * band * min(a, b), torch.float32, factors[0].device):
                tiles = torch.stack([v[b0:b1] for v in views], dim=1, out=t.view(b1 - b0, n, *views[0].shape[1:]))
                torch.bmm(tiles.view(b1 - b0, n, -1), w[b0:b1], out=z[b0:b1])
            return z.mul_((self.gain[i] / safe_scales(scales))[..., None]).add_(self.bias[i][:, None])

    def encode_type(self, i: int, tiles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """z of type `i` from its band-major tiles [bands, layers, tile]; forward is this over all types."""
        return torch.bmm(tiles, self.weight[i].transpose(1, 2)).mul_((self.gain[i] / safe_scales(scales))[..., None]).add_(self.bias[i][:, None])


class SharedDecoder(nn.Module):
    """Per type, latents u [bands, layers, latents] (in [-1, 1]) and scales [layers] -> band-major
    tiles [bands, layers, tile] (unband gives the factors).

    y = ((gain[band, layer] * u) @ weight[band] + bias[band]) * scale[layer], computed as
    (u * gain * scale) @ weight, then bias * scale added in place (no temporary as large as the output)."""

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        self.weight, self.bias, self.gain = _shared_params(config, decoder=True)

    def forward(self, latents: Sequence[torch.Tensor], scales: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, (u, s) in enumerate(zip(latents, scales)):
            y = torch.bmm(u * (self.gain[i] * s)[..., None], self.weight[i])
            out.append(y.addcmul_(self.bias[i][:, None], s[:, None]) if self.bias[i].any() else y)
        return out

    def decode_factors(self, latents: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
                       check_finite: bool = False) -> tuple[list[list[torch.Tensor]], bool | None]:
        """What forward computes, already as factors (no gradient; the codec's decoder): per type, one
        new contiguous tensor of its shape per layer, and, with `check_finite`, whether every value is
        finite (None without).

        Per chunk of bands, the batched product writes its band-major tiles into a scratch buffer that
        stays in cache (scratch_chunks); the finiteness check reads it there, and each layer's tiles are
        copied into that layer's factor: the output memory is written once and never read. (The product
        cannot write the factors' order itself in one call: a band's tiles of one layer are not one row
        apart, and torch falls back to one small product per band, 3-8x slower. The factors are separate
        allocations the size of a copy's, which the allocator reuses; one fresh multi-megabyte block per
        type was new pages, i.e. page faults, on most calls.) Values are those of forward, bit for bit."""
        out, finite = [], True if check_finite else None
        with torch.no_grad():
            for i, ((_, a, b, n, band, k), u, s) in enumerate(zip(self.config.types, latents, scales)):
                bands, tile = u.shape[0], band * min(a, b)
                v = u * (self.gain[i] * s)[..., None]
                bias = self.bias[i] if self.bias[i].any() else None
                ys = [torch.empty(a, b, dtype=v.dtype, device=v.device) for _ in range(n)]
                if bands * band != max(a, b):  # the last band is zero-padded: forward, then one copy per factor
                    t = torch.bmm(v, self.weight[i])
                    if bias is not None:
                        t.addcmul_(bias[:, None], s[:, None])
                    if check_finite:
                        finite = finite and all_finite(t)
                    for j, y in enumerate(ys):
                        y.copy_(unband(t, j, (a, b), band))
                    out.append(ys)
                    continue
                # each factor as [bands, ...] runs of one band: [r, bands, band] of an [r, L] factor
                runs = [y.view(a, bands, band) if a < b else y.view(bands, tile) for y in ys]
                for b0, b1, t in scratch_chunks(bands, n * tile, v.dtype, v.device):
                    t = t.view(b1 - b0, n, tile)
                    torch.bmm(v[b0:b1], self.weight[i][b0:b1], out=t)
                    if bias is not None:
                        t.addcmul_(bias[b0:b1, None], s[:, None])
                    if check_finite:
                        finite = finite and all_finite(t)
                    if a < b:
                        tv = t.view(b1 - b0, n, a, band)
                        for j, r in enumerate(runs):
                            r[:, b0:b1].copy_(tv[:, j].transpose(0, 1))
                    else:
                        for j, r in enumerate(runs):
                            r[b0:b1].copy_(t[:, j])
                out.append(ys)
        return out, finite


SCRATCH_VALUES = 1 << 21  # 8 MB of fp32 per thread: a chunk of tiles and what it is copied from or to fit in L3
_scratch = threading.local()


def scratch_chunks(bands: int, per_band: int, dtype: torch.dtype, device: torch.device):
    """(b0, b1, buffer of (b1 - b0) * per_band values) over [0, bands) in chunks of at most
    SCRATCH_VALUES (at least one band per chunk), the buffer reused across calls of this thread.

    The shared AE's codec paths stage tiles here instead of in a fresh type-sized tensor: a fresh
    multi-megabyte tensor is new pages from the OS on most calls (glibc returns freed memory at the
    top of its heap), whose page faults cost more than the copy itself; a reused one stays in cache.
    Held per thread (one per dtype and device), so concurrent encodes and decodes never share one."""
    step = max(1, SCRATCH_VALUES // per_band)
    bufs = _scratch.__dict__.setdefault("bufs", {})
    need = min(bands, step) * per_band
    buf = bufs.get((dtype, device))
    if buf is None or buf.numel() < need:
        buf = bufs[(dtype, device)] = torch.empty(need, dtype=dtype, device=device)
    for b0 in range(0, bands, step):
        b1 = min(bands, b0 + step)
        yield b0, b1, buf[:(b1 - b0) * per_band]


def quantize_tanh(z: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """tanh(z) rounded to the light AE's fixed grid k / QMAX, with a straight-through gradient."""
    t = torch.tanh(z)
    qmax = LATENT_QMAX[bits]
    q = torch.floor(t * qmax + 0.5).clamp(-qmax, qmax) / qmax
    return t + (q - t).detach()


def build_encoder(config: AEConfig) -> nn.Module:
    return {"conv": ConvEncoder, "block": BlockEncoder, "shared": SharedEncoder}[config.arch](config)


def build_decoder(config: AEConfig) -> nn.Module:
    return {"conv": ConvDecoder, "block": BlockDecoder, "shared": SharedDecoder}[config.arch](config)


class AutoEncoder(nn.Module):
    """Encoder and decoder of one config, for training (TGAP): forward(canvas) -> reconstruction.

    `bits` sets the latent quantisation simulated in training: the light AE rounds tanh(z) to its
    grid (straight-through); the conv AE adds uniform noise of one quantisation step of its blockwise
    absmax quantiser's typical scale (0 = none).
    """

    def __init__(self, config: AEConfig, encoder: nn.Module | None = None, decoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.encoder = encoder if encoder is not None else build_encoder(config)
        self.decoder = decoder if decoder is not None else build_decoder(config)

    def forward(self, canvas, bits: int = 8):
        """canvas [B, H, W] -> its reconstruction; the shared AE takes (tiles, scales) of one adapter,
        per type in factor_types order (band_stack tiles, RMS scales), and returns its tiles."""
        if self.config.arch == "shared":
            tiles, scales = canvas
            zs = self.encoder(tiles, scales)
            return self.decoder([quantize_tanh(z, bits) if bits else torch.tanh(z) for z in zs], scales)
        z = self.encoder(canvas)
        if self.config.arch == "block":
            return self.decoder(quantize_tanh(z, bits) if bits else torch.tanh(z))
        if bits and self.training:
            step = z.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / LATENT_QMAX[bits]
            z = z + (torch.rand_like(z) - 0.5) * step
        return self.decoder(z)
