"""Blockwise int8/int4 and the fp16/bf16 casts meet their documented error bounds."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcodec
from gradcodec import kernels
from gradcodec.codecs.base import EncodeContext
from gradcodec.codecs.quant import Int4, Int8
from gradcodec.errors import CorruptPayload

QMAX = {8: 127, 4: 7}


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
@given(x=tensors(), bits=st.sampled_from([8, 4]), block=st.sampled_from([8, 64, 256]))
def test_round_to_nearest_error_is_at_most_half_a_step(x, bits, block):
    codes, scales = kernels.quantize_blockwise(x, bits, block)
    x_hat = kernels.dequantize_blockwise(codes, scales, bits, block, x.numel())
    per_elem_scale = scales.repeat_interleave(block)[: x.numel()]
    assert bool(((x - x_hat).abs() <= per_elem_scale * (0.5 + 1e-5)).all())


@settings(max_examples=100, deadline=None)
@given(x=tensors(300), bits=st.sampled_from([8, 4]))
def test_stochastic_rounding_error_is_below_one_step(x, bits):
    codes, scales = kernels.quantize_blockwise(x, bits, 64, seed=7)
    x_hat = kernels.dequantize_blockwise(codes, scales, bits, 64, x.numel())
    per_elem_scale = scales.repeat_interleave(64)[: x.numel()]
    assert bool(((x - x_hat).abs() < per_elem_scale * (1 + 1e-5)).all())


def test_scale_is_block_absmax_over_qmax():
    x = torch.tensor([0.0, -3.0, 1.0, 2.0, 0.5, 0.25, -0.125, 1.5, 7.0])
    for bits in (8, 4):
        _, scales = kernels.quantize_blockwise(x, bits, 8)
        assert torch.equal(scales, torch.tensor([3.0, 7.0]) / QMAX[bits])


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased_over_seeds(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, generator=g)
    seeds = 4000
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


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    x = torch.tensor([7.0, -7.0, 0.0])
    codes, scales = kernels.quantize_blockwise(x, 4, 8)
    assert scales.item() == 1.0
    assert codes.tolist() == [(7 + 8) | ((-7 + 8) << 4), 8]


@pytest.mark.parametrize("stage", [Int8(), Int4()])
def test_decode_refuses_negative_or_nonfinite_scales(stage):
    sections = stage.encode(torch.randn(100), EncodeContext("w"))
    for bad in (-1.0, float("nan"), float("inf")):
        scales = sections[1].clone()
        scales[0] = bad
        with pytest.raises(CorruptPayload, match="scales"):
            stage.decode([sections[0], scales], (100,))


@pytest.mark.parametrize("stage", [Int8(), Int4()])
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
