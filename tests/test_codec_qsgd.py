"""QSGD: code widths, per-element bound, unbiasedness and the paper's variance bound, hostile payloads."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradcodec as gc
from gradcodec import kernels, wire
from gradcodec.codecs import qsgd as qsgd_module
from gradcodec.codecs.qsgd import QSGD
from gradcodec.errors import CorruptPayload, InvalidInput

from .strategies import FAST, STAT, ctx, tensors


def per_element(x, norms, s, bucket):
    """float64 (r = |x| / norm · s, norm) per element, from the norms the payload carries."""
    xf = x.reshape(-1).double()
    norm = norms.double().repeat_interleave(bucket)[: xf.numel()]
    r = torch.where(norm > 0, xf.abs() / torch.where(norm > 0, norm, 1) * s, 0)
    return r, norm


def exact_variances(x, norms, s, bucket):
    """Var[x̂_i] = (norm/s)² f (1 - f), f = frac(r_i): the codec's exact per-element variance."""
    r, norm = per_element(x, norms, s, bucket)
    f = r - r.floor()
    return (norm / s).square() * f * (1 - f)


@pytest.mark.parametrize("levels,width", [(1, 2), (2, 3), (3, 3), (4, 4), (7, 4), (8, 5), (15, 5), (127, 8), (128, 9)])
def test_minimal_code_width(levels, width):
    s = QSGD(levels, 64)
    assert s.width == width == math.ceil(math.log2(2 * levels + 1))
    n = 1001
    codes, norms = s.encode(torch.randn(n), ctx())
    assert codes.numel() == kernels.packed_bits_size(n, width) and norms.numel() == math.ceil(n / 64)


def test_defaults_and_bits_per_element():
    assert gc.get_codec("qsgd").spec == "qsgd:levels=7,bucket=128"
    n = 1 << 16
    info = gc.inspect(gc.encode(torch.randn(n), "qsgd"))
    assert info.tensors[0].payload_bytes == n * 4 // 8 + 4 * (n // 128)  # 4.25 bits per element
    for bad in ("qsgd:levels=0", "qsgd:levels=40000", "qsgd:bucket=100", "qsgd:bucket=4"):
        with pytest.raises(InvalidInput):
            gc.get_codec(bad)


@FAST
@given(tensors(), st.sampled_from([1, 3, 7, 100]), st.sampled_from([8, 64, 128]))
def test_qsgd_levels_are_the_two_neighbours(x, s, bucket):
    """Each x̂_i is ±norm·l/s with l = floor(r_i) or ceil(r_i): |x̂_i - x_i| <= norm/s, sign kept or zero."""
    st_ = QSGD(s, bucket)
    sections = st_.encode(x.contiguous(), ctx())
    y = st_.decode(sections, tuple(x.shape))
    assert y.shape == x.shape and y.dtype == torch.float32
    norms = sections[1]
    xf = x.reshape(-1).double()
    r, norm = per_element(x, norms, s, bucket)
    # norms are the buckets' L2 norms (fp32)
    padded = torch.nn.functional.pad(xf, (0, -xf.numel() % bucket)).view(-1, bucket)
    assert torch.allclose(norms.double(), padded.norm(dim=1), rtol=1e-6)
    yf = y.reshape(-1).double()
    level = yf.abs() / torch.where(norm > 0, norm, 1) * s
    assert torch.allclose(level, level.round(), atol=1e-4)
    tol = 1e-5 * (r + 1)
    assert bool(((level >= r.floor() - tol) & (level <= r.ceil() + tol)).all())
    assert bool(((yf - xf).abs() <= norm / s * (1 + 1e-5) + 1e-30).all())
    assert bool(((torch.sign(yf) == torch.sign(xf)) | (yf == 0)).all())
    z = gc.decode(gc.encode(x, f"qsgd:levels={s},bucket={bucket}", seed=3))
    assert z.shape == x.shape and z.dtype == x.dtype


def samples(x, s, bucket, seeds):
    st_ = QSGD(s, bucket)
    out = []
    for seed in seeds:
        sections = st_.encode(x, ctx(seed))
        out.append(st_.decode(sections, tuple(x.shape)).double().reshape(-1))
    return torch.stack(out), sections[1]


def check_unbiased(mean_samples, T, x, var):
    """Statistical check that E[x̂] = x, given T i.i.d. samples' mean and the exact variances `var`.

    ||mean - x||² has expectation sum(var) / T: allow 9x that (a 3-sigma deviation for a single
    element). The projection <mean, x>/||x||² estimates 1 with standard deviation
    sqrt(sum(x² var) / T) / ||x||²: allow 4 sigma. Slack of 1e-6 relative covers fp32 rounding.
    """
    x = x.double().reshape(-1)
    nx2 = float(x.square().sum())
    err = float((mean_samples - x).square().sum())
    proj = float((mean_samples * x).sum()) / nx2
    ok_err = err <= 9 * float(var.sum()) / T + 1e-10 * nx2
    ok_proj = abs(proj - 1) <= 4 * math.sqrt(float((x.square() * var).sum()) / T) / nx2 + 1e-6
    return ok_err and ok_proj


