"""Triton kernels for blockwise absmax quantisation (kernels/reference.py is the spec).

Every kernel sees the flat tensor as a [nblocks, BLOCK] matrix whose last row may be partial, and
program p owns the ROWS consecutive blocks [p*ROWS, (p+1)*ROWS) as one [ROWS, BLOCK] tile: ROWS *
BLOCK is 2048 elements, or one block of 4096 (pack.block_tiling). A block's absmax is then a row
reduction, and since BLOCK is even the int4 bytes of a tile, [p*ROWS*BLOCK/2, (p+1)*ROWS*BLOCK/2),
belong to it alone. Offsets are int64 (the program id is widened first), so tensors of more than
2**31 elements are addressed correctly.

Bit-exactness with the reference, per element of a block with e = x (+ residual) in fp32:
    amax  = max(max |e|, TINY)             exact (a max reduction does not depend on its order)
    scale = amax / QMAX                    one IEEE division: tl.math.div_rn
    inv   = (1 / amax) * QMAX              IEEE reciprocal, then a rounded product, as the
                                           reference's amax.reciprocal() * qmax
    q     = clamp(floor(e * inv + u), +-QMAX)   u = 0.5, or uniform_hash(seed, element index)
    new residual = e - q * scale
On CUDA, Triton's `/` is an approximate division (div.full.f32), LLVM/ptxas would contract
e * inv + u and e - q * scale into FMAs (one rounding instead of two), and tl.floor would flush
subnormals (floor(-1e-40) = -0, not -1, which stochastic rounding can meet when u = 0); hence
div_rn, and the compile options pack.EXACT_FP on every launch. tests/test_kernels.py compiles these
kernels for sm_90 and checks the PTX: div.rn.f32, f32 arithmetic only in .rn form, no fma, no .ftz.

Non-finite inputs: NaN is mapped to +inf before the max reduction (whose NaN handling differs
between GPU and interpreter), so a block holding NaN or +-inf gets scale inf; its codes (and, with
feedback, its residual) are then unspecified, as they are in the reference. Callers check scales.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .pack import EXACT_FP, block_tiling, check_block, launch_device, pack_fields, to_fp32, unpack_fields

_TINY = tl.constexpr(reference.TINY)


@triton.jit
def uniform_hash(seed, offs):
    """reference.uniform_hash in uint32 arithmetic: floats in [0, 1) for int64 element indices `offs`.

    `seed` is the stream seed already reduced mod 2**32; products wrap mod 2**32 as in the reference.
    """
    lo = offs.to(tl.uint32)  # offs mod 2**32
    hi = (offs >> 32).to(tl.uint32)
    h = (lo * 0x9E3779B1) ^ (hi * 0x85EBCA77) ^ seed.to(tl.uint32)
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    h = h ^ (h >> 16)
    return (h >> 8).to(tl.float32) * (2.0**-24)


@triton.jit(do_not_specialize=["seed"])
def _quantize_kernel(x_ptr, res_ptr, codes_ptr, scales_ptr, n, seed,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr,
                     STOCHASTIC: tl.constexpr):
    """Reads x[n] (fp32/fp16/bf16) and, when res_ptr is not None, the fp32 residual[n]; writes
    scales[ceil(n/BLOCK)] (fp32), the codes (BITS=8: int8 codes[n]; BITS=4: uint8 codes[ceil(n/2)],
    element 2i in the low nibble of byte i, stored as code + 8) and, with a residual, the new
    residual in place: e - code * scale, for e = x + residual.

    Program p owns blocks [p*ROWS, (p+1)*ROWS) as a [ROWS, BLOCK] tile (module docstring).
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    e = to_fp32(tl.load(x_ptr + offs, mask=mask, other=0.0))
    if res_ptr is not None:
        e = e + tl.load(res_ptr + offs, mask=mask, other=0.0)

    a = tl.abs(e)
    amax = tl.maximum(tl.max(tl.where(a != a, float("inf"), a), axis=1), _TINY)
    scale = tl.math.div_rn(amax, QMAX)
    inv = tl.math.div_rn(1.0, amax) * QMAX
    t = e * inv[:, None]
    if STOCHASTIC:
        t = t + uniform_hash(seed, offs)
    else:
        t = t + 0.5
    q = tl.minimum(tl.maximum(tl.floor(t), -QMAX), QMAX)

    tl.store(scales_ptr + rows, scale, mask=rows * BLOCK < n)
    if res_ptr is not None:
        tl.store(res_ptr + offs, e - q * scale[:, None], mask=mask)
    if BITS == 8:
        tl.store(codes_ptr + offs, q.to(tl.int8), mask=mask)
    else:
        nibbles = tl.where(mask, q.to(tl.int32) + 8, 0)  # the high nibble past an odd n stays 0
        byte_offs = pid * (ROWS * BLOCK // 2) + tl.arange(0, ROWS * BLOCK // 2)
        packed = pack_fields(tl.reshape(nibbles, (ROWS * BLOCK,)), 2, 4)
        tl.store(codes_ptr + byte_offs, packed, mask=byte_offs < (n + 1) // 2)


@triton.jit
def _dequantize_kernel(codes_ptr, scales_ptr, out_ptr, n,
                       BLOCK: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr):
    """Reads the codes (layout as _quantize_kernel writes them) and scales[ceil(n/BLOCK)]; writes
    out[n] (fp32) = code * scale of its block.

    Program p owns blocks [p*ROWS, (p+1)*ROWS) as a [ROWS, BLOCK] tile (module docstring).
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    scale = to_fp32(tl.load(scales_ptr + rows, mask=rows * BLOCK < n, other=0.0))
    if BITS == 8:
        q = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
    else:
        byte_offs = pid * (ROWS * BLOCK // 2) + tl.arange(0, ROWS * BLOCK // 2)
        packed = tl.load(codes_ptr + byte_offs, mask=byte_offs < (n + 1) // 2, other=0)
        q = tl.reshape(unpack_fields(packed, 2, 4), (ROWS, BLOCK)).to(tl.float32) - 8.0
    tl.store(out_ptr + offs, q * scale[:, None], mask=mask)


def _check_bits(bits: int) -> None:
    if bits not in reference.QMAX:
        raise ValueError(f"bits must be one of {sorted(reference.QMAX)}, got {bits!r}")


def _quantize(x: torch.Tensor, residual: torch.Tensor | None, bits: int, block: int, seed: int | None):
    _check_bits(bits)
    check_block(block)
    n = x.numel()
    nblocks = -(-n // block)
    scales = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    codes = torch.empty(n if bits == 8 else (n + 1) // 2, dtype=torch.int8 if bits == 8 else torch.uint8,
                        device=x.device)
    if residual is not None and not (residual.dtype == torch.float32 and residual.numel() == n
                                     and residual.is_contiguous() and residual.device == x.device):
        raise ValueError("quantize_blockwise_feedback: residual must be a contiguous float32 tensor of x's "
                         f"size on x's device; got {residual.dtype}, {residual.numel()} elements, "
                         f"contiguous={residual.is_contiguous()}, {residual.device}")
    if n == 0:
        return codes, scales
    x = x.reshape(-1).contiguous()
    rows, warps = block_tiling(block)
    with launch_device(x):
        _quantize_kernel[(triton.cdiv(nblocks, rows),)](
            x, residual, codes, scales, n, 0 if seed is None else seed & 0xFFFFFFFF,
            BLOCK=block, ROWS=rows, BITS=bits, QMAX=reference.QMAX[bits], STOCHASTIC=seed is not None,
            num_warps=warps, **EXACT_FP,
        )
    return codes, scales


def quantize_blockwise(x: torch.Tensor, bits: int, block: int, seed: int | None = None):
    """Blockwise absmax quantisation of a flat tensor to `bits` (8 or 4) bits.

    Returns (codes, scales): int8 codes (bits=8) or packed uint8 nibbles (bits=4), and one float32
    scale per block (max(absmax, TINY) / QMAX). Round to nearest (ties up) when `seed` is None;
    otherwise unbiased stochastic rounding floor(v + u) with u = uniform_hash(seed, element index).
    A non-finite input makes its block's scale non-finite; the caller checks the scales.
    """
    return _quantize(x, None, bits, block, seed)


def quantize_blockwise_feedback(x: torch.Tensor, residual: torch.Tensor, bits: int, block: int,
                                seed: int | None = None):
    """Error-feedback quantisation: quantise e = x + residual, and set residual <- e - dequant(codes).

    `residual` is a contiguous float32 tensor of x's size, updated in place in the same pass that
    reads x and writes the codes; returns (codes, scales) exactly as quantize_blockwise(e) would.
    """
    return _quantize(x, residual, bits, block, seed)


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, n: int) -> torch.Tensor:
    """Inverse of quantize_blockwise: float32 tensor of n elements, code * scale of its block."""
    _check_bits(bits)
    check_block(block)
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    if n == 0:
        return out
    nblocks = -(-n // block)
    ncodes = n if bits == 8 else (n + 1) // 2
    if codes.numel() < ncodes or scales.numel() < nblocks:
        raise ValueError(f"dequantize_blockwise: {n} elements need {ncodes} codes and {nblocks} scales, "
                         f"got {codes.numel()} and {scales.numel()}")
    codes = codes.reshape(-1).contiguous()
    scales = scales.reshape(-1).contiguous()
    rows, warps = block_tiling(block)
    with launch_device(codes):
        _dequantize_kernel[(triton.cdiv(nblocks, rows),)](
            codes, scales, out, n, BLOCK=block, ROWS=rows, BITS=bits, num_warps=warps, **EXACT_FP
        )
    return out
