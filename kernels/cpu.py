"""CPU fast path of the blockwise quantisers: the reference's chunks, spread over a small thread pool.

The reference (kernels/reference.py) walks a tensor in L2-sized chunks, and every torch op on a chunk
is its own OpenMP parallel region: a few hundred regions per 16M-element call. On cores shared with
another busy process each region waits until the scheduler runs all of torch's threads again, and
encode/decode fell to 0.03-0.3 of the copy bandwidth (docs/results/cpu-contention.md). Here the
parallelism is ours instead:

    tensor ──▶ pieces of PIECE_ELEMENTS (whole blocks) ──▶ pool of torch.get_num_threads() workers,
               each running torch single-threaded on its pieces, chunk by chunk ──▶ one join per call

A descheduled worker holds up only the piece it is on, and the others take the remaining pieces.
Each chunk goes through the reference's own rounding (`reference._quantize_chunk`); codes are stored
and decoded with fewer passes than the reference's general bit packer but the same arithmetic (decode:
code as float, times its block's scale), so results are bit-identical to the reference whatever the
piece size or worker count; tests/test_kernels_cpu.py checks it. Widths other than 8 and 4 bits go
to the reference unchanged.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from . import reference

# 4 MiB of fp32 per piece: 4 reference chunks, a few dozen pieces per 100 MB, little imbalance
PIECE_ELEMENTS = 4 * reference.CHUNK_ELEMENTS
# below torch's grain size (32768 elements) torch runs elementwise ops on one thread anyway: no pool
POOL_MIN_ELEMENTS = 1 << 15
FAST_BITS = (8, 4)

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _single_threaded(barrier: threading.Barrier) -> None:
    torch.set_num_threads(1)  # per thread: OpenMP's thread count is a per-thread setting
    barrier.wait()  # hold each worker until all have started, so every one runs this once


def _pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of `workers` single-threaded torch workers, started on first use."""
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            caller_threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(workers, thread_name_prefix="gradcodec-cpu")
            barrier = threading.Barrier(workers)
            list(pool.map(lambda _: _single_threaded(barrier), range(workers)))
            # set_num_threads(1) in a worker also became the default of threads started later: restore it
            torch.set_num_threads(caller_threads)
            _pools[workers] = pool
    return pool


# a forked child has the dict but not the threads
os.register_at_fork(after_in_child=_pools.clear)


def _pieces(n: int, block: int, workers: int) -> list[tuple[int, int]]:
    """[start, end) ranges covering n elements, starting on whole blocks and on even elements (int4 bytes)."""
    align = block * 2 // math.gcd(block, 2)
    step = max(align, PIECE_ELEMENTS // align * align)
    if n < step * workers:  # few pieces: one per worker
        step = max(align, -(-n // (workers * align)) * align)
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _parallel(work, n: int, block: int) -> None:
    workers = torch.get_num_threads()
    pieces = _pieces(n, block, workers)
    if len(pieces) == 1:
        work(*pieces[0])
        return

    def run(piece):
        with torch.no_grad():  # grad mode is per thread; a worker must not record what the caller would not
            work(*piece)

    list(_pool(workers).map(run, pieces))


def _chunks(start: int, end: int):
    for s in range(start, end, reference.CHUNK_ELEMENTS):
        yield s, min(s + reference.CHUNK_ELEMENTS, end)


def _serial(n: int, bits: int) -> bool:
    return bits not in FAST_BITS or n < POOL_MIN_ELEMENTS or torch.get_num_threads() == 1


def _store_codes(q: torch.Tensor, bits: int, codes: torch.Tensor, start: int, end: int) -> None:
    """Codes of elements [start, end) (float levels, padded to whole blocks) into `codes`.

    int4 bytes are (lo + 8) + 16 (hi + 8): one add forms both nibbles of every byte (small integers,
    exact in fp32), a quarter of the passes of the reference's general bit packer.
    """
    m = end - start
    flat = q.view(-1)
    if bits == 8:
        codes[start:end].copy_(flat[:m])
        return
    pairs = flat[: m - m % 2].view(-1, 2)
    first = start // 2
    codes[first : first + pairs.shape[0]].copy_(torch.add(pairs[:, 0], pairs[:, 1], alpha=16).add_(136))
    if m % 2:  # odd length: the last code sits alone in the low nibble
        codes[first + pairs.shape[0]] = int(flat[m - 1]) + 8


def _quantize(x: torch.Tensor, residual: torch.Tensor | None, bits: int, block: int, seed: int | None):
    n = x.numel()
    scales = torch.empty(-(-n // block), dtype=torch.float32)
    codes = torch.empty(n if bits == 8 else (n + 1) // 2, dtype=torch.int8 if bits == 8 else torch.uint8)

    def work(start: int, end: int) -> None:
        for s, e in _chunks(start, end):
            v = x[s:e].float()
            if residual is not None:
                v = v + residual[s:e]
            q, sc = reference._quantize_chunk(v, bits, block, seed, s)
            scales[s // block : s // block + sc.numel()] = sc
            if residual is not None:
                residual[s:e] = v - (q * sc[:, None]).view(-1)[: e - s]
            _store_codes(q, bits, codes, s, e)

    _parallel(work, n, block)
    return codes, scales


def quantize_blockwise(x: torch.Tensor, bits: int, block: int, seed: int | None = None):
    """reference.quantize_blockwise, bit for bit, in pieces on the worker pool."""
    if _serial(x.numel(), bits):
        return reference.quantize_blockwise(x, bits, block, seed)
    return _quantize(x, None, bits, block, seed)


def quantize_blockwise_feedback(x: torch.Tensor, residual: torch.Tensor, bits: int, block: int, seed: int | None = None):
    """reference.quantize_blockwise_feedback, bit for bit (residual updated in place), on the worker pool."""
    if _serial(x.numel(), bits):
        return reference.quantize_blockwise_feedback(x, residual, bits, block, seed)
    return _quantize(x, residual, bits, block, seed)


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, n: int) -> torch.Tensor:
    """reference.dequantize_blockwise, bit for bit, on the worker pool: each value is float(code) * scale."""
    if _serial(n, bits):
        return reference.dequantize_blockwise(codes, scales, bits, block, n)
    out = torch.empty(n, dtype=torch.float32)

    def work(start: int, end: int) -> None:
        for s, e in _chunks(start, end):
            o, whole = out[s:e], (e - s) // block
            blocks = scales[s // block : s // block + whole, None]
            if bits == 8:  # int8 * fp32 promotes to fp32: the conversion and the product in one pass
                torch.mul(codes[s : s + whole * block].view(whole, block), blocks, out=o[: whole * block].view(whole, block))
                o[whole * block :].copy_(codes[s + whole * block : e])
            else:
                packed = codes[s // 2 : (e + 1) // 2]
                o[0::2].copy_(packed[: (e - s + 1) // 2] & 0xF)
                o[1::2].copy_(packed[: (e - s) // 2] >> 4)
                o.sub_(8)
                o[: whole * block].view(whole, block).mul_(blocks)
            if (e - s) % block:
                o[whole * block :].mul_(scales[s // block + whole])

    _parallel(work, n, block)
    return out