@STAT
@given(tensors(max_numel=400), st.sampled_from([1, 2, 7]), st.sampled_from([8, 128]))
def test_qsgd_is_unbiased(x, s, bucket):
    if x.numel() == 0 or float(x.abs().sum()) == 0:
        return
    T = 300
    smp, norms = samples(x.contiguous(), s, bucket, range(T))
    var = exact_variances(x, norms, s, bucket)
    assert check_unbiased(smp.mean(0), T, x, var)


def test_qsgd_unbiasedness_check_detects_bias():
    """The check passes for QSGD and fails for nearest rounding and for a 2% scale error."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    s, bucket, T = 3, 128, 200
    smp, norms = samples(x, s, bucket, range(T))
    var = exact_variances(x, norms, s, bucket)
    mean = smp.mean(0)
    assert check_unbiased(mean, T, x, var)
    for factor in (0.98, 1.02):
        assert not check_unbiased(mean * factor, T, x, var)
    r, norm = per_element(x, norms, s, bucket)
    nearest = torch.sign(x.double()) * r.round() * norm / s  # deterministic rounding: biased
    assert not check_unbiased(nearest, T, x, var)


def test_qsgd_variance_matches_and_is_within_the_paper_bound():
    g = torch.Generator().manual_seed(2)
    n = 4096
    gauss = torch.randn(n, generator=g)
    heavy = torch.randn(n, generator=g) / (torch.rand(n, generator=g) + 0.01)
    for name, x in [("gauss", gauss), ("heavy", heavy)]:
        for s, bucket in [(1, 64), (7, 128), (15, 512)]:
            smp, norms = samples(x, s, bucket, range(40))
            mse = float((smp - x.double()).square().sum(1).mean())
            var = exact_variances(x, norms, s, bucket)
            assert mse == pytest.approx(float(var.sum()), rel=0.15), (name, s, bucket)
            # Lemma 3.1: E||Q(v) - v||² <= min(d/s², sqrt(d)/s) ||v||², per bucket and so in total
            per_bucket = var.view(-1, bucket).sum(1)
            bound = min(bucket / s**2, math.sqrt(bucket) / s) * norms.double().square()
            assert bool((per_bucket <= bound * (1 + 1e-6)).all())
            assert bool((per_bucket <= bucket / (4 * s**2) * norms.double().square() * (1 + 1e-6)).all())


def test_qsgd_result_independent_of_chunking(monkeypatch):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    s = QSGD(7, 16)
    big = s.encode(x, ctx(4))
    monkeypatch.setattr(qsgd_module, "CHUNK", 64)
    small = s.encode(x, ctx(4))
    assert all(torch.equal(a, b) for a, b in zip(big, small))
    assert torch.equal(s.decode(big, (5000,)), s.decode(small, (5000,)))


def test_qsgd_rejects_nonfinite_and_overflow():
    x = torch.randn(300)
    x[5] = float("nan")
    with pytest.raises(InvalidInput):
        gc.encode(x, "qsgd")
    with pytest.raises(InvalidInput):
        QSGD(7, 128).encode(torch.full((128,), float("inf")), ctx())
    with pytest.raises(InvalidInput):  # finite, but the bucket's L2 norm exceeds fp32
        QSGD(7, 128).encode(torch.full((128,), 3e38), ctx())
    y = gc.decode(gc.encode(torch.full((128,), 1e30), "qsgd", seed=0))  # large but representable: fine
    assert bool(torch.isfinite(y).all()) and float(y.double().mean()) == pytest.approx(1e30, rel=0.3)


def test_qsgd_zero_and_tiny_buckets():
    x = torch.zeros(300)
    x[200] = 1e-40  # subnormal
    y = gc.decode(gc.encode(x, "qsgd"))
    assert bool((y[:128] == 0).all()) and bool(torch.isfinite(y).all())


def test_qsgd_decode_hostile_sections():
    codec = gc.get_codec("qsgd:levels=5,bucket=16")  # 4-bit codes 0..10: 11..15 are invalid
    s = codec.root
    n = 101  # odd: the last code byte holds 4 padding bits
    good = s.encode(torch.randn(n, generator=torch.Generator().manual_seed(0)), ctx())
    s.decode(good, (n,))
    codes, norms = good
    bad_code = codes.clone()
    bad_code[3] = (int(bad_code[3]) & 0xF0) | 0xF  # code 15 > 2s
    padded = codes.clone()
    padded[-1] |= 0xF0
    cases = [
        [bad_code, norms],
        [padded, norms],
        [codes[:-1], norms],  # truncated
        [torch.cat([codes, codes[:1]]), norms],
        [codes.view(torch.int8), norms],
        [codes, norms[:-1]],
        [codes, norms.half()],
        [codes, -norms],
        [codes, torch.where(torch.arange(norms.numel()) == 2, float("nan"), norms)],
        [codes, torch.where(torch.arange(norms.numel()) == 0, float("inf"), norms)],
        [codes],
        [],
    ]
    for sections in cases:
        with pytest.raises(CorruptPayload):
            s.decode(sections, (n,))
    blob = wire.pack(wire.Message(codec.spec, [wire.TensorEntry("", torch.float32, (n,), [bad_code, norms])], single=True))
    with pytest.raises(CorruptPayload):
        gc.decode(blob)
