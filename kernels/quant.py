"""Triton kernels for blockwise absmax quantisation at 1 to 8 bits (kernels/reference.py is the spec).

Every kernel sees the flat tensor as a [nblocks, BLOCK] matrix whose last row may be partial, and
program p owns the ROWS consecutive blocks [p*ROWS, (p+1)*ROWS) as one [ROWS, BLOCK] tile: ROWS *
BLOCK is 2048 elements, or one block of 4096 (pack.block_tiling). A block's absmax is then a row
reduction, and since BLOCK is a multiple of 8 the code bytes of a tile, [p*ROWS*BLOCK*BITS/8,
(p+1)*ROWS*BLOCK*BITS/8), belong to it alone. Offsets are int64 (the program id is widened first), so
tensors of more than 2**31 elements are addressed correctly.

Bit-exactness with the reference, per element of a block with e = x (+ residual) in fp32:
    amax  = max(max |e|, TINY)             exact (a max reduction does not depend on its order)
    scale = amax / QMAX                    one IEEE division: tl.math.div_rn
    inv   = (1 / amax) * QMAX              IEEE reciprocal, then a rounded product, as the
                                           reference's amax.reciprocal() * qmax
    q     = clamp(floor(e * inv + u), +-QMAX)   u = 0.5, or uniform_hash(seed, element index)
    new residual = e - q * scale
One bit (levels q = +-1/2): round to nearest takes scale = amax and q = +1/2 where e >= 0; stochastic
rounding takes scale = 2 * amax and q = clamp(floor((e * (1/amax * 0.5) + 0.5) + u), 0, 1) - 1/2.
The codes are int8 q (BITS=8) or the fields q + OFFSET in a bit stream (pack.store_fields).
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
from .pack import EXACT_FP, block_tiling, check_block, launch_device, load_fields, store_fields, to_fp32

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
def _quantize_kernel(x_ptr, res_ptr, codes_ptr, scales_ptr, n, ncodes, seed,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr,
                     OFFSET: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Reads x[n] (fp32/fp16/bf16) and, when res_ptr is not None, the fp32 residual[n]; writes
    scales[ceil(n/BLOCK)] (fp32), the codes (BITS=8: int8 codes[n]; otherwise uint8 codes[ncodes],
    the bit stream of the fields q + OFFSET) and, with a residual, the new residual in place:
    e - q * scale, for e = x + residual.

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
    if BITS == 1:
        if STOCHASTIC:
            scale = amax * 2.0
            t = e * (tl.math.div_rn(1.0, amax) * 0.5)[:, None]
            t = (t + 0.5) + uniform_hash(seed, offs)
            q = tl.minimum(tl.maximum(tl.floor(t), 0.0), 1.0) - 0.5
        else:
            scale = amax
            q = tl.where(e >= 0, 0.5, -0.5)
    else:
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
        fields = tl.where(mask, (q + OFFSET).to(tl.int32), 0)  # the bits past n in the last byte stay 0
        store_fields(codes_ptr, pid * (ROWS * BLOCK * BITS // 8), tl.reshape(fields, (ROWS * BLOCK,)), ncodes, BITS)


@triton.jit
def _dequantize_kernel(codes_ptr, scales_ptr, out_ptr, n, ncodes,
                       BLOCK: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr):
    """Reads the codes (layout as _quantize_kernel writes them, ncodes elements) and
    scales[ceil(n/BLOCK)]; writes out[n] (fp32) = q * scale of its block.

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
        fields = load_fields(codes_ptr, pid * (ROWS * BLOCK * BITS // 8), ROWS * BLOCK, ncodes, BITS)
        q = tl.reshape(fields, (ROWS, BLOCK)).to(tl.float32) - OFFSET
    tl.store(out_ptr + offs, q * scale[:, None], mask=mask)


def _check_bits(bits: int) -> None:
    if bits not in reference.WIDTHS:
        raise ValueError(f"bits must be one of {list(reference.WIDTHS)}, got {bits!r}")


def _quantize(x: torch.Tensor, residual: torch.Tensor | None, bits: int, block: int, seed: int | None):
    _check_bits(bits)
    check_block(block)
    n = x.numel()
    nblocks = -(-n // block)
    scales = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    codes = reference.empty_codes(n, bits, x.device)
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
            x, residual, codes, scales, n, codes.numel(), 0 if seed is None else seed & 0xFFFFFFFF,
            BLOCK=block, ROWS=rows, BITS=bits, QMAX=reference.QMAX.get(bits, 1), OFFSET=reference.offset(bits),
            STOCHASTIC=seed is not None, num_warps=warps, **EXACT_FP,
        )
    return codes, scales


def quantize_blockwise(x: torch.Tensor, bits: int, block: int, seed: int | None = None):
    """Blockwise absmax quantisation of a flat tensor to `bits` (1 to 8) bits; reference.quantize_blockwise
    defines the codes and scales."""
    return _quantize(x, None, bits, block, seed)


def quantize_blockwise_feedback(x: torch.Tensor, residual: torch.Tensor, bits: int, block: int,
                                seed: int | None = None):
    """Error-feedback quantisation: quantise e = x + residual, and set residual <- e - dequant(codes).

    `residual` is a contiguous float32 tensor of x's size, updated in place in the same pass that
    reads x and writes the codes; returns (codes, scales) exactly as quantize_blockwise(e) would.
    """
    return _quantize(x, residual, bits, block, seed)


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, n: int) -> torch.Tensor:
    """Inverse of quantize_blockwise: float32 tensor of n elements, level * scale of its block."""
    _check_bits(bits)
    check_block(block)
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    if n == 0:
        return out
    nblocks = -(-n // block)
    ncodes = reference.code_count(n, bits)
    if codes.numel() < ncodes or scales.numel() < nblocks:
        raise ValueError(f"dequantize_blockwise: {n} elements need {ncodes} codes and {nblocks} scales, "
                         f"got {codes.numel()} and {scales.numel()}")
    codes = codes.reshape(-1).contiguous()
    scales = scales.reshape(-1).contiguous()
    rows, warps = block_tiling(block)
    with launch_device(codes):
        _dequantize_kernel[(triton.cdiv(nblocks, rows),)](
            codes, scales, out, n, ncodes, BLOCK=block, ROWS=rows, BITS=bits, OFFSET=reference.offset(bits),
            num_warps=warps, **EXACT_FP
        )
    return out
