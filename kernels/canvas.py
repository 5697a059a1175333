"""Triton kernels of the learned codec's LoRA canvas (kernels/reference.py, "LoRA canvas ops", is the spec).

The adapter's factors are separate tensors, so every kernel takes them as a *pointer table*: an int64
tensor of data_ptr()s, cast back to typed pointers in the kernel (all sources share one dtype; the
launcher passes the first tensor as `sample` for that type). One program handles one factor, read in
[TILE_ROWS, RANK_PAD] tiles of its canvas orientation F = source.T (LoRA A) or source (LoRA B):
element (j, c) of F is source offset c * L + j (transposed) or j * r + c, and sits at canvas offset
(j % height) * width + column + (j // height) * r + c. So a factor travels from its own tensor to the
canvas, or back, in one launch with no gather copy.

  canvas_pack      pass 1: sum of e * e (e = x + residual) -> scale = sqrt(sum / numel) (skipped when
                   scales are given); pass 2: canvas = e / scale
  canvas_unpack    out = canvas * scale           canvas_feedback   residual = (x + residual) - canvas * scale
  block_encode     canvas_pack's pass 1, then per [block_rows, block_cols] tile (band, group) of the
                   factor's columns: z = tile @ W[band, group] + b[band, group],
                   code = clamp(floor(qmax * tanh(z) + 0.5))
  block_decode     per tile: y = (code / qmax) @ W[band, group] + b[band, group], out = y * scale

Exactness (with the EXACT_FP launch options of kernels/pack.py): given the scales, pack, unpack and
feedback are bit-exact with the reference (one IEEE division / product / difference per element). The
scale's sum runs in another order than torch's, so scales agree to a few ulp; the light AE's dot
products and tanh (computed as 1 - 2 / (exp(2z) + 1)) likewise, so its codes may differ by one at a
rounding boundary and its decoded values to about 1e-6 relative (tests/test_kernels_canvas.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pack import EXACT_FP, launch_device, to_fp32

TILE = 2048  # elements per tile of a factor
CHUNK = 1024  # tile elements (rows x block columns) per step of the light AE's dot products


@triton.jit
def _factor_tile(info_ptr, pid, t, TILE_ROWS: tl.constexpr, RANK_PAD: tl.constexpr):
    """Rows [t, t + TILE_ROWS) of factor `pid`: (source offsets, canvas offsets relative to nothing, mask)."""
    length = tl.load(info_ptr + pid * 4)
    rank = tl.load(info_ptr + pid * 4 + 1)
    transposed = tl.load(info_ptr + pid * 4 + 2)
    rows = t + tl.arange(0, TILE_ROWS)[:, None]
    cols = tl.arange(0, RANK_PAD)[None, :]
    mask = (rows < length) & (cols < rank)
    src = tl.where(transposed != 0, cols * length + rows, rows * rank + cols)
    return rows, cols, src, mask


@triton.jit
def _canvas_offsets(info_ptr, pid, rows, cols, height, width):
    rank = tl.load(info_ptr + pid * 4 + 1)
    column = tl.load(info_ptr + pid * 4 + 3)
    return (rows % height) * width + column + (rows // height) * rank + cols


@triton.jit
def _load_e(src_table, res_table, sample, pid, src, mask, HAS_RES: tl.constexpr):
    """e = x (+ residual) in fp32 at source offsets `src` of factor `pid`."""
    x_ptr = tl.load(src_table + pid).to(sample.dtype, bitcast=True)
    e = to_fp32(tl.load(x_ptr + src, mask=mask, other=0.0))
    if HAS_RES:
        r_ptr = tl.load(res_table + pid).to(tl.pointer_type(tl.float32), bitcast=True)
        e = e + tl.load(r_ptr + src, mask=mask, other=0.0)
    return e


@triton.jit
def _factor_scale(info_ptr, src_table, res_table, sample, scales_ptr, pid,
                  HAS_RES: tl.constexpr, HAS_SCALES: tl.constexpr, TILE_ROWS: tl.constexpr, RANK_PAD: tl.constexpr):
    """The factor's scale: given, or sqrt(sum(e * e) / numel), stored to scales_ptr."""
    if HAS_SCALES:
        scale = tl.load(scales_ptr + pid)
    else:
        length = tl.load(info_ptr + pid * 4)
        rank = tl.load(info_ptr + pid * 4 + 1)
        acc = tl.zeros((TILE_ROWS, RANK_PAD), dtype=tl.float32)
        for t in range(0, length, TILE_ROWS):
            rows, cols, src, mask = _factor_tile(info_ptr, pid, t, TILE_ROWS, RANK_PAD)
            e = _load_e(src_table, res_table, sample, pid, src, mask, HAS_RES)
            acc += e * e
        total = tl.sum(tl.sum(acc, axis=1), axis=0)
        scale = tl.sqrt_rn(tl.math.div_rn(total, (length * rank).to(tl.float32)))
        tl.store(scales_ptr + pid, scale)
    return scale


