"""Sparsification: top-k (Elias–Fano coded indices) and stratified random-k (indices from a seed).

Both are transforms: they pick k positions of the flattened tensor and hand the picked values, in
position order, to `inner` (the rest of the pipeline), so "topk:ratio=0.01|int8" quantises the
values and a spec without a quantizer sends them raw (bit-exact in the tensor's own dtype).

How many are kept (a function of the parameters and the element count n only, so the decoder
derives it from the shape):

    k(n) = 0                                  for n = 0
         = min(k, n)                          when the parameter k > 0 (it overrides ratio)
         = min(n, max(1, ceil(ratio * n)))    otherwise

where ratio is taken as the decimal number it prints as (Fraction(repr(ratio))), so that
ratio=0.1 keeps exactly 3 of 30 elements rather than the 4 that IEEE 0.1 * 30 = 3.0000000000000004
would round up to.

topk ─────────────────────────────────────────────────────────────────────────────────────────────

    x ──▶ |x| ──▶ k largest ──▶ sorted indices ──▶ Elias–Fano ──▶ [low bits, high unary]
                                      └──▶ x[indices] ──▶ inner ──▶ [value sections...]

Elias–Fano of k sorted indices in [0, n): with L = floor(log2(n / k)), each index i splits into its
low L bits (packed with kernels.pack_bits, k*L bits) and its high part h = i >> L, written in unary:
bit h_j + j of a vector of U = k + ((n - 1) >> L) + 1 bits is set. The index stream therefore
costs k*L + U <= k * (floor(log2(n/k)) + 3) + 1 bits, i.e. about 2 + log2(n/k) bits per kept element
against 32 for int32 indices. Measured bytes per kept element, index + value, on n = 2^20 and
n = 2^24 (the same to two decimals; sections only, the ~60-byte header and zstd aside):

    ratio   L   index   + raw fp32 value   + fp16 value   + int8 value (block 64)   int32 index + fp32
    0.1     3   0.66    4.66               2.66           1.72                      8
    0.01    6   1.07    5.07               3.07           2.13                      8
    0.001   9   1.50    5.50               3.50           2.56                      8

(the entropy bound log2(C(n, k)) / k is 0.59, 1.01 and 1.43 bytes at these ratios).

Error: the decoded tensor is x on the kept positions (exactly, with raw values; with the inner
quantizer's bound otherwise) and 0 elsewhere, so ||x - x̂||² = sum of the n - k smallest x_i² (plus
the quantizer's error on the kept values); biased, pair it with error feedback. Which of several
equal magnitudes at the k-th place is kept is unspecified.

Decoding checks that the unary vector holds exactly k ones, that no padding bit is set, that the
indices strictly increase and are below n, and that the values are finite.

randk ────────────────────────────────────────────────────────────────────────────────────────────

    x ──▶ chunks of c = ceil(n / k) ──▶ one position per chunk from the seed ──▶ x[positions] ──▶ inner
                                                        seed ──▶ [int64 section]

The flat tensor is cut into m = ceil(n / c) chunks of c elements (the last may be shorter). Chunk j
contributes position j*c + o_j, with o_j uniform in [0, c) drawn from 48 bits of
kernels.uniform_hash(seed, 2j), uniform_hash(seed, 2j + 1) (o_j = floor(r * c / 2^48), so each
offset has probability 1/c within 2^-48); a position >= n (possible only in the last, short chunk) is
dropped and its value slot carries 0. Every element is thus included with probability exactly 1/c
(to within 2^-48), the chunks independently. Only the seed and the m <= k values travel; the decoder
regenerates the positions from the seed with integer arithmetic, identically on any device.

With unbiased=true (default) decoded values are multiplied by c, so E[x̂] = x and each element has
variance (c - 1) x_i², E||x̂ - x||² = (c - 1) ||x||² (plus c² times the inner quantizer's error).
With unbiased=false x̂ is x on the chosen positions and 0 elsewhere: E[x̂] = x / c, and
E||x̂ - x||² = (1 - 1/c) ||x||², a contraction.

Error feedback: scaling by c inside an error-feedback loop would multiply the residual of a chosen
element by (1 - c) and diverge, so under error feedback the encoder sends the chosen values divided
by c: the decoder, which always applies the payload's scaling, then reproduces exactly the plain
(contractive) random-k of x + residual, and the residual stays bounded. The payload format is the same.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from .. import kernels
from ..errors import CorruptPayload, InvalidInput
from ..registry import register
from .base import TransformStage, check_section, check_section_count, numel, require


def kept_count(n: int, ratio: float, k: int) -> int:
    """How many of n elements top-k / random-k keep (see the module docstring for the rounding)."""
    if n <= 0:
        return 0
    if k > 0:
        return min(k, n)
    return min(n, max(1, math.ceil(Fraction(repr(ratio)) * n)))


def _check_count_params(ratio: float, k: int) -> None:
    require(0.0 < ratio <= 1.0, f"ratio must be in (0, 1], got {ratio}")
    require(k >= 0, f"k must be >= 0 (0: use ratio), got {k}")


def _count_wire_params(ratio: float, k: int) -> dict:
    # k > 0 makes ratio irrelevant; k = 0 is written explicitly so a later default cannot change it
    return {"k": k} if k > 0 else {"ratio": ratio, "k": 0}


def _check_values(values: torch.Tensor, count: int, what: str) -> torch.Tensor:
    """Values that an inner stage decoded: a finite float vector of `count` elements."""
    if not values.is_floating_point() or values.numel() != count:
        raise CorruptPayload(f"{what}: values decode to {values.numel()} × {values.dtype}, expected {count} floats")
    values = values.reshape(-1)
    if count and not bool(torch.isfinite(values).all()):
        raise CorruptPayload(f"{what}: values contain NaN or Inf, which the encoder never sends")
    return values


def _padding_clear(packed: torch.Tensor, nbits: int) -> bool:
    """Whether the unused high bits of the last byte of a pack_bits stream are zero."""
    tail = nbits % 8
    return tail == 0 or packed.numel() == 0 or int(packed[-1]) >> tail == 0


# ------------------------------------------------------------------------------------- Elias–Fano


def elias_fano_layout(k: int, n: int) -> tuple[int, int, int]:
    """(L, low bytes, unary bits U) of the Elias–Fano code of k sorted indices in [0, n)."""
    if k == 0:
        return 0, 0, 0
    low = (n // k).bit_length() - 1  # floor(log2(n / k)), exact in integers
    unary = k + ((n - 1) >> low) + 1
    return low, kernels.packed_bits_size(k, low), unary


def elias_fano_encode(indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(low bits, high unary bits), both uint8, of strictly increasing int64 `indices` in [0, n)."""
    k = indices.numel()
    low_bits, _, unary_bits = elias_fano_layout(k, n)
    dev = indices.device
    if k == 0:
        empty = torch.empty(0, dtype=torch.uint8, device=dev)
        return empty, empty.clone()
    idx = indices.reshape(-1).to(torch.int64)
    if low_bits:
        low = kernels.pack_bits(idx & ((1 << low_bits) - 1), low_bits)
    else:
        low = torch.empty(0, dtype=torch.uint8, device=dev)
    unary = torch.zeros(unary_bits, dtype=torch.uint8, device=dev)
    unary[(idx >> low_bits) + torch.arange(k, device=dev)] = 1
    return low, kernels.pack_bits(unary, 1)


