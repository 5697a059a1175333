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
  * blockwise absmax quantisation to `bits` = 1..8 bits: element x of a block decodes to q * scale,
    where the level q is an integer in [-QMAX, QMAX], QMAX = 2**(bits-1) - 1, for bits >= 2, and
    q = +-1/2 for bits = 1 (the two-level midrise grid). int8 codes are stored as int8 (q itself);
    other widths store the field q + OFFSET (OFFSET = 2**(bits-1), or 1/2 for one bit) as an
    unsigned `bits`-bit value in a bit stream (pack_bits): int4 is q + 8 in a nibble, element 2i in
    the low nibble of byte i and element 2i+1 in the high nibble;
  * bit streams are little-endian: value i of `width` bits occupies bits [i*width, (i+1)*width) of
    the stream, bit j of the stream being bit (j % 8) of byte j // 8.
"""
from __future__ import annotations

import math

import torch

WIDTHS = tuple(range(1, 9))  # code widths of the blockwise absmax quantisers
QMAX = {bits: 2 ** (bits - 1) - 1 for bits in WIDTHS[1:]}  # largest level; one bit has levels +-1/2
# Blocks whose absmax is below TINY are scaled as if it were TINY: the scale stays a normal float and
# the error bound |x - x_hat| <= scale / 2 holds for every block, including all-zero ones.
TINY = 2.0**-100
# elements per chunk, in whole blocks: 1 MiB of fp32, which stays in L2 cache whatever the block size
CHUNK_ELEMENTS = 1 << 18

_MASK32 = 0xFFFFFFFF


def _mul32_(a: torch.Tensor, c: int) -> torch.Tensor:
    """a <- (a * c) mod 2**32, in place, for int64 `a` in [0, 2**32), without int64 overflow."""
    high = a * (c >> 16)
    high &= 0xFFFF
    high <<= 16
    a *= c & 0xFFFF
    a += high
    a &= _MASK32
    return a


def uniform_hash(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Counter-based uniform floats in [0, 1) for element `offsets` (int64) of a stream `seed`.

    A 32-bit integer hash of (seed, offset) keeps stochastic rounding reproducible from the seed
    alone, independent of chunking, device and launch geometry: the Triton kernels compute the
    same hash with uint32 arithmetic.
    """
    h = _mul32_(offsets & _MASK32, 0x9E3779B1)
    if offsets.numel() and int(offsets.max()) > _MASK32:  # the high word is zero below 2**32
        h ^= _mul32_(offsets >> 32, 0x85EBCA77)
    h ^= seed & _MASK32
    h ^= h >> 16
    _mul32_(h, 0x7FEB352D)
    h ^= h >> 15
    _mul32_(h, 0x846CA68B)
    h ^= h >> 16
    h >>= 8
    return h.to(torch.float32).mul_(2.0**-24)


