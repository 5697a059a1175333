"""Pure-PyTorch version of every kernel op: the executable specification and the CPU path.

Each op here is the definition its Triton twin (kernels/quant.py, pack.py, ...) is tested against,
bit for bit where the op is deterministic. Arithmetic is therefore spelled out step by step
(fp32 throughout, IEEE division only where the kernel also divides exactly, floor(v + 0.5) rounding)
so that a kernel can reproduce it exactly.

Large inputs are processed in chunks of whole blocks so that the several elementwise passes of one
chunk run while it is still in cache; results do not depend on the chunk size.

Conventions shared by the ops:
  * inputs are flattened 1-D contiguous tensors of float32, float16 or bfloat16;
  * a block is `block` consecutive elements; the last block may be partial;
  * blockwise absmax codes of `bits` bits take values in [-QMAX, QMAX] with QMAX = 2**(bits-1) - 1;
    int8 codes are stored as int8, int4 codes as (code + 8) in a nibble, element 2i in the low nibble
    of byte i and element 2i+1 in the high nibble;
  * bit streams are little-endian: element i sits in bit (i % 8) of byte i // 8.
"""
from __future__ import annotations

import math

import torch

QMAX = {8: 127, 4: 7}
# Blocks whose absmax is below TINY are scaled as if it were TINY: the scale stays a normal float and
# the error bound |x - x_hat| <= scale / 2 holds for every block, including all-zero ones.
TINY = 2.0**-100
CHUNK_BLOCKS = 4096  # blocks per chunk: a few hundred KiB of fp32, which stays in L2 cache

_MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2**32 for int64 `a` in [0, 2**32), without int64 overflow."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def uniform_hash(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Counter-based uniform floats in [0, 1) for element `offsets` (int64) of a stream `seed`.

    A 32-bit integer hash of (seed, offset) keeps stochastic rounding reproducible from the seed
    alone, independent of chunking, device and launch geometry: the Triton kernels compute the
    same hash with uint32 arithmetic.
    """
    lo = offsets & _MASK32
    hi = offsets >> 32
    h = _mul32(lo, 0x9E3779B1) ^ _mul32(hi, 0x85EBCA77) ^ (seed & _MASK32)
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (2.0**-24)


def _chunks(n: int, block: int):
    step = block * CHUNK_BLOCKS
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _blocks(v: torch.Tensor, block: int) -> torch.Tensor:
    """View a chunk as [blocks, block], zero-padding a final partial block (a small copy)."""
    tail = -v.numel() % block
    if tail:
        v = torch.nn.functional.pad(v, (0, tail))
    return v.view(-1, block)


def _quantize_chunk(e: torch.Tensor, bits: int, block: int, seed: int | None, start: int):
    """Float codes (padded to whole blocks) and scales of one fp32 chunk that starts at `start`."""
    qmax = QMAX[bits]
    v = _blocks(e, block)
    amax = v.abs().amax(dim=1).clamp_min(TINY)
    # a tensor divisor: torch's CUDA kernels turn division by a Python scalar into a reciprocal multiply
    scale = amax / torch.full_like(amax, qmax)
    # `qmax / amax` on a tensor is torch's Tensor.__rtruediv__, i.e. amax.reciprocal() * qmax: two
    # roundings, not one IEEE division. Spelled out so that kernels reproduce it.
    inv = amax.reciprocal() * qmax
    t = v * inv[:, None]
    if seed is None:
        t += 0.5
    else:
        offs = torch.arange(start, start + v.numel(), dtype=torch.int64, device=v.device)
        t += uniform_hash(seed, offs).view_as(t)
    q = t.floor_().clamp_(-qmax, qmax)
    return q, scale


def _store_codes(q: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    q = q.reshape(-1)[:n]
    if bits == 8:
        return q.to(torch.int8)
    q = (q + 8).to(torch.uint8)
    if n % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    q = q.view(-1, 2)
    return q[:, 0] | (q[:, 1] << 4)


def quantize_blockwise(x: torch.Tensor, bits: int, block: int, seed: int | None = None):
    """Blockwise absmax quantisation of a flat tensor to `bits` (8 or 4) bits.

    Returns (codes, scales): int8 codes (bits=8) or packed uint8 nibbles (bits=4), and one float32
    scale per block (max(absmax, TINY) / QMAX). Round to nearest (ties up) when `seed` is None;
    otherwise unbiased stochastic rounding floor(v + u) with u = uniform_hash(seed, element index).
    A non-finite input makes its block's scale non-finite; the caller checks the scales.
    """
    return _quantize(x, None, bits, block, seed)


def quantize_blockwise_feedback(x: torch.Tensor, residual: torch.Tensor, bits: int, block: int, seed: int | None = None):
    """Error-feedback quantisation: quantise e = x + residual, and set residual <- e - dequant(codes).

    `residual` is a float32 tensor of x's size, updated in place; returns (codes, scales) exactly as
    quantize_blockwise(e) would.
    """
    return _quantize(x, residual, bits, block, seed)


def _quantize(x: torch.Tensor, residual: torch.Tensor | None, bits: int, block: int, seed: int | None):
    n = x.numel()
    scales = torch.empty(-(-n // block), dtype=torch.float32, device=x.device)
    codes = torch.empty(n if bits == 8 else (n + 1) // 2, dtype=torch.int8 if bits == 8 else torch.uint8, device=x.device)
    for start, end in _chunks(n, block):
        e = x[start:end].float()
        if residual is not None:
            e = e + residual[start:end]
        q, s = _quantize_chunk(e, bits, block, seed, start)
        scales[start // block : start // block + s.numel()] = s
        if residual is not None:
            residual[start:end] = e - (q * s[:, None]).view(-1)[: end - start]
        if bits == 8:
            codes[start:end] = _store_codes(q, bits, end - start)
        else:
            codes[start // 2 : (end + 1) // 2] = _store_codes(q, bits, end - start)
    return codes, scales


def _load_codes(codes: torch.Tensor, bits: int, start: int, end: int) -> torch.Tensor:
    if bits == 8:
        return codes[start:end].float()
    packed = codes[start // 2 : (end + 1) // 2]
    pairs = torch.stack((packed & 0xF, packed >> 4), dim=1).view(-1)[: end - start]
    return pairs.float() - 8


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, n: int) -> torch.Tensor:
    """Inverse of quantize_blockwise: float32 tensor of n elements, code * scale of its block."""
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    for start, end in _chunks(n, block):
        q = _blocks(_load_codes(codes, bits, start, end), block)
        s = scales[start // block : start // block + q.shape[0]]
        out[start:end] = (q * s[:, None]).view(-1)[: end - start]
    return out


def pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integers below 2**width into a little-endian bit stream (uint8)."""
    n = values.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=values.device)
    shifts = torch.arange(width, device=values.device)
    bits = ((values.reshape(-1, 1).to(torch.int64) >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = -bits.numel() % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    weights = (1 << torch.arange(8, device=values.device)).to(torch.uint8)
    return (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: `count` integers (int64) of `width` bits each."""
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=packed.device)
    bits = ((packed.reshape(-1, 1) >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1).reshape(-1)
    bits = bits[: count * width].view(count, width).to(torch.int64)
    return (bits << torch.arange(width, device=packed.device)).sum(dim=1)


def packed_bits_size(count: int, width: int) -> int:
    """Bytes that pack_bits uses for `count` values of `width` bits."""
    return math.ceil(count * width / 8)


def sign_quantize(x: torch.Tensor, block: int):
    """Scaled 1-bit quantisation: one sign bit per element (1 for x >= 0) and per-block mean |x|."""
    n = x.numel()
    nblocks = -(-n // block)
    scales = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)
    for start, end in _chunks(n, block):
        v = x[start:end].float()
        b = _blocks(v, block)
        counts = torch.full((b.shape[0],), float(block), device=x.device)
        counts[-1] = (end - start) - block * (b.shape[0] - 1)
        scales[start // block : start // block + b.shape[0]] = b.abs().sum(dim=1) / counts
        bits[start // 8 : (end + 7) // 8] = pack_bits((v >= 0).to(torch.uint8), 1)
    return bits, scales


def sign_dequantize(bits: torch.Tensor, scales: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """Inverse of sign_quantize: +scale or -scale of the element's block."""
    signs = unpack_bits(bits, 1, n).to(torch.float32) * 2 - 1
    per_elem = scales.repeat_interleave(block)[:n]
    return signs * per_elem
