"""Blockwise int1 ... int8 and the fp16/bf16 casts meet their documented error bounds."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcodec
from gradcodec import kernels
from gradcodec.codecs.base import EncodeContext
from gradcodec.codecs.quant import BLOCKWISE
from gradcodec.errors import CorruptPayload
from gradcodec.kernels import reference
from tests.test_kernels import check_quantize, gradient_like, ieee_events_ok, special_values

WIDTHS = list(range(1, 9))
QMAX = {bits: 2 ** (bits - 1) - 1 for bits in range(2, 9)}  # written out here, not read from the code under test


def tensors(max_size: int = 700):
    """Float vectors with a wide range of magnitudes, including zeros and exact ties."""
    scales = st.sampled_from([1e-30, 1e-6, 1.0, 1e4, 1e30])
    return st.builds(
        lambda n, seed, scale, zero_frac: _vector(n, seed, scale, zero_frac),
        st.integers(0, max_size),
        st.integers(0, 2**31 - 1),
        scales,
        st.floats(0, 0.5),
    )


def _vector(n, seed, scale, zero_frac):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    x[torch.rand(n, generator=g) < zero_frac] = 0
    return x


@settings(max_examples=200, deadline=None)
@given(x=tensors(), bits=st.sampled_from(WIDTHS), block=st.sampled_from([8, 64, 256]))
def test_round_to_nearest_error_is_at_most_half_a_step(x, bits, block):
    codes, scales = kernels.quantize_blockwise(x, bits, block)
    x_hat = kernels.dequantize_blockwise(codes, scales, bits, block, x.numel())
    per_elem_scale = scales.repeat_interleave(block)[: x.numel()]
    assert bool(((x - x_hat).abs() <= per_elem_scale * (0.5 + 1e-5)).all())


@settings(max_examples=200, deadline=None)
@given(x=tensors(300), bits=st.sampled_from(WIDTHS))
def test_stochastic_rounding_error_is_below_one_step(x, bits):
    codes, scales = kernels.quantize_blockwise(x, bits, 64, seed=7)
    x_hat = kernels.dequantize_blockwise(codes, scales, bits, 64, x.numel())
    per_elem_scale = scales.repeat_interleave(64)[: x.numel()]
    assert bool(((x - x_hat).abs() < per_elem_scale * (1 + 1e-5)).all())


def test_scale_is_block_absmax_over_qmax():
    x = torch.tensor([0.0, -3.0, 1.0, 2.0, 0.5, 0.25, -0.125, 1.5, 7.0])
    for bits in range(2, 9):
        _, scales = kernels.quantize_blockwise(x, bits, 8)
        assert torch.equal(scales, torch.tensor([3.0, 7.0]) / QMAX[bits])


def test_one_bit_grid_is_half_absmax_or_absmax():
    """One bit: levels +-absmax/2 (scale = absmax) rounded to nearest, +-absmax (scale = 2 absmax) stochastic."""
    x = torch.tensor([0.0, -3.0, 1.0, 2.0, -0.5, 0.25, -0.125, 1.5, -7.0])
    codes, scales = kernels.quantize_blockwise(x, 1, 8)
    assert torch.equal(scales, torch.tensor([3.0, 7.0]))
    assert codes.tolist() == [0b10101101, 0]  # bit i: x_i >= 0 (the zero included)
    x_hat = kernels.dequantize_blockwise(codes, scales, 1, 8, 9)
    assert x_hat.tolist() == [1.5, -1.5, 1.5, 1.5, -1.5, 1.5, -1.5, 1.5, -3.5]
    codes, scales = kernels.quantize_blockwise(x, 1, 8, seed=3)
    assert torch.equal(scales, torch.tensor([6.0, 14.0]))
    x_hat = kernels.dequantize_blockwise(codes, scales, 1, 8, 9)
    assert set(x_hat[:8].abs().tolist()) == {3.0} and x_hat[8].item() == -7.0  # -absmax is always -absmax


@pytest.mark.parametrize("bits", WIDTHS)
def test_stochastic_rounding_is_unbiased_over_seeds(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(256, generator=g)
    seeds = 2000
    total = torch.zeros_like(x)
    for seed in range(seeds):
        codes, scales = kernels.quantize_blockwise(x, bits, 64, seed=seed)
        total += kernels.dequantize_blockwise(codes, scales, bits, 64, x.numel())
    mean = total / seeds
    step = scales.repeat_interleave(64)
    # each x_hat is x + step * (Bernoulli(p) - p): std of the mean <= step / (2 sqrt(seeds));
    # 5 standard deviations over 256 elements, so a biased rounder (error up to step/2) fails
    assert bool(((mean - x).abs() <= 5 * step / (2 * seeds**0.5)).all())
    nearest = kernels.dequantize_blockwise(*kernels.quantize_blockwise(x, bits, 64), bits, 64, x.numel())
    assert not bool(((nearest - x).abs() <= 5 * step / (2 * seeds**0.5)).all())


def _bit_stream(fields: list[int], width: int) -> list[int]:
    """Little-endian bit stream of `fields`, one bit at a time: the layout docs/codecs.md describes."""
    bits = [(f >> j) & 1 for f in fields for j in range(width)]
    bits += [0] * (-len(bits) % 8)
    return [sum(bits[i + j] << j for j in range(8)) for i in range(0, len(bits), 8)]


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    x = torch.tensor([7.0, -7.0, 0.0])
    codes, scales = kernels.quantize_blockwise(x, 4, 8)
    assert scales.item() == 1.0
    assert codes.tolist() == [(7 + 8) | ((-7 + 8) << 4), 8]


@pytest.mark.parametrize("bits", range(2, 8))
def test_codes_are_levels_plus_offset_packed_densely(bits):
    """Levels -QMAX..QMAX at scale 1, stored as q + 2**(bits-1) in a little-endian bit stream."""
    q = QMAX[bits]
    levels = [q, -q, 0, 1, -1, q, q // 2, -(q // 2), 0, -q, 1]  # 11 values: a partial last byte
    x = torch.tensor(levels, dtype=torch.float32)
    codes, scales = kernels.quantize_blockwise(x, bits, 16)
    assert scales.tolist() == [1.0]
    assert codes.tolist() == _bit_stream([v + 2 ** (bits - 1) for v in levels], bits)
    assert kernels.dequantize_blockwise(codes, scales, bits, 16, len(levels)).tolist() == levels


@pytest.mark.parametrize("bits", WIDTHS)
def test_codec_spends_bits_plus_scales_per_element(bits):
    x = torch.randn(64 * 1024)
    blob = gradcodec.encode(x, f"int{bits}")
    info = gradcodec.inspect(blob)
    assert info.codec == f"int{bits}:block=64"
    assert info.tensors[0].payload_bytes == 64 * 1024 * bits // 8 + 4 * 1024


@pytest.mark.parametrize("bits", WIDTHS)
def test_error_feedback_keeps_what_the_decoder_misses(bits):
    x = gradient_like(1000, torch.float32)
    codec = gradcodec.get_codec(f"int{bits}", error_feedback=True, seed=1)
    total_sent = torch.zeros_like(x)
    for _ in range(3):
        total_sent += codec.decode(codec.encode(x))
    residual = codec.residuals[""]
    assert torch.allclose(total_sent + residual, 3 * x, rtol=0, atol=1e-5 * float(x.abs().max()))


@pytest.mark.parametrize("stage", [cls() for cls in BLOCKWISE.values()], ids=lambda s: s.name)
def test_decode_refuses_negative_or_nonfinite_scales(stage):
    sections = stage.encode(torch.randn(100), EncodeContext("w"))
    for bad in (-1.0, float("nan"), float("inf")):
        scales = sections[1].clone()
        scales[0] = bad
        with pytest.raises(CorruptPayload, match="scales"):
            stage.decode([sections[0], scales], (100,))


@pytest.mark.parametrize("stage", [cls() for cls in BLOCKWISE.values()], ids=lambda s: s.name)
def test_decode_refuses_sections_of_the_wrong_size(stage):
    codes, scales = stage.encode(torch.randn(100), EncodeContext("w"))
    with pytest.raises(CorruptPayload, match="section 0"):
        stage.decode([codes[:-1], scales], (100,))
    with pytest.raises(CorruptPayload, match="section 1"):
        stage.decode([codes, scales[:-1]], (100,))


@settings(max_examples=100, deadline=None)
@given(x=tensors(300))
def test_fp16_relative_error_bound_in_normal_range(x):
    x = x.clamp(-60000, 60000)
    x_hat = gradcodec.decode(gradcodec.encode(x, "fp16"))
    normal = x.abs() >= 2**-14
    assert bool(((x - x_hat).abs()[normal] <= 2**-11 * x.abs()[normal]).all())
    assert bool(((x - x_hat).abs()[~normal] <= 2**-25).all())


@settings(max_examples=100, deadline=None)
@given(x=tensors(300))
def test_bf16_relative_error_bound(x):
    x_hat = gradcodec.decode(gradcodec.encode(x, "bf16"))
    normal = x.abs() >= torch.finfo(torch.float32).tiny
    assert bool(((x - x_hat).abs()[normal] <= 2**-8 * x.abs()[normal]).all())


def test_float64_input_is_quantised_and_restored_as_float64():
    x = torch.randn(100, dtype=torch.float64)
    out = gradcodec.decode(gradcodec.encode(x, "int8"))
    assert out.dtype == torch.float64 and float((out - x).abs().max()) < float(x.abs().max()) / 127


# ---- Triton kernels against the reference (interpreter on CPU, or CUDA) ---------------------------

@pytest.mark.skipif(not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
                    reason="neither TRITON_INTERPRET=1 nor a CUDA device")
@ieee_events_ok
@pytest.mark.parametrize("bits", WIDTHS)
def test_triton_matches_reference_at_every_width(monkeypatch, bits):
    """quantize, its fused feedback form and dequantize: bit for bit, odd sizes, both roundings, edge values."""
    monkeypatch.setenv("GRADCODEC_KERNELS", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for block in (8, 64, 4096):
        for n in sorted({1, 7, block + 1, 3 * block + 5, 2100}):
            for seed in (None, 12345):
                check_quantize(gradient_like(n, torch.bfloat16 if n % 2 else torch.float32, seed=n), bits, block, seed, device)
    for seed in (None, 1):
        check_quantize(special_values(torch.float32), bits, 8, seed, device)
        check_quantize(special_values(torch.float16)[3:], bits, 8, seed, device)
