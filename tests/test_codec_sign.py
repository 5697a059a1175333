"""Scaled sign (1-bit): signs and block L1 norms preserved, the error identity, bias, hostile payloads."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradcodec as gc
from gradcodec import wire
from gradcodec.codecs.sign import Sign
from gradcodec.errors import CorruptPayload, InvalidInput

from .strategies import FAST, ctx, tensors


def blocks(v, block):
    """[blocks, block] float64 view, zero-padded, and the true length of each block."""
    v = v.reshape(-1).double()
    n = v.numel()
    padded = torch.nn.functional.pad(v, (0, -n % block)).view(-1, block)
    lengths = torch.full((padded.shape[0],), block, dtype=torch.float64)
    if n % block:
        lengths[-1] = n % block
    return padded, lengths


@FAST
@given(tensors(), st.sampled_from([8, 16, 64, 256, 4096]))
def test_sign_preserves_signs_and_block_l1_norms(x, block):
    s = Sign(block)
    sections = s.encode(x.contiguous(), ctx())
    n = x.numel()
    assert [t.numel() for t in sections] == [math.ceil(n / 8), math.ceil(n / block)]
    y = s.decode(sections, tuple(x.shape))
    assert y.shape == x.shape and y.dtype == torch.float32
    xf, yf = x.reshape(-1).float(), y.reshape(-1)
    # the bit is 1 for x >= 0: decoded values have x's sign (exactly +-scale), never flipped
    assert bool(((yf >= 0) == (xf >= 0)).all())
    nz = xf != 0
    assert bool((torch.sign(yf[nz]) == torch.sign(xf[nz])).all())  # a block with a non-zero has a scale > 0
    # |x̂| is constant per block and its L1 norm is the block's
    xb, lengths = blocks(xf, block)
    yb, _ = blocks(yf, block)
    l1 = xb.abs().sum(1)
    assert torch.allclose(yb.abs().sum(1), l1, rtol=1e-5, atol=1e-30)
    # the documented error identity ||v - v̂||² = ||v||² - ||v||_1² / d, and so a contraction
    err = (xb - yb).square().sum(1)
    expect = xb.square().sum(1) - l1.square() / lengths
    assert torch.allclose(err, expect, rtol=1e-4, atol=1e-6 * float(xb.square().sum()) + 1e-30)
    assert bool((err <= xb.square().sum(1) * (1 - 1 / lengths) * (1 + 1e-5) + 1e-30).all())


@FAST
@given(tensors())
def test_sign_public_api_roundtrip(x):
    blob = gc.encode({"t": x}, "sign:block=64")
    y = gc.decode(blob)["t"]
    assert y.shape == x.shape and y.dtype == x.dtype
    assert bool(((y >= 0) == (x >= 0)).all())


def test_sign_default_block_and_bits_per_element():
    codec = gc.get_codec("sign")
    assert codec.spec == "sign:block=256"
    n = 1 << 16
    info = gc.inspect(gc.encode(torch.randn(n), "sign"))
    assert info.tensors[0].payload_bytes == n // 8 + 4 * (n // 256)  # 1.125 bits per element
    for bad in ("sign:block=3", "sign:block=100", "sign:block=8192"):
        with pytest.raises(InvalidInput):
            gc.get_codec(bad)


def test_sign_relative_error_documented():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 18, generator=g)
    y = gc.decode(gc.encode(x, "sign"))
    rel = float((x - y).norm() / x.norm())
    assert rel == pytest.approx(math.sqrt(1 - 2 / math.pi), abs=0.01)  # 0.60 on a Gaussian


def test_sign_is_biased():
    """Deterministic and biased: an outlier is shrunk to the block mean, the small values inflated."""
    x = torch.tensor([10.0, 0.1, 0.1, 0.1, -0.1, 0.1, 0.1, 0.1])
    y = gc.decode(gc.encode(x, "sign:block=8", seed=1))
    assert torch.equal(y, gc.decode(gc.encode(x, "sign:block=8", seed=2)))  # no randomness to average out
    assert torch.allclose(y.abs(), torch.full((8,), 10.7 / 8))
    assert float(y[0]) < 2 and float(y[1]) > 1


def test_sign_error_feedback_accumulates():
    g = torch.Generator().manual_seed(0)
    ef = gc.get_codec("sign", error_feedback=True)
    total = torch.zeros(3000, dtype=torch.float64)
    sent = torch.zeros(3000, dtype=torch.float64)
    drift = torch.randn(3000, generator=g) * 0.1
    norms = []
    for _ in range(100):
        x = drift + torch.randn(3000, generator=g)
        y = ef.decode(ef.encode(x))
        total += x.double()
        sent += y.double()
        norms.append(float(ef.residuals[""].norm()))
        assert torch.allclose(total - sent, ef.residuals[""].double(), atol=1e-3)
    assert max(norms[50:]) <= 1.3 * max(norms[:50])
    assert float((total - sent).norm() / total.norm()) < 0.15


def test_sign_rejects_nonfinite_and_handles_float64():
    for bad in (float("nan"), float("inf")):
        x = torch.randn(100)
        x[17] = bad
        with pytest.raises(InvalidInput):
            gc.encode(x, "sign")
        with pytest.raises(InvalidInput):
            Sign(64).encode(x, ctx())
    with pytest.raises(InvalidInput):  # finite values whose block mean overflows fp32
        Sign(8).encode(torch.full((8,), 3e38), ctx())
    x = torch.randn(50, dtype=torch.float64)
    y = gc.decode(gc.encode(x, "sign:block=8"))
    assert y.dtype == torch.float64 and bool(((y >= 0) == (x >= 0)).all())


def test_sign_decode_hostile_sections():
    codec = gc.get_codec("sign:block=16")
    s = codec.root
    n = 101  # 13 bytes of bits, the last holding 5; 7 blocks
    good = s.encode(torch.randn(n, generator=torch.Generator().manual_seed(0)), ctx())
    s.decode(good, (n,))
    bits, scales = good
    padded = bits.clone()
    padded[-1] |= 0x80
    cases = [
        [bits[:-1], scales],  # truncated bits
        [torch.cat([bits, bits[:1]]), scales],  # too many bytes
        [bits.view(torch.int8), scales],  # wrong dtype
        [bits, scales[:-1]],  # a scale short
        [bits, scales.double()],
        [bits, scales.clone().fill_(-1.0)],  # negative scale
        [bits, torch.where(torch.arange(7) == 3, float("nan"), scales)],
        [bits, torch.where(torch.arange(7) == 0, float("inf"), scales)],
        [padded, scales],  # padding bits set
        [bits],
        [],
    ]
    for sections in cases:
        with pytest.raises(CorruptPayload):
            s.decode(sections, (n,))
    blob = wire.pack(wire.Message(codec.spec, [wire.TensorEntry("", torch.float32, (n,), [bits, -scales])], single=True))
    with pytest.raises(CorruptPayload):
        gc.decode(blob)