def elias_fano_decode(low: torch.Tensor, high: torch.Tensor, k: int, n: int, what: str = "Elias–Fano indices") -> torch.Tensor:
    """The k strictly increasing int64 indices in [0, n) that `elias_fano_encode` wrote.

    Raises CorruptPayload unless the sections have the sizes the layout implies, no padding bit is
    set, the unary vector holds exactly k ones, and the indices strictly increase below n.
    """
    low_bits, low_bytes, unary_bits = elias_fano_layout(k, n)
    check_section([low], 0, torch.uint8, low_bytes, f"{what} (low bits)")
    check_section([high], 0, torch.uint8, (unary_bits + 7) // 8, f"{what} (high unary bits)")
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=high.device)
    if not _padding_clear(low, k * low_bits) or not _padding_clear(high, unary_bits):
        raise CorruptPayload(f"{what}: padding bits after the bit stream are set")
    unary = kernels.unpack_bits(high, 1, unary_bits)
    ones = int(unary.sum())
    if ones != k:
        raise CorruptPayload(f"{what}: the unary high-bit vector holds {ones} ones, expected {k}")
    highs = torch.nonzero(unary).reshape(-1) - torch.arange(k, device=unary.device)
    idx = highs << low_bits
    if low_bits:
        idx |= kernels.unpack_bits(low, low_bits, k)
    if int(idx[-1]) >= n:
        raise CorruptPayload(f"{what}: index {int(idx[-1])} is out of range for {n} elements")
    if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise CorruptPayload(f"{what}: indices do not strictly increase")
    return idx


# ------------------------------------------------------------------------------------------- topk

SAMPLE = 1 << 16  # magnitudes sampled to bracket the k-th largest
SELECT_CHUNK = 1 << 18


