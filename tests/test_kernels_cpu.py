"""The CPU fast path (kernels/cpu.py) against the reference (kernels/reference.py): bit for bit.

Sizes are chosen so that inputs split into several pieces with a partial last block, an odd element
count (int4's lone last nibble), and pieces smaller than the reference's chunk; the piece size is
shrunk so that these cases stay small.
"""
import threading

import pytest
import torch

from gradcodec import kernels
from gradcodec.kernels import cpu, reference

real_thread_count = torch.get_num_threads  # the fixture below replaces torch's
SIZES = [1 << 15, (1 << 16) + 37, 5 * (1 << 14) + 1, 300_001]


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(cpu, "PIECE_ELEMENTS", 1 << 14)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 1 << 13)
    monkeypatch.delenv("GRADCODEC_KERNELS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the pool runs even on a one-core machine


def _input(n: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 3, n)  # blocks of very different scales
    x[: 64 * 3] = 0  # all-zero blocks
    return x.to(dtype)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [64, 1024])
@pytest.mark.parametrize("seed", [None, 11])
def test_quantize_matches_the_reference_bit_for_bit(n, bits, block, seed):
    x = _input(n)
    codes, scales = cpu.quantize_blockwise(x, bits, block, seed)
    ref_codes, ref_scales = reference.quantize_blockwise(x, bits, block, seed)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_match_the_reference(dtype):
    x = _input(SIZES[1], dtype)
    for got, want in zip(cpu.quantize_blockwise(x, 4, 64), reference.quantize_blockwise(x, 4, 64)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_matches_the_reference_bit_for_bit(n, bits):
    codes, scales = reference.quantize_blockwise(_input(n), bits, 64)
    got = cpu.dequantize_blockwise(codes, scales, bits, 64, n)
    assert torch.equal(got, reference.dequantize_blockwise(codes, scales, bits, 64, n))


@pytest.mark.parametrize("bits", [8, 4])
def test_feedback_matches_the_reference_codes_and_residual(bits):
    n = SIZES[3]
    x, start = _input(n), torch.randn(n) * 0.1
    residual, ref_residual = start.clone(), start.clone()
    got = cpu.quantize_blockwise_feedback(x, residual, bits, 64, 5)
    want = reference.quantize_blockwise_feedback(x, ref_residual, bits, 64, 5)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(residual, ref_residual)


def test_the_dispatch_point_sends_cpu_tensors_to_the_pool_and_reference_forces_it_off(monkeypatch):
    x = _input(SIZES[1])
    assert kernels.select_backend(x) == "cpu"
    calls = []
    monkeypatch.setattr(cpu, "_pool", lambda workers, real=cpu._pool: calls.append(workers) or real(workers))
    kernels.quantize_blockwise(x, 8, 64)
    assert calls == [2]
    monkeypatch.setenv("GRADCODEC_KERNELS", "reference")
    assert kernels.select_backend(x) == "reference"
    kernels.quantize_blockwise(x, 8, 64)
    assert calls == [2]


def test_pieces_cover_the_input_on_block_and_byte_boundaries():
    for n in SIZES:
        pieces = cpu._pieces(n, 64, 2)
        assert pieces[0][0] == 0 and pieces[-1][1] == n and len(pieces) >= 2
        assert all(a[1] == b[0] and b[0] % 64 == 0 for a, b in zip(pieces, pieces[1:]))


def test_the_pool_leaves_the_callers_thread_count_and_the_default_for_new_threads_alone():
    before = real_thread_count()
    cpu._pool(3)
    seen = []
    t = threading.Thread(target=lambda: seen.append(real_thread_count()))
    t.start()
    t.join()
    assert real_thread_count() == before and seen == [before]


def test_a_worker_error_reaches_the_caller():
    with pytest.raises(RuntimeError):
        cpu.dequantize_blockwise(torch.zeros(10, dtype=torch.int8), torch.ones(1), 8, 64, SIZES[3])
