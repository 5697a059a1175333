"""Triton kernels for bit packing and the scaled 1-bit sign quantiser (kernels/reference.py is the spec).

Bit streams are little-endian: value i of `width` bits occupies bits [i*width, (i+1)*width) of the
stream, bit j of the stream being bit (j % 8) of byte j // 8. Triton handles widths 1 to 8: for those
dividing 8 every value lies inside one byte, 8 // width values to a byte; for 3, 5, 6 and 7 each group
of 8 values fills `width` whole bytes, gathered in one int64 word (store_fields, load_fields). Wider
values take the reference's PyTorch implementation, on whatever device the tensor is on.

Each kernel handles one tile of TILE consecutive values (or elements) per program; the sign kernels
see the input as a [nblocks, block] matrix and give each program ROWS whole blocks, so that a
block's mean |x| is one row reduction. Offsets are int64, so tensors of more than 2**31 elements
are addressed correctly.

Exactness on CUDA: packing is integer arithmetic; the sign scale's division uses tl.math.div_rn
(IEEE, `div.rn.f32`; Triton's `/` is approximate on CUDA), and every launch here and in quant.py
uses the compile options EXACT_FP. The per-block sum of |x| is a float reduction whose order
differs from torch's, so sign scales agree with the reference only to within a few ulps
(tests/test_kernels.py states the bound); the sign bits and sign_dequantize are bit-exact.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import reference

TILE = 2048  # values (or elements) per program
TRITON_WIDTHS = tuple(range(1, 9))
# Compile options of every launch here and in quant.py, so that each fp32 operation rounds once and
# keeps subnormals, as in the reference (and numpy under the interpreter, which ignores them):
#   enable_fp_fusion=False   no a*b+c contraction into an FMA: LLVM emits mul.rn/add.rn/sub.rn, which
#                            ptxas never fuses, and ptxas runs with --fmad=false;
#   enable_reflect_ftz=False libdevice (through which Triton lowers tl.floor) in its non-FTZ form:
#                            with Triton's default, floor is cvt.rmi.ftz.f32 and floor(-1e-40) = -0.
EXACT_FP = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


def launch_device(t: torch.Tensor):
    """Context making t's GPU current for a launch (a no-op for the interpreter's CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_block(block: int) -> None:
    if not (isinstance(block, int) and 8 <= block <= 4096 and block & (block - 1) == 0):
        raise ValueError(f"block must be a power of two in [8, 4096], got {block!r}")