@triton.jit
def _canvas_pack_kernel(info_ptr, src_table, res_table, sample, canvas_ptr, scales_ptr, height, width,
                        HAS_RES: tl.constexpr, HAS_SCALES: tl.constexpr, TILE_ROWS: tl.constexpr,
                        RANK_PAD: tl.constexpr):
    """Program p: factor p. Reads its source (+ fp32 residual), writes its canvas cells (fp32) and,
    unless HAS_SCALES, scales[p]."""
    pid = tl.program_id(0).to(tl.int64)
    scale = _factor_scale(info_ptr, src_table, res_table, sample, scales_ptr, pid, HAS_RES, HAS_SCALES,
                          TILE_ROWS, RANK_PAD)
    divisor = tl.where(scale > 0, scale, 1.0)
    length = tl.load(info_ptr + pid * 4)
    for t in range(0, length, TILE_ROWS):
        rows, cols, src, mask = _factor_tile(info_ptr, pid, t, TILE_ROWS, RANK_PAD)
        e = _load_e(src_table, res_table, sample, pid, src, mask, HAS_RES)
        dst = _canvas_offsets(info_ptr, pid, rows, cols, height, width)
        tl.store(canvas_ptr + dst, tl.math.div_rn(e, divisor), mask=mask)


@triton.jit
def _canvas_unpack_kernel(info_ptr, canvas_ptr, scales_ptr, out_table, src_table, res_table, sample, height, width,
                          FEEDBACK: tl.constexpr, TILE_ROWS: tl.constexpr, RANK_PAD: tl.constexpr):
    """Program p: factor p. d = canvas * scales[p]; writes out_p = d (fp32), or with FEEDBACK the
    fp32 residual_p = (x_p + residual_p) - d in place."""
    pid = tl.program_id(0).to(tl.int64)
    scale = tl.load(scales_ptr + pid)
    length = tl.load(info_ptr + pid * 4)
    for t in range(0, length, TILE_ROWS):
        rows, cols, src, mask = _factor_tile(info_ptr, pid, t, TILE_ROWS, RANK_PAD)
        dst = _canvas_offsets(info_ptr, pid, rows, cols, height, width)
        d = tl.load(canvas_ptr + dst, mask=mask, other=0.0) * scale
        if FEEDBACK:
            e = _load_e(src_table, res_table, sample, pid, src, mask, True)
            r_ptr = tl.load(res_table + pid).to(tl.pointer_type(tl.float32), bitcast=True)
            tl.store(r_ptr + src, e - d, mask=mask)
        else:
            o_ptr = tl.load(out_table + pid).to(tl.pointer_type(tl.float32), bitcast=True)
            tl.store(o_ptr + src, d, mask=mask)