def topk_indices(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k largest |flat| (ties at the k-th magnitude broken arbitrarily).

    On CPU, torch.topk over millions of elements is slow and copies the input several times. Instead
    a fixed-seed sample of magnitudes gives a threshold safely below the k-th largest; one chunked
    pass collects the (few more than k) candidates above it, and torch.topk picks among those. The
    result is the exact top-k; if the sample was unlucky (fewer than k candidates), plain torch.topk
    runs. On CUDA torch.topk is fast and is used directly.
    """
    n = flat.numel()
    if flat.is_cuda or n < 8 * SAMPLE or k * 8 > n:
        return torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    g = torch.Generator().manual_seed(0)
    sample = flat[torch.randint(0, n, (SAMPLE,), generator=g)].abs().float()
    q = 1 - k / n
    threshold = torch.quantile(sample, max(0.0, q - 6 * math.sqrt(q * (1 - q) / SAMPLE) - 1 / SAMPLE))
    candidates = torch.cat(
        [(part.abs() >= threshold).nonzero().reshape(-1) + start for start, part in zip(range(0, n, SELECT_CHUNK), flat.split(SELECT_CHUNK))]
    )
    if candidates.numel() < k:
        return torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    best = torch.topk(flat[candidates].abs(), k, sorted=False).indices
    return candidates[best].sort().values




@register("topk")
class TopK(TransformStage):
    """Keep the k largest |x| (k = ceil(ratio * n), or the parameter k); Elias–Fano indices, values to `inner`."""

    def __init__(self, inner, ratio: float = 0.01, k: int = 0):
        super().__init__(inner)
        _check_count_params(ratio, k)
        self.ratio = ratio
        self.k = k

    def wire_params(self):
        return _count_wire_params(self.ratio, self.k)

    def kept(self, n: int) -> int:
        return kept_count(n, self.ratio, self.k)

    def n_sections(self, shape):
        return 2 + self.inner.n_sections((self.kept(numel(shape)),))

    def _select(self, flat: torch.Tensor) -> torch.Tensor:
        """Sorted int64 indices of the kept elements of the flat tensor."""
        n = flat.numel()
        k = self.kept(n)
        if k == n:
            return torch.arange(n, device=flat.device)
        return topk_indices(flat, k)

    def encode(self, x, ctx):
        flat = x.reshape(-1)
        idx = self._select(flat)
        low, high = elias_fano_encode(idx, flat.numel())
        return [low, high] + self.inner.encode(flat[idx], ctx)

    def encode_feedback(self, x, residual, ctx):
        e = x.reshape(-1).float() + residual.view(-1)
        idx = self._select(e)
        values = e[idx]
        low, high = elias_fano_encode(idx, e.numel())
        inner_sections = self.inner.encode(values, ctx)
        decoded = self.inner.decode(inner_sections, (idx.numel(),)).reshape(-1).to(device=e.device, dtype=torch.float32)
        e[idx] = values - decoded  # what the decoder misses: everything off the kept positions, and the values' error
        residual.view(-1).copy_(e)
        return [low, high] + inner_sections

    def decode(self, sections, shape):
        n = numel(shape)
        k = self.kept(n)
        what = f"{self.name} tensor"
        _, low_bytes, unary_bits = elias_fano_layout(k, n)
        low = check_section(sections, 0, torch.uint8, low_bytes, what + " (low bits)")
        high = check_section(sections, 1, torch.uint8, (unary_bits + 7) // 8, what + " (high unary bits)")
        idx = elias_fano_decode(low, high, k, n, what)
        check_section_count(sections[2:], self.inner.n_sections((k,)), what + " values")
        values = _check_values(self.inner.decode(sections[2:], (k,)), k, what)
        out = torch.zeros(n, dtype=values.dtype, device=values.device)
        out[idx.to(values.device)] = values
        return out.view(shape)


# ------------------------------------------------------------------------------------------ randk

_MAX_CHUNK = 1 << 39  # o_j = floor(r * c / 2^48) is computed in int64 as ((a * c) + ((b * c) >> 24)) >> 24


def stratified_positions(seed: int, n: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, valid) on the CPU: one uniform position per chunk of c elements of [0, n).

    positions[j] = j * c + o_j with o_j uniform in [0, c) from 48 bits of uniform_hash(seed, 2j),
    uniform_hash(seed, 2j + 1); valid marks positions < n (all but possibly the last).
    """
    m = -(-n // c) if n else 0
    j = torch.arange(m, dtype=torch.int64)
    a = (kernels.uniform_hash(seed, 2 * j) * 2.0**24).to(torch.int64)
    b = (kernels.uniform_hash(seed, 2 * j + 1) * 2.0**24).to(torch.int64)
    offsets = (a * c + ((b * c) >> 24)) >> 24
    positions = j * c + offsets
    return positions, positions < n


@register("randk")
class RandK(TransformStage):
    """Stratified random-k: one random element per chunk of c = ceil(n/k); only a seed travels for the positions."""

    def __init__(self, inner, ratio: float = 0.01, k: int = 0, unbiased: bool = True):
        super().__init__(inner)
        _check_count_params(ratio, k)
        self.ratio = ratio
        self.k = k
        self.unbiased = unbiased

    def wire_params(self):
        return {**_count_wire_params(self.ratio, self.k), "unbiased": self.unbiased}

    def layout(self, n: int) -> tuple[int, int]:
        """(c, m): chunk length and number of value slots (chunks) for n elements."""
        k = kept_count(n, self.ratio, self.k)
        if k == 0:
            return 1, 0
        c = -(-n // k)
        return c, -(-n // c)

    def n_sections(self, shape):
        return 1 + self.inner.n_sections((self.layout(numel(shape))[1],))

    def _positions(self, seed: int, n: int, device: torch.device):
        c, _ = self.layout(n)
        if c >= _MAX_CHUNK:
            raise InvalidInput(f"{self.name}: chunks of {c} elements are too long; raise ratio or k")
        pos, valid = stratified_positions(seed, n, c)
        return c, pos.to(device), valid.to(device)

    def _gather(self, flat: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        picked = flat[pos.clamp(max=max(flat.numel() - 1, 0))]
        return torch.where(valid, picked, torch.zeros((), dtype=flat.dtype, device=flat.device))

    def encode(self, x, ctx):
        flat = x.reshape(-1)
        seed = ctx.next_seed()
        c, pos, valid = self._positions(seed, flat.numel(), flat.device)
        values = self._gather(flat, pos, valid)
        sections = self.inner.encode(values, ctx)
        if self.unbiased and c > 1 and values.numel():
            # the decoder multiplies by c: refuse what would overflow the tensor's dtype there
            peak = self.inner.decode(sections, (values.numel(),)).abs().max().float() * c
            if not bool(torch.isfinite(peak)) or float(peak) > torch.finfo(x.dtype).max:
                raise InvalidInput(
                    f"tensor {ctx.name!r}: randk's unbiased scaling by {c} would exceed the range of {x.dtype};"
                    " use unbiased=false, a larger ratio, or a wider dtype"
                )
        return [torch.tensor([seed], dtype=torch.int64, device=flat.device)] + sections

    def encode_feedback(self, x, residual, ctx):
        e = x.reshape(-1).float() + residual.view(-1)
        seed = ctx.next_seed()
        c, pos, valid = self._positions(seed, e.numel(), e.device)
        values = self._gather(e, pos, valid)
        scale = c if self.unbiased else 1
        sections = self.inner.encode(values / scale if scale > 1 else values, ctx)
        decoded = self.inner.decode(sections, (values.numel(),)).reshape(-1).to(device=e.device, dtype=torch.float32) * scale
        if decoded.numel() and not bool(torch.isfinite(decoded).all()):
            raise InvalidInput(f"tensor {ctx.name!r}: randk values overflow after scaling by {c}")
        e[pos[valid]] -= decoded[valid]
        residual.view(-1).copy_(e)
        return [torch.tensor([seed], dtype=torch.int64, device=e.device)] + sections

    def decode(self, sections, shape):
        n = numel(shape)
        c, m = self.layout(n)
        what = f"{self.name} tensor"
        seed = int(check_section(sections, 0, torch.int64, 1, what + " (seed)")[0])
        if not 0 <= seed < 2**32:
            raise CorruptPayload(f"{what}: seed {seed} is outside [0, 2^32)")
        if c >= _MAX_CHUNK:
            raise CorruptPayload(f"{what}: {n} elements in chunks of {c} is beyond what randk encodes")
        check_section_count(sections[1:], self.inner.n_sections((m,)), what + " values")
        values = _check_values(self.inner.decode(sections[1:], (m,)), m, what)
        pos, valid = stratified_positions(seed, n, c)
        pos, valid = pos.to(values.device), valid.to(values.device)
        if self.unbiased and c > 1:
            values = values.float() * c
            if not bool(torch.isfinite(values).all()):
                raise CorruptPayload(f"{what}: values overflow when scaled by {c}")
        out = torch.zeros(n, dtype=values.dtype, device=values.device)
        out[pos[valid]] = values[valid]
        return out.view(shape)