def block_tiling(block: int) -> tuple[int, int]:
    """(ROWS, num_warps) of a kernel that gives each program ROWS whole blocks: TILE elements, or
    one block when the block is larger (4096 elements, spread over 8 warps)."""
    rows = max(1, TILE // block)
    return rows, 4 if rows * block <= TILE else 8


@triton.jit
def to_fp32(v):
    """Exact widening of fp32/fp16/bf16 values to fp32.

    bf16 is widened through its bits (the high half of an fp32): the same as cvt.f32.bf16 on CUDA,
    while Triton's interpreter converts bf16 subnormals wrongly.
    """
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def pack_fields(fields, PER_BYTE: tl.constexpr, WIDTH: tl.constexpr):
    """Pack a 1-D int32 tensor of fields (each below 2**WIDTH) into bytes, PER_BYTE fields a byte.

    Field k of each consecutive group of PER_BYTE goes to bits [k*WIDTH, (k+1)*WIDTH) of the
    group's byte; returns fields.numel // PER_BYTE uint8 values.
    """
    grouped = tl.reshape(fields, (fields.numel // PER_BYTE, PER_BYTE))
    shifts = tl.arange(0, PER_BYTE) * WIDTH
    return tl.sum(grouped << shifts[None, :], axis=1).to(tl.uint8)


@triton.jit
def unpack_fields(packed, PER_BYTE: tl.constexpr, WIDTH: tl.constexpr):
    """Inverse of pack_fields: 1-D uint8 bytes -> int32 fields, field k of byte i at i*PER_BYTE + k."""
    shifts = tl.arange(0, PER_BYTE) * WIDTH
    fields = (packed.to(tl.int32)[:, None] >> shifts[None, :]) & ((1 << WIDTH) - 1)
    return tl.reshape(fields, (packed.numel * PER_BYTE,))


@triton.jit
def store_fields(ptr, base, fields, nbytes, WIDTH: tl.constexpr):
    """Store a 1-D int32 tensor of fields (each below 2**WIDTH, a multiple of 8 of them) as the bit
    stream bytes [base, base + fields.numel * WIDTH / 8) of ptr, those below nbytes."""
    if 8 % WIDTH == 0:
        offs = base + tl.arange(0, fields.numel * WIDTH // 8)
        tl.store(ptr + offs, pack_fields(fields, 8 // WIDTH, WIDTH), mask=offs < nbytes)
    else:
        GROUPS: tl.constexpr = fields.numel // 8
        lanes = tl.arange(0, 8).to(tl.int64)
        grouped = tl.reshape(fields, (GROUPS, 8)).to(tl.int64) & ((1 << WIDTH) - 1)
        word = tl.sum(grouped << (lanes * WIDTH)[None, :], axis=1)
        packed = ((word[:, None] >> (lanes * 8)[None, :]) & 255).to(tl.uint8)
        offs = base + tl.arange(0, GROUPS).to(tl.int64)[:, None] * WIDTH + lanes[None, :]
        tl.store(ptr + offs, packed, mask=(lanes[None, :] < WIDTH) & (offs < nbytes))


@triton.jit
def load_fields(ptr, base, COUNT: tl.constexpr, nbytes, WIDTH: tl.constexpr):
    """Inverse of store_fields: COUNT (a multiple of 8) int32 fields from the bit stream bytes at
    [base, base + COUNT * WIDTH / 8) of ptr; bytes at or past nbytes read as 0."""
    if 8 % WIDTH == 0:
        offs = base + tl.arange(0, COUNT * WIDTH // 8)
        fields = unpack_fields(tl.load(ptr + offs, mask=offs < nbytes, other=0), 8 // WIDTH, WIDTH)
    else:
        GROUPS: tl.constexpr = COUNT // 8
        lanes = tl.arange(0, 8).to(tl.int64)
        offs = base + tl.arange(0, GROUPS).to(tl.int64)[:, None] * WIDTH + lanes[None, :]
        packed = tl.load(ptr + offs, mask=(lanes[None, :] < WIDTH) & (offs < nbytes), other=0)
        word = tl.sum(packed.to(tl.int64) << (lanes * 8)[None, :], axis=1)
        grouped = (word[:, None] >> (lanes * WIDTH)[None, :]) & ((1 << WIDTH) - 1)
        fields = tl.reshape(grouped.to(tl.int32), (COUNT,))
    return fields


@triton.jit
def _pack_bits_kernel(values_ptr, packed_ptr, count, nbytes, WIDTH: tl.constexpr, VALUES: tl.constexpr):
    """Reads values[count] (any integer dtype), writes packed[nbytes] (uint8).

    Program p packs values [p*VALUES, (p+1)*VALUES) into bytes [p*VALUES*WIDTH/8, (p+1)*VALUES*WIDTH/8);
    the low WIDTH bits of each value are kept, values past `count` pad the last byte with zeros.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * VALUES + tl.arange(0, VALUES)
    values = tl.load(values_ptr + offs, mask=offs < count, other=0)
    store_fields(packed_ptr, pid * (VALUES * WIDTH // 8), values.to(tl.int32) & ((1 << WIDTH) - 1), nbytes, WIDTH)


@triton.jit
def _unpack_bits_kernel(packed_ptr, out_ptr, count, nbytes, WIDTH: tl.constexpr, VALUES: tl.constexpr):
    """Reads packed[nbytes] (uint8), writes out[count] (int64).

    Program p expands bytes [p*VALUES*WIDTH/8, (p+1)*VALUES*WIDTH/8) into values [p*VALUES, (p+1)*VALUES).
    """
    pid = tl.program_id(0).to(tl.int64)
    fields = load_fields(packed_ptr, pid * (VALUES * WIDTH // 8), VALUES, nbytes, WIDTH)
    offs = pid * VALUES + tl.arange(0, VALUES)
    tl.store(out_ptr + offs, fields.to(tl.int64), mask=offs < count)


@triton.jit
def _sign_quantize_kernel(x_ptr, bits_ptr, scales_ptr, n, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """Reads x[n] (fp32/fp16/bf16); writes bits[ceil(n/8)] (uint8) and scales[ceil(n/BLOCK)] (fp32).

    Program p owns blocks [p*ROWS, (p+1)*ROWS) as a [ROWS, BLOCK] tile: a row's scale is the sum of
    its |x| divided by its count of real elements (BLOCK, or fewer in the last block); bit i is
    x[i] >= 0. BLOCK is a multiple of 8, so the tile's bits fill bytes [p*ROWS*BLOCK/8, ...) alone.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    x = to_fp32(tl.load(x_ptr + offs, mask=mask, other=0.0))

    # real elements per row; rows past the end count 1, which keeps their (unstored) mean finite
    count = tl.minimum(tl.maximum(n - rows * BLOCK, 1), BLOCK).to(tl.float32)
    scale = tl.math.div_rn(tl.sum(tl.abs(x), axis=1), count)
    tl.store(scales_ptr + rows, scale, mask=rows * BLOCK < n)

    signs = tl.where(mask & (x >= 0), 1, 0)
    byte_offs = pid * (ROWS * BLOCK // 8) + tl.arange(0, ROWS * BLOCK // 8)
    packed = pack_fields(tl.reshape(signs, (ROWS * BLOCK,)), 8, 1)
    tl.store(bits_ptr + byte_offs, packed, mask=byte_offs < (n + 7) // 8)


@triton.jit
def _sign_dequantize_kernel(bits_ptr, scales_ptr, out_ptr, n, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """Reads bits[ceil(n/8)] (uint8) and scales[ceil(n/BLOCK)]; writes out[n] (fp32) = +-scale of the block.

    Program p owns blocks [p*ROWS, (p+1)*ROWS) as a [ROWS, BLOCK] tile, as in _sign_quantize_kernel.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    scale = to_fp32(tl.load(scales_ptr + rows, mask=rows * BLOCK < n, other=0.0))[:, None]
    byte_offs = pid * (ROWS * BLOCK // 8) + tl.arange(0, ROWS * BLOCK // 8)
    packed = tl.load(bits_ptr + byte_offs, mask=byte_offs < (n + 7) // 8, other=0)
    signs = tl.reshape(unpack_fields(packed, 8, 1), (ROWS, BLOCK))
    tl.store(out_ptr + offs, tl.where(signs != 0, scale, -scale), mask=offs < n)


def pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integers below 2**width into a little-endian bit stream (uint8).

    Triton for widths 1 to 8; wider values run reference.pack_bits.
    """
    if width not in TRITON_WIDTHS:
        return reference.pack_bits(values, width)
    count = values.numel()
    nbytes = reference.packed_bits_size(count, width)
    packed = torch.empty(nbytes, dtype=torch.uint8, device=values.device)
    if count == 0:
        return packed
    values = values.reshape(-1)
    if values.dtype == torch.bool:
        values = values.view(torch.uint8)
    elif values.is_floating_point():
        values = values.to(torch.int64)  # as the reference does
    values = values.contiguous()
    with launch_device(values):
        _pack_bits_kernel[(triton.cdiv(count, TILE),)](values, packed, count, nbytes, WIDTH=width, VALUES=TILE, **EXACT_FP)
    return packed


def unpack_bits(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: `count` integers (int64) of `width` bits each.

    Triton for widths 1 to 8; wider values run reference.unpack_bits.
    """
    if width not in TRITON_WIDTHS:
        return reference.unpack_bits(packed, width, count)
    out = torch.empty(count, dtype=torch.int64, device=packed.device)
    if count == 0:
        return out
    nbytes = reference.packed_bits_size(count, width)
    if packed.numel() < nbytes:
        raise ValueError(f"unpack_bits: {count} values of {width} bits need {nbytes} bytes, got {packed.numel()}")
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.to(torch.uint8)  # the reference reads the low 8 bits of each element
    packed = packed.contiguous()
    with launch_device(packed):
        _unpack_bits_kernel[(triton.cdiv(count, TILE),)](packed, out, count, nbytes, WIDTH=width, VALUES=TILE, **EXACT_FP)
    return out


def sign_quantize(x: torch.Tensor, block: int):
    """Scaled 1-bit quantisation: one sign bit per element (1 for x >= 0) and per-block mean |x|."""
    check_block(block)
    n = x.numel()
    nblocks = -(-n // block)
    scales = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)
    if n == 0:
        return bits, scales
    x = x.reshape(-1).contiguous()
    rows, warps = block_tiling(block)
    with launch_device(x):
        _sign_quantize_kernel[(triton.cdiv(nblocks, rows),)](
            x, bits, scales, n, BLOCK=block, ROWS=rows, num_warps=warps, **EXACT_FP
        )
    return bits, scales


def sign_dequantize(bits: torch.Tensor, scales: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """Inverse of sign_quantize: +scale or -scale of the element's block."""
    check_block(block)
    out = torch.empty(n, dtype=torch.float32, device=bits.device)
    if n == 0:
        return out
    nblocks = -(-n // block)
    if bits.numel() < (n + 7) // 8 or scales.numel() < nblocks:
        raise ValueError(f"sign_dequantize: {n} elements need {(n + 7) // 8} bytes of bits and {nblocks} scales, "
                         f"got {bits.numel()} and {scales.numel()}")
    bits = bits.reshape(-1).contiguous()
    scales = scales.reshape(-1).contiguous()
    rows, warps = block_tiling(block)
    with launch_device(bits):
        _sign_dequantize_kernel[(triton.cdiv(nblocks, rows),)](
            bits, scales, out, n, BLOCK=block, ROWS=rows, num_warps=warps, **EXACT_FP
        )
    return out