def _chunks(n: int, block: int):
    step = max(block, CHUNK_ELEMENTS // block * block)
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _blocks(v: torch.Tensor, block: int) -> torch.Tensor:
    """View a chunk as [blocks, block], zero-padding a final partial block (a small copy)."""
    tail = -v.numel() % block
    if tail:
        v = torch.nn.functional.pad(v, (0, tail))
    return v.view(-1, block)


def offset(bits: int) -> float:
    """OFFSET of a `bits`-bit field: the stored field is level + OFFSET (module docstring)."""
    return 0.5 if bits == 1 else float(2 ** (bits - 1))


def _quantize_chunk(e: torch.Tensor, bits: int, block: int, seed: int | None, start: int):
    """Float levels q (padded to whole blocks) and scales of one fp32 chunk that starts at `start`."""
    v = _blocks(e, block)
    amax = v.abs().amax(dim=1).clamp_min(TINY)
    if bits == 1:
        return _one_bit_chunk(v, amax, seed, start)
    qmax = QMAX[bits]
    # a tensor divisor: torch's CUDA kernels turn division by a Python scalar into a reciprocal multiply
    scale = amax / torch.full_like(amax, qmax)
    # `qmax / amax` on a tensor is torch's Tensor.__rtruediv__, i.e. amax.reciprocal() * qmax: two
    # roundings, not one IEEE division. Spelled out so that kernels reproduce it.
    inv = amax.reciprocal() * qmax
    t = v * inv[:, None]
    if seed is None:
        # |v * inv| <= QMAX (1 + 3 eps), so floor(t + 0.5) is already within [-QMAX, QMAX]
        return t.add_(0.5).floor_(), scale
    offs = torch.arange(start, start + v.numel(), dtype=torch.int64, device=v.device)
    t += uniform_hash(seed, offs).view_as(t)
    return t.floor_().clamp_(-qmax, qmax), scale


def _one_bit_chunk(v: torch.Tensor, amax: torch.Tensor, seed: int | None, start: int):
    """One bit: levels q = +-1/2 of the grid step `scale`.

    Round to nearest takes scale = amax (levels +-amax/2, the grid whose worst error over
    [-amax, amax] is smallest) and q = +1/2 for v >= 0. Stochastic rounding needs levels that
    enclose every value, so scale = 2 amax (levels +-amax), and q = +1/2 with probability
    (1 + v/amax) / 2: floor(v * (0.5 / amax) + 0.5 + u), two roundings in this order.
    """
    if seed is None:
        return (v >= 0).float().sub_(0.5), amax
    t = v * (amax.reciprocal() * 0.5)[:, None]
    offs = torch.arange(start, start + v.numel(), dtype=torch.int64, device=v.device)
    t.add_(0.5).add_(uniform_hash(seed, offs).view_as(t))
    return t.floor_().clamp_(0, 1).sub_(0.5), amax * 2


def code_count(n: int, bits: int) -> int:
    """Elements of the codes tensor for n values: n int8 codes (bits=8), else the bytes of the bit stream."""
    return n if bits == 8 else packed_bits_size(n, bits)


def empty_codes(n: int, bits: int, device) -> torch.Tensor:
    return torch.empty(code_count(n, bits), dtype=torch.int8 if bits == 8 else torch.uint8, device=device)


def _store_codes(q: torch.Tensor, bits: int, codes: torch.Tensor, start: int, end: int) -> None:
    """Write the codes of elements [start, end) (float levels, padded to whole blocks) into `codes`.

    `start` is a multiple of the block, hence of 8: the chunk's codes begin on a whole byte.
    """
    flat = q.view(-1)[: end - start]
    if bits == 8:
        codes[start:end].copy_(flat)
        return
    packed = pack_bits((flat + offset(bits)).to(torch.uint8), bits)
    first = start * bits // 8
    codes[first : first + packed.numel()].copy_(packed)


def quantize_blockwise(x: torch.Tensor, bits: int, block: int, seed: int | None = None):
    """Blockwise absmax quantisation of a flat tensor to `bits` (1 to 8) bits.

    Returns (codes, scales): int8 codes (bits=8) or the bit stream of the fields q + OFFSET (uint8),
    and one float32 scale (the grid step) per block: max(absmax, TINY) / QMAX for bits >= 2; for one
    bit, max(absmax, TINY) (round to nearest) or twice it (stochastic). Round to nearest (ties up)
    when `seed` is None; otherwise unbiased stochastic rounding floor(v + u) with
    u = uniform_hash(seed, element index). A non-finite input makes its block's scale non-finite;
    the caller checks the scales.
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
    codes = empty_codes(n, bits, x.device)
    for start, end in _chunks(n, block):
        e = x[start:end].float()
        if residual is not None:
            e = e + residual[start:end]
        q, s = _quantize_chunk(e, bits, block, seed, start)
        scales[start // block : start // block + s.numel()] = s
        if residual is not None:
            residual[start:end] = e - (q * s[:, None]).view(-1)[: end - start]
        _store_codes(q, bits, codes, start, end)
    return codes, scales


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, n: int) -> torch.Tensor:
    """Inverse of quantize_blockwise: float32 tensor of n elements, level * scale of its block."""
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    for start, end in _chunks(n, block):
        o = out[start:end]
        if bits == 8:
            o.copy_(codes[start:end])
        else:
            o.copy_(_unpack(codes[start * bits // 8 : -(-end * bits // 8)], bits, end - start))
            o.sub_(offset(bits))
        whole = (end - start) // block
        o[: whole * block].view(whole, block).mul_(scales[start // block : start // block + whole, None])
        if (end - start) % block:
            o[whole * block :].mul_(scales[start // block + whole])
    return out


def pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integers below 2**width into a little-endian bit stream (uint8).

    Only the low `width` bits of each value are kept.
    """
    n = values.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=values.device)
    if 8 % width == 0:  # whole values per byte: combine 8 / width of them without a bit expansion
        per = 8 // width
        v = values.reshape(-1).to(torch.uint8)
        if n % per:
            v = torch.nn.functional.pad(v, (0, per - n % per))
        shifts = torch.arange(0, 8, width, device=values.device, dtype=torch.uint8)
        return (v.view(-1, per) << shifts).sum(dim=1, dtype=torch.uint8)
    if width < 8:  # eight values fill `width` whole bytes: gather each group in one int64 word
        v = values.reshape(-1).to(torch.int64) & ((1 << width) - 1)
        if n % 8:
            v = torch.nn.functional.pad(v, (0, 8 - n % 8))
        lanes = torch.arange(8, device=values.device)
        word = (v.view(-1, 8) << lanes * width).sum(dim=1)
        stream = (word[:, None] >> lanes[:width] * 8) & 0xFF
        return stream.to(torch.uint8).reshape(-1)[: packed_bits_size(n, width)]
    shifts = torch.arange(width, device=values.device)
    bits = ((values.reshape(-1, 1).to(torch.int64) >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = -bits.numel() % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    weights = (1 << torch.arange(8, device=values.device)).to(torch.uint8)
    return (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """unpack_bits for widths up to 8, as uint8 (dividing 8) or int64 (the others)."""
    if 8 % width == 0:
        shifts = torch.arange(0, 8, width, device=packed.device, dtype=torch.uint8)
        return ((packed.reshape(-1, 1) >> shifts) & ((1 << width) - 1)).reshape(-1)[:count]
    groups = -(-count // 8)
    b = packed.reshape(-1)[: groups * width].to(torch.uint8).to(torch.int64)
    if b.numel() < groups * width:
        b = torch.nn.functional.pad(b, (0, groups * width - b.numel()))
    lanes = torch.arange(8, device=packed.device)
    word = (b.view(groups, width) << lanes[:width] * 8).sum(dim=1)
    return ((word[:, None] >> lanes * width) & ((1 << width) - 1)).reshape(-1)[:count]


def unpack_bits(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: `count` integers (int64) of `width` bits each."""
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=packed.device)
    if width <= 8:
        return _unpack(packed, width, count).to(torch.int64)
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
    out = torch.empty(n, dtype=torch.float32, device=bits.device)
    for start, end in _chunks(n, block):
        o = out[start:end]
        o.copy_(_unpack(bits[start // 8 : (end + 7) // 8], 1, end - start))
        o.mul_(2).sub_(1)
        whole = (end - start) // block
        o[: whole * block].view(whole, block).mul_(scales[start // block : start // block + whole, None])
        if (end - start) % block:
            o[whole * block :].mul_(scales[start // block + whole])
    return out


# =================================================================================================
# LoRA canvas ops (gradcodec.learned): the learned codec's pack/normalise, unpack and light AE.
#
# `table` is the int64 [factors, 4] tensor of gradcodec.learned.canvas.CanvasLayout.table: per factor
# (length L, rank r, transposed, column). Factor i in canvas orientation is F_i = source_i.T when
# `transposed` (LoRA A, [r, L]) and source_i otherwise (LoRA B, [L, r]); row j of F_i sits at canvas
# row j % height, columns column + (j // height) * r + [0, r). Canvases are contiguous float32, at
# least [height, width]; what no factor covers is zero.
#
# A factor's scale is its RMS, sqrt(sum(e * e) / numel) in fp32 with e = x (+ residual); the kernel
# sums in another order, so scales agree to a few ulp, not bit for bit. Everything downstream of a
# given scale (division, multiplication, e - decoded) is one IEEE operation per element: bit-exact.
# =================================================================================================


def _folds(length: int, rank: int, column: int, height: int):
    """(lo, hi, col) per column block of a factor: rows [lo, hi) of F sit at canvas[:hi - lo, col:col + rank]."""
    for f in range(-(-length // height)):
        lo = f * height
        yield lo, min(lo + height, length), column + f * rank


def _factor_rows(table: torch.Tensor) -> list[tuple[int, int, bool, int]]:
    return [(int(a), int(b), bool(c), int(d)) for a, b, c, d in table.tolist()]


def _safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _gather(canvas: torch.Tensor, length: int, rank: int, column: int, height: int) -> torch.Tensor:
    """F [L, r] of a factor, read back from the canvas."""
    return torch.cat([canvas[: hi - lo, col : col + rank] for lo, hi, col in _folds(length, rank, column, height)])


def canvas_pack(table: torch.Tensor, sources, height: int, out_shape: tuple[int, int], residuals=None, scales=None):
    """Normalised canvas of `sources` (+ `residuals`): F_i / scale_i placed as `table` says.

    sources: one contiguous float tensor (fp32/fp16/bf16) per factor, of its own shape; residuals:
    None or fp32 tensors of the same shapes. scales: None to compute each factor's RMS, or an fp32
    [factors] tensor to use (ones give the plain layout). A zero scale leaves the factor's values
    unscaled (they are all zero). Returns (canvas fp32 `out_shape`, scales fp32 [factors]).
    """
    rows = _factor_rows(table)
    device = table.device
    canvas = torch.zeros(out_shape, dtype=torch.float32, device=device)
    computed = scales is None
    scales = torch.empty(len(rows), dtype=torch.float32, device=device) if computed else scales
    for i, ((length, rank, transposed, column), x) in enumerate(zip(rows, sources)):
        e = x.float()
        if residuals is not None:
            e = e + residuals[i]
        if computed:
            scales[i] = ((e * e).sum() / e.numel()).sqrt()
        f = (e.t() if transposed else e) / _safe_divisor(scales[i])
        for lo, hi, col in _folds(length, rank, column, height):
            canvas[: hi - lo, col : col + rank] = f[lo:hi]
    return canvas, scales


def canvas_unpack(table: torch.Tensor, canvas: torch.Tensor, scales: torch.Tensor, height: int, outputs):
    """Inverse of canvas_pack: outputs_i (fp32, the source's shape, written in place) = F_i * scale_i."""
    for i, (length, rank, transposed, column) in enumerate(_factor_rows(table)):
        f = _gather(canvas, length, rank, column, height) * scales[i]
        outputs[i].copy_(f.t() if transposed else f)
    return outputs


def canvas_feedback(table: torch.Tensor, canvas: torch.Tensor, scales: torch.Tensor, height: int, sources, residuals):
    """Error feedback after a canvas round trip: residuals_i <- (sources_i + residuals_i) - F_i * scale_i."""
    for i, (length, rank, transposed, column) in enumerate(_factor_rows(table)):
        f = _gather(canvas, length, rank, column, height) * scales[i]
        e = sources[i].float() + residuals[i]
        residuals[i].copy_(e - (f.t() if transposed else f))
    return residuals


def _tiles(canvas: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """[bands, groups, block_rows * block_cols]: tile (band, group) = canvas rows of the band, columns of the group."""
    h, w = canvas.shape
    t = canvas.view(h // block_rows, block_rows, w // block_cols, block_cols)
    return t.permute(0, 2, 1, 3).reshape(h // block_rows, w // block_cols, block_rows * block_cols)


def block_encode(table: torch.Tensor, sources, height: int, out_shape: tuple[int, int], weight: torch.Tensor,
                 bias: torch.Tensor, block_rows: int, block_cols: int, residuals=None, qmax: int = 127):
    """The light AE's encoder, adapter tensors to int8 latents in one op.

    The normalised canvas (canvas_pack, `out_shape` a multiple of the tile) is cut into tiles of
    [block_rows, block_cols]; tile (band, group), flattened row-major, gives
    z = tile @ weight[band, group] + bias[band, group] (weight fp32 [bands, groups, block_rows *
    block_cols, K], bias [bands, groups, K]: one projection per tile position) and codes = clamp(floor(qmax * tanh(z) + 0.5), -qmax, qmax): a fixed range, so no
    latent scales travel (qmax 127 for int8 codes, 7 for int4). Returns (codes int8 [bands, groups, K],
    scales fp32 [factors]). The kernel sums the products in another order and computes tanh from exp,
    so a code may differ by one where qmax * tanh(z) is within float error of a rounding boundary.
    """
    canvas, scales = canvas_pack(table, sources, height, out_shape, residuals)
    z = torch.einsum("bgi,bgik->bgk", _tiles(canvas, block_rows, block_cols), weight) + bias
    codes = (torch.tanh(z) * qmax + 0.5).floor_().clamp_(-qmax, qmax).to(torch.int8)
    return codes, scales


def block_decode_canvas(codes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, block_rows: int,
                        block_cols: int, qmax: int = 127) -> torch.Tensor:
    """The light AE's decoder up to the normalised canvas: tile = (codes / qmax) @ weight[band, group] + bias[band, group].

    codes int8 [bands, groups, K]; weight fp32 [bands, groups, K, block_rows * block_cols]; bias
    [bands, groups, block_rows * block_cols].
    """
    bands, groups, _ = codes.shape
    y = torch.einsum("bgk,bgki->bgi", codes.float() / qmax, weight) + bias
    y = y.view(bands, groups, block_rows, block_cols).permute(0, 2, 1, 3)
    return y.reshape(bands * block_rows, groups * block_cols)


def block_decode(table: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, height: int, weight: torch.Tensor,
                 bias: torch.Tensor, block_rows: int, block_cols: int, outputs, qmax: int = 127):
    """The light AE's decoder, int8 latents to adapter tensors in one op: block_decode_canvas, then canvas_unpack."""
    canvas = block_decode_canvas(codes, weight, bias, block_rows, block_cols, qmax)
    return canvas_unpack(table, canvas.contiguous(), scales, height, outputs)