@triton.jit
def _tile_cells(info_ptr, pid, band, group, i0, height,
                BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, CHUNK_ROWS: tl.constexpr):
    """Cells [i0, i0 + CHUNK_ROWS) x [0, BLOCK_COLS) of tile (band, group) of factor `pid`, flattened:
    (index in the tile, source offset, mask)."""
    length = tl.load(info_ptr + pid * 4)
    rank = tl.load(info_ptr + pid * 4 + 1)
    transposed = tl.load(info_ptr + pid * 4 + 2)
    flat = tl.arange(0, CHUNK_ROWS * BLOCK_COLS)
    i = i0 + flat // BLOCK_COLS
    local_col = group * BLOCK_COLS + flat % BLOCK_COLS  # the factor's own canvas column
    canvas_row = band * BLOCK_ROWS + i
    row = (local_col // rank) * height + canvas_row  # row of F
    col = local_col % rank
    mask = (i < BLOCK_ROWS) & (canvas_row < height) & (row < length)
    src = tl.where(transposed != 0, col * length + row, row * rank + col)
    return i * BLOCK_COLS + flat % BLOCK_COLS, src, mask


@triton.jit
def _tanh(z):
    return 1.0 - tl.math.div_rn(2.0, tl.exp(2.0 * z) + 1.0)


@triton.jit
def _block_encode_kernel(info_ptr, src_table, res_table, sample, weight_ptr, bias_ptr, codes_ptr, scales_ptr,
                         height, groups_total, bands,
                         HAS_RES: tl.constexpr, QMAX: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, CHUNK_ROWS: tl.constexpr,
                         TILE_ROWS: tl.constexpr, RANK_PAD: tl.constexpr):
    """Program p: factor p. Computes scales[p] as canvas_pack does, then for each of its tiles the K
    codes: codes[band, g, k] (int8), g counted over the whole canvas (column // BLOCK_COLS + group).
    weight fp32 [bands, groups_total, BLOCK_ROWS * BLOCK_COLS, K], bias fp32 [bands, groups_total, K]."""
    pid = tl.program_id(0).to(tl.int64)
    scale = _factor_scale(info_ptr, src_table, res_table, sample, scales_ptr, pid, HAS_RES, False,
                          TILE_ROWS, RANK_PAD)
    divisor = tl.where(scale > 0, scale, 1.0)
    length = tl.load(info_ptr + pid * 4)
    rank = tl.load(info_ptr + pid * 4 + 1)
    column = tl.load(info_ptr + pid * 4 + 3)
    groups = ((length + height - 1) // height) * rank // BLOCK_COLS
    ks = tl.arange(0, K_PAD)
    tile = BLOCK_ROWS * BLOCK_COLS
    for group in range(0, groups):
        for band in range(0, bands):
            position = band * groups_total + column // BLOCK_COLS + group
            z = tl.zeros((K_PAD,), dtype=tl.float32)
            for i0 in range(0, BLOCK_ROWS, CHUNK_ROWS):
                cell, src, mask = _tile_cells(info_ptr, pid, band, group, i0, height, BLOCK_ROWS, BLOCK_COLS, CHUNK_ROWS)
                v = tl.math.div_rn(_load_e(src_table, res_table, sample, pid, src, mask, HAS_RES), divisor)
                w_offs = (position * tile + cell)[:, None] * K + ks[None, :]
                w = tl.load(weight_ptr + w_offs, mask=(cell < tile)[:, None] & (ks < K)[None, :], other=0.0)
                z += tl.sum(v[:, None] * w, axis=0)
            z += tl.load(bias_ptr + position * K + ks, mask=ks < K, other=0.0)
            q = tl.minimum(tl.maximum(tl.floor(_tanh(z) * QMAX + 0.5), -QMAX), QMAX)
            tl.store(codes_ptr + position * K + ks, q.to(tl.int8), mask=ks < K)


@triton.jit
def _block_decode_kernel(info_ptr, codes_ptr, scales_ptr, weight_ptr, bias_ptr, out_table, height, groups_total, bands,
                         QMAX: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, CHUNK_ROWS: tl.constexpr):
    """Program p: factor p. For each of its tiles y = (codes / QMAX) @ weight[band, g] + bias[band, g]
    (weight fp32 [bands, groups_total, K, BLOCK_ROWS * BLOCK_COLS], bias [bands, groups_total,
    BLOCK_ROWS * BLOCK_COLS]); writes out_p = y * scales[p] (fp32) where the tile covers the factor."""
    pid = tl.program_id(0).to(tl.int64)
    scale = tl.load(scales_ptr + pid)
    length = tl.load(info_ptr + pid * 4)
    rank = tl.load(info_ptr + pid * 4 + 1)
    column = tl.load(info_ptr + pid * 4 + 3)
    o_ptr = tl.load(out_table + pid).to(tl.pointer_type(tl.float32), bitcast=True)
    groups = ((length + height - 1) // height) * rank // BLOCK_COLS
    ks = tl.arange(0, K_PAD)
    tile = BLOCK_ROWS * BLOCK_COLS
    for group in range(0, groups):
        for band in range(0, bands):
            position = band * groups_total + column // BLOCK_COLS + group
            code = tl.load(codes_ptr + position * K + ks, mask=ks < K, other=0).to(tl.float32)
            latent = tl.math.div_rn(code, QMAX)
            for i0 in range(0, BLOCK_ROWS, CHUNK_ROWS):
                cell, src, mask = _tile_cells(info_ptr, pid, band, group, i0, height, BLOCK_ROWS, BLOCK_COLS, CHUNK_ROWS)
                w_offs = (position * K + ks)[:, None] * tile + cell[None, :]
                w = tl.load(weight_ptr + w_offs, mask=(ks < K)[:, None] & (cell < tile)[None, :], other=0.0)
                bias = tl.load(bias_ptr + position * tile + cell, mask=cell < tile, other=0.0)
                tl.store(o_ptr + src, (tl.sum(latent[:, None] * w, axis=0) + bias) * scale, mask=mask)


# --------------------------------------------------------------------------------------- launchers


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _geometry(table: torch.Tensor) -> tuple[int, int]:
    """(TILE_ROWS, RANK_PAD) for the table's largest rank."""
    rank_pad = _pow2(int(table[:, 1].max()))
    return max(1, TILE // rank_pad), rank_pad


def _pointer_table(tensors, device, what: str) -> torch.Tensor:
    for t in tensors:
        if t.device != device or not t.is_contiguous():
            raise ValueError(f"{what}: every tensor must be contiguous and on {device}")
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def _check_sources(table: torch.Tensor, sources, residuals) -> None:
    if len(sources) != table.shape[0] or (residuals is not None and len(residuals) != table.shape[0]):
        raise ValueError(f"the layout has {table.shape[0]} factors but {len(sources)} sources were given")
    if len({s.dtype for s in sources}) != 1 or sources[0].dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError("canvas sources must all be float32, all float16 or all bfloat16")
    if residuals is not None and any(r.dtype != torch.float32 or r.shape != s.shape for r, s in zip(residuals, sources)):
        raise ValueError("residuals must be float32 tensors shaped like their sources")


def canvas_pack(table, sources, height, out_shape, residuals=None, scales=None):
    """See reference.canvas_pack."""
    _check_sources(table, sources, residuals)
    device = table.device
    canvas = torch.zeros(out_shape, dtype=torch.float32, device=device)
    given = scales is not None
    scales = scales.contiguous() if given else torch.empty(table.shape[0], dtype=torch.float32, device=device)
    src_table = _pointer_table(sources, device, "canvas_pack sources")
    res_table = _pointer_table(residuals, device, "canvas_pack residuals") if residuals is not None else src_table
    tile_rows, rank_pad = _geometry(table)
    with launch_device(table):
        _canvas_pack_kernel[(table.shape[0],)](
            table.contiguous(), src_table, res_table, sources[0], canvas, scales, height, out_shape[1],
            HAS_RES=residuals is not None, HAS_SCALES=given, TILE_ROWS=tile_rows, RANK_PAD=rank_pad, **EXACT_FP,
        )
    return canvas, scales


def _unpack(table, canvas, scales, height, outputs, sources, residuals):
    device = table.device
    feedback = sources is not None
    if feedback:
        _check_sources(table, sources, residuals)
        src_table = _pointer_table(sources, device, "canvas_feedback sources")
        res_table = _pointer_table(residuals, device, "canvas_feedback residuals")
        out_table, sample = res_table, sources[0]
    else:
        if len(outputs) != table.shape[0] or any(o.dtype != torch.float32 for o in outputs):
            raise ValueError("canvas_unpack: one float32 output per factor")
        out_table = _pointer_table(outputs, device, "canvas_unpack outputs")
        src_table = res_table = out_table
        sample = outputs[0]
    tile_rows, rank_pad = _geometry(table)
    with launch_device(table):
        _canvas_unpack_kernel[(table.shape[0],)](
            table.contiguous(), canvas.contiguous(), scales.contiguous(), out_table, src_table, res_table, sample,
            height, canvas.shape[1], FEEDBACK=feedback, TILE_ROWS=tile_rows, RANK_PAD=rank_pad, **EXACT_FP,
        )


def canvas_unpack(table, canvas, scales, height, outputs):
    """See reference.canvas_unpack."""
    _unpack(table, canvas, scales, height, outputs, None, None)
    return outputs


def canvas_feedback(table, canvas, scales, height, sources, residuals):
    """See reference.canvas_feedback."""
    _unpack(table, canvas, scales, height, None, sources, residuals)
    return residuals


def _block_geometry(block_rows: int, block_cols: int) -> int:
    """CHUNK_ROWS: tile rows per dot-product step (CHUNK elements, a power of two)."""
    return max(1, min(_pow2(block_rows), CHUNK // _pow2(block_cols)))


def block_encode(table, sources, height, out_shape, weight, bias, block_rows, block_cols, residuals=None, qmax=127):
    """See reference.block_encode."""
    _check_sources(table, sources, residuals)
    device = table.device
    bands, groups_total, k = out_shape[0] // block_rows, out_shape[1] // block_cols, weight.shape[-1]
    if block_cols & (block_cols - 1):
        raise ValueError(f"the block kernels need a power-of-two block_cols, got {block_cols}")
    codes = torch.zeros((bands, groups_total, k), dtype=torch.int8, device=device)
    scales = torch.empty(table.shape[0], dtype=torch.float32, device=device)
    src_table = _pointer_table(sources, device, "block_encode sources")
    res_table = _pointer_table(residuals, device, "block_encode residuals") if residuals is not None else src_table
    tile_rows, rank_pad = _geometry(table)
    with launch_device(table):
        _block_encode_kernel[(table.shape[0],)](
            table.contiguous(), src_table, res_table, sources[0], weight.float().contiguous(), bias.float().contiguous(),
            codes, scales, height, groups_total, bands, HAS_RES=residuals is not None, QMAX=qmax, K=k, K_PAD=_pow2(k),
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, CHUNK_ROWS=_block_geometry(block_rows, block_cols),
            TILE_ROWS=tile_rows, RANK_PAD=rank_pad, **EXACT_FP,
        )
    return codes, scales


def block_decode(table, codes, scales, height, weight, bias, block_rows, block_cols, outputs, qmax=127):
    """See reference.block_decode."""
    device = table.device
    bands, groups_total, k = codes.shape
    if len(outputs) != table.shape[0] or any(o.dtype != torch.float32 for o in outputs):
        raise ValueError("block_decode: one float32 output per factor")
    if block_cols & (block_cols - 1):
        raise ValueError(f"the block kernels need a power-of-two block_cols, got {block_cols}")
    out_table = _pointer_table(outputs, device, "block_decode outputs")
    with launch_device(table):
        _block_decode_kernel[(table.shape[0],)](
            table.contiguous(), codes.contiguous(), scales.contiguous(), weight.float().contiguous(),
            bias.float().contiguous(), out_table, height, groups_total, bands, QMAX=qmax, K=k, K_PAD=_pow2(k),
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, CHUNK_ROWS=_block_geometry(block_rows, block_cols),
            **EXACT_FP,
        )
    return outputs

