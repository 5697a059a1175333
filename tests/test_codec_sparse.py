"""top-k (Elias–Fano indices) and stratified random-k: properties, sizes, unbiasedness, hostile payloads."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradcodec as gc
from gradcodec import kernels, wire
from gradcodec.codecs.sparse import (
    RandK,
    TopK,
    elias_fano_decode,
    elias_fano_encode,
    elias_fano_layout,
    kept_count,
    stratified_positions,
)
from gradcodec.errors import CorruptPayload, InvalidInput
from gradcodec.registry import build

from .strategies import FAST, STAT, ctx, tensors


def stage(spec):
    kind, root, _ = build(spec)
    assert kind == "pipeline"
    return root


def repack(codec, shape, sections, dtype=torch.float32):
    """A payload with a valid checksum around crafted sections (what a hostile client can send)."""
    return wire.pack(wire.Message(codec.spec, [wire.TensorEntry("", dtype, tuple(shape), list(sections))], single=True))


# ------------------------------------------------------------------------------------ kept count


def test_kept_count_rounding():
    assert kept_count(0, 0.5, 0) == 0
    assert kept_count(1, 1e-9, 0) == 1  # at least one element of a non-empty tensor
    assert kept_count(30, 0.1, 0) == 3  # the decimal 0.1, not IEEE 0.1 * 30 = 3.0000000000000004
    assert kept_count(1000, 0.01, 0) == 10
    assert kept_count(1001, 0.01, 0) == 11  # ceil
    assert kept_count(7, 1.0, 0) == 7
    assert kept_count(100, 0.5, 3) == 3  # k overrides ratio
    assert kept_count(2, 0.5, 3) == 2  # never more than n
    for bad in ("topk:ratio=0", "topk:ratio=1.5", "topk:k=-1", "randk:ratio=-0.1"):
        with pytest.raises(InvalidInput):
            gc.get_codec(bad)


def test_wire_params_are_explicit():
    assert gc.get_codec("topk").spec == "topk:ratio=0.01,k=0|raw"
    assert gc.get_codec("topk:k=7|int8").spec == "topk:k=7|int8:block=64"
    assert gc.get_codec("randk:ratio=0.05|fp16").spec == "randk:ratio=0.05,k=0,unbiased=true|fp16"


# ------------------------------------------------------------------------------------ Elias–Fano


@st.composite
def index_sets(draw):
    n = draw(st.integers(1, 5000))
    k = draw(st.integers(0, n))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pick = draw(st.sampled_from(["random", "first", "last", "dense_tail"]))
    if pick == "random":
        idx = torch.randperm(n, generator=g)[:k]
    elif pick == "first":
        idx = torch.arange(k)
    elif pick == "last":
        idx = torch.arange(n - k, n)
    else:  # clustered: all in one high bucket where possible
        idx = torch.arange(n - k, n) if k < n else torch.arange(n)
        idx = idx[torch.randperm(k, generator=g)]
    return n, idx.sort().values


@FAST
@given(index_sets())
def test_elias_fano_roundtrips_any_sorted_index_set(case):
    n, idx = case
    k = idx.numel()
    low, high = elias_fano_encode(idx, n)
    L, low_bytes, unary_bits = elias_fano_layout(k, n)
    assert low.dtype == high.dtype == torch.uint8
    assert low.numel() == low_bytes == math.ceil(k * L / 8)
    assert high.numel() == math.ceil(unary_bits / 8)
    if k:
        assert 2**L <= n / k < 2 ** (L + 1)
        assert k * L + unary_bits <= k * (L + 3) + 1
    assert torch.equal(elias_fano_decode(low, high, k, n), idx)


@pytest.mark.parametrize("n", [1 << 20, 1 << 24])
def test_elias_fano_bytes_per_index_vs_int32(n):
    """Sizes at ratios 0.1, 0.01, 0.001 (documented in sparse.py): far below int32's 4 bytes."""
    documented = {0.1: 0.66, 0.01: 1.07, 0.001: 1.50}
    g = torch.Generator().manual_seed(0)
    for ratio, bound in documented.items():
        k = kept_count(n, ratio, 0)
        L, low_bytes, unary_bits = elias_fano_layout(k, n)
        per_index = (low_bytes + math.ceil(unary_bits / 8)) / k
        assert per_index <= bound + 0.005
        assert per_index < 4 / 2.5  # int32 indices: 4 bytes each
        entropy = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2) / 8 / k
        assert per_index <= entropy + 2.1 / 8  # within ~2 bits of log2(C(n, k)) / k
        if n == 1 << 20:  # the layout is what the encoder really emits
            low, high = elias_fano_encode(torch.randperm(n, generator=g)[:k].sort().values, n)
            assert (low.numel(), high.numel()) == (low_bytes, math.ceil(unary_bits / 8))


def test_topk_payload_smaller_than_int32_indices():
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1))
    for ratio in (0.1, 0.01, 0.001):
        blob = gc.encode(x, f"topk:ratio={ratio}")
        k = kept_count(x.numel(), ratio, 0)
        index_bytes = len(blob) - 4 * k  # all but the fp32 values (includes the ~100-byte header)
        assert index_bytes < 0.4 * (4 * k) + 128  # int32 indices would take 4 bytes each
        assert len(blob) <= k * (4 + {0.1: 0.66, 0.01: 1.07, 0.001: 1.50}[ratio]) + 200


# ------------------------------------------------------------------------------------------ top-k


def topk_reference_check(x, y, k):
    """y keeps exactly k entries of x (the k largest magnitudes, ties either way) and zeroes the rest."""
    xf, yf = x.reshape(-1).double(), y.reshape(-1).double()
    assert bool(((yf == xf) | (yf == 0)).all())
    mx = xf.abs().sort(descending=True).values
    my = yf.abs().sort(descending=True).values
    assert torch.equal(my[:k], mx[:k])
    assert bool((my[k:] == 0).all())


@FAST
@given(tensors(), st.sampled_from([0.001, 0.01, 0.1, 0.37, 1.0]), st.sampled_from([0, 0, 1, 5, 10**6]))
def test_topk_keeps_exactly_the_k_largest(x, ratio, k):
    s = TopK(stage("raw"), ratio=ratio, k=k)
    n = x.numel()
    kk = kept_count(n, ratio, k)
    sections = s.encode(x.contiguous(), ctx())
    assert len(sections) == s.n_sections(tuple(x.shape))
    idx = elias_fano_decode(sections[0], sections[1], kk, n)
    assert idx.numel() == kk
    y = s.decode(sections, tuple(x.shape))
    assert y.dtype == x.dtype and y.shape == x.shape
    topk_reference_check(x, y, kk)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    assert torch.equal(y.reshape(-1)[mask], x.reshape(-1)[mask])  # raw values: bit-exact
    # the public API: same result, dtype and shape restored
    z = gc.decode(gc.encode(x, f"topk:ratio={ratio},k={k}"))
    assert z.dtype == x.dtype and z.shape == x.shape
    topk_reference_check(x, z, kk)


@FAST
@given(tensors(dtypes=[torch.float32]))
def test_topk_int8_values_within_int8_bound(x):
    s = stage("topk:ratio=0.2|int8:block=8")
    sections = s.encode(x.contiguous(), ctx())
    y = s.decode(sections, tuple(x.shape)).reshape(-1)
    n = x.numel()
    k = kept_count(n, 0.2, 0)
    idx = elias_fano_decode(sections[0], sections[1], k, n)
    vals = x.reshape(-1)[idx]
    scale = torch.nn.functional.pad(vals.abs(), (0, -k % 8)).view(-1, 8).amax(1).repeat_interleave(8)[:k] / 127
    assert bool(((y[idx] - vals).abs() <= scale / 2 * (1 + 1e-5) + 1e-30).all())
    off = torch.ones(n, dtype=torch.bool)
    off[idx] = False
    assert bool((y[off] == 0).all())


def test_topk_edge_shapes():
    for shape in [(), (0,), (3, 0, 2), (1,), (5, 1)]:
        x = torch.randn(shape)
        y = gc.decode(gc.encode(x, "topk:ratio=0.5"))
        assert y.shape == x.shape
        topk_reference_check(x, y, kept_count(x.numel(), 0.5, 0))


# ----------------------------------------------------------------------------------------- random-k


def test_stratified_positions_one_per_chunk_and_deterministic():
    for n, c in [(1, 1), (10, 3), (1000, 7), (4096, 64), (12345, 1000)]:
        pos, valid = stratified_positions(123, n, c)
        m = -(-n // c)
        assert pos.numel() == m
        assert torch.equal(pos // c, torch.arange(m))  # exactly one position per chunk
        assert torch.equal(valid, pos < n)
        assert bool(valid[:-1].all())  # only the last, short chunk may drop its position
        pos2, _ = stratified_positions(123, n, c)
        assert torch.equal(pos, pos2)


def test_stratified_offsets_uniform():
    """Each offset in [0, c) equally likely (chi-square over 60 000 draws, c = 12, fixed seeds)."""
    c, draws = 12, 60000
    pos, _ = stratified_positions(7, c * draws, c)
    counts = torch.bincount(pos % c, minlength=c).double()
    chi2 = float(((counts - draws / c) ** 2 / (draws / c)).sum())
    assert chi2 < 31.3  # the 0.1% quantile of chi-square with 11 degrees of freedom
    # inclusion probability exactly 1/c also in a short last chunk: positions >= n are dropped
    n = 10 * c + 5
    hits = torch.zeros(n)
    for seed in range(1000):
        p, v = stratified_positions(seed, n, c)
        hits[p[v]] += 1
    freq = hits / 1000
    assert float((freq - 1 / c).abs().max()) < 4 * math.sqrt((1 / c) * (1 - 1 / c) / 1000) + 1e-3


def randk_samples(x, ratio, seeds, unbiased=True):
    s = RandK(stage("raw"), ratio=ratio, unbiased=unbiased)
    xs = x.contiguous()
    return torch.stack([s.decode(s.encode(xs, ctx(seed)), tuple(x.shape)).double() for seed in seeds])


def check_unbiased(samples, x, var_sum, var_proj):
    """Statistical check that E[samples] = x (T i.i.d. samples of an estimator of x, fixed seeds).

    ||mean - x||² has expectation var_sum / T: allow 9x that (for a single element, a 3-sigma
    deviation). The projection <mean, x>/||x||² estimates 1 with standard deviation
    sqrt(var_proj / T)/||x||²: allow 4 sigma. Both are deterministic given the seeds.
    """
    T = samples.shape[0]
    x = x.double().reshape(-1)
    mean = samples.reshape(T, -1).mean(0)
    nx2 = float(x.square().sum())
    err = float((mean - x).square().sum())
    proj = float((mean * x).sum()) / nx2
    return err <= 9 * var_sum / T + 1e-12 * nx2 and abs(proj - 1) <= 4 * math.sqrt(var_proj / T) / nx2 + 1e-6


@STAT
@given(tensors(max_numel=300), st.sampled_from([0.05, 0.2, 0.5, 1.0]))
def test_randk_is_unbiased(x, ratio):
    if x.numel() == 0 or float(x.abs().sum()) == 0:
        return
    n = x.numel()
    c = -(-n // kept_count(n, ratio, 0))
    T = 400
    samples = randk_samples(x, ratio, range(T))
    xd = x.double().reshape(-1)
    var_sum = (c - 1) * float(xd.square().sum())  # Var[x̂_i] = (c - 1) x_i²
    var_proj = (c - 1) * float(xd.pow(4).sum())  # >= Var <x̂, x> (same-chunk covariances are negative)
    assert check_unbiased(samples, x, var_sum, var_proj)


def test_randk_unbiasedness_check_detects_wrong_scaling():
    """The statistic above fails for an estimator scaled by 1 (unbiased=false), (c-1)/c or (c+1)/c."""
    x = torch.randn(4000, generator=torch.Generator().manual_seed(3))
    c, T = 4, 300
    xd = x.double()
    var_sum, var_proj = (c - 1) * float(xd.square().sum()), (c - 1) * float(xd.pow(4).sum())
    good = randk_samples(x, 1 / c, range(T))
    assert check_unbiased(good, x, var_sum, var_proj)
    assert not check_unbiased(randk_samples(x, 1 / c, range(T), unbiased=False), x, var_sum, var_proj)
    for factor in ((c - 1) / c, (c + 1) / c, 0.97, 1.03):
        assert not check_unbiased(good * factor, x, var_sum, var_proj)


def test_randk_variance_matches_documentation():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(4))
    for ratio in (0.1, 0.5):
        c = -(-5000 // kept_count(5000, ratio, 0))
        samples = randk_samples(x, ratio, range(200))
        mse = float((samples - x.double()).square().sum(1).mean())
        assert mse == pytest.approx((c - 1) * float(x.double().square().sum()), rel=0.1)
        biased = randk_samples(x, ratio, range(200), unbiased=False)
        mse_b = float((biased - x.double()).square().sum(1).mean())
        assert mse_b == pytest.approx((1 - 1 / c) * float(x.double().square().sum()), rel=0.05)


@FAST
@given(tensors(), st.sampled_from([0.01, 0.1, 0.5, 1.0]), st.booleans())
def test_randk_decodes_chosen_positions_only(x, ratio, unbiased):
    s = RandK(stage("raw"), ratio=ratio, unbiased=unbiased)
    sections = s.encode(x.contiguous(), ctx(5))
    assert len(sections) == s.n_sections(tuple(x.shape))
    assert sections[0].dtype == torch.int64 and sections[0].numel() == 1  # only a seed for the indices
    y = s.decode(sections, tuple(x.shape))
    assert y.shape == x.shape
    n = x.numel()
    c, m = s.layout(n)
    assert sections[1].numel() == m <= kept_count(n, ratio, 0)
    pos, valid = stratified_positions(int(sections[0]), n, c)
    kept = x.reshape(-1)[pos[valid]]
    scaled = unbiased and c > 1
    expect = torch.zeros(n, dtype=torch.float32 if scaled else x.dtype)
    expect[pos[valid]] = kept.float() * c if scaled else kept  # the decoder scales in fp32
    assert y.dtype == expect.dtype and torch.equal(y.reshape(-1), expect)
    z = gc.decode(gc.encode(x, f"randk:ratio={ratio},unbiased={str(unbiased).lower()}", seed=1))
    assert z.shape == x.shape and z.dtype == x.dtype


def test_randk_refuses_scaling_beyond_dtype_range():
    x = torch.full((4000,), 1000.0, dtype=torch.float16)
    with pytest.raises(InvalidInput, match="unbiased"):
        gc.encode(x, "randk:ratio=0.001")
    assert gc.decode(gc.encode(x, "randk:ratio=0.001,unbiased=false")).abs().max() == 1000


# ---------------------------------------------------------------------------------------- pipelines


PIPELINES = ["topk:ratio=0.01|int8|zstd", "randk:ratio=0.05|fp16"]


@pytest.mark.parametrize("spec", PIPELINES)
def test_pipeline_roundtrip_names_shapes_dtypes(spec):
    g = torch.Generator().manual_seed(0)
    named = {
        "layer.0.lora_A": torch.randn(8, 333, generator=g),
        "layer.0.lora_B": torch.randn(333, 8, generator=g).half(),
        "bias": torch.randn(77, generator=g).bfloat16(),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "strided": torch.randn(40, 60, generator=g).t(),
    }
    out = gc.decode(gc.encode(named, spec, seed=3))
    assert list(out) == list(named)
    for name, t in named.items():
        assert out[name].shape == t.shape and out[name].dtype == t.dtype, name
    info = gc.inspect(gc.encode(named, spec, seed=3))
    assert info.codec == gc.get_codec(spec).spec


@pytest.mark.parametrize("spec", PIPELINES + ["randk:ratio=0.05,unbiased=false|fp16", "topk:ratio=0.1|sign"])
def test_error_feedback_accumulates(spec):
    """Sum of decoded updates tracks the sum of inputs: the gap is the residual, and it stays bounded."""
    g = torch.Generator().manual_seed(0)
    ef = gc.get_codec(spec, error_feedback=True, seed=0)
    drift = torch.randn(48, 64, generator=g) * 0.1
    total = torch.zeros(48, 64, dtype=torch.float64)
    sent = torch.zeros(48, 64, dtype=torch.float64)
    norms = []
    T = 200
    for _ in range(T):
        x = drift + torch.randn(48, 64, generator=g)
        y = ef.decode(ef.encode({"w": x}))["w"]
        total += x.double()
        sent += y.double()
        r = ef.residuals["w"].double()
        assert torch.allclose(total - sent, r, atol=1e-3 * (1 + float(r.abs().max())))
        norms.append(float(r.norm()))
    assert max(norms[T // 2 :]) <= 1.3 * max(norms[: T // 2])  # bounded, not growing
    assert float((total - sent).norm() / total.norm()) < 0.3  # and so the relative gap shrinks like 1/T


def test_randk_unbiased_feedback_sends_unscaled_update():
    """Under error feedback the decoded update is plain random-k of x + r (no factor c)."""
    s = stage("randk:ratio=0.25")
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    r = torch.zeros(100)
    sections = s.encode_feedback(x, r, ctx(9))
    y = s.decode(sections, (100,))
    assert torch.allclose(y + r, x, atol=1e-6)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept], atol=1e-6) and bool((r[kept].abs() < 1e-6).all())


# ----------------------------------------------------------------------------------------- hostile


def topk_sections(n=1000, k=20, seed=0):
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    low, high = elias_fano_encode(idx, n)
    return idx, low, high


def set_bit(packed, bit, value=1):
    out = packed.clone()
    byte, off = divmod(bit, 8)
    out[byte] = (int(out[byte]) & ~(1 << off) & 0xFF) | (value << off)
    return out


def ef_bits(high, count):
    return [int(b) for b in ((high.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:count]]


def test_elias_fano_hostile():
    n, k = 1000, 20
    idx, low, high = topk_sections(n, k)
    L, _, U = elias_fano_layout(k, n)
    bits = ef_bits(high, U)
    last = max(i for i, b in enumerate(bits) if b)
    assert last != U - 1  # (true for this seed) so the case below moves it
    cases = {
        "too many ones": (low, set_bit(high, bits.index(0))),
        "too few ones": (low, set_bit(high, bits.index(1), 0)),
        "padding bit set": (low, set_bit(high, U)) if U % 8 else (set_bit(low, k * L), high),
        # the last one moved to the very last position: its high part exceeds (n - 1) >> L
        "index out of range": (low, set_bit(set_bit(high, last, 0), U - 1)),
        "truncated low bits": (low[:-1], high),
        "truncated high bits": (low, high[:-1]),
        "extra byte": (low, torch.cat([high, high[:1]])),
        "wrong dtype": (low.view(torch.int8), high),
    }
    for what, (lo, hi) in cases.items():
        with pytest.raises(CorruptPayload):
            elias_fano_decode(lo, hi, k, n)
    # indices 5, 6, 9 of 64: L = 4, so 5 and 6 share high part 0; their low bits swapped or equal
    _, hi = elias_fano_encode(torch.tensor([5, 6, 9]), 64)
    L3 = elias_fano_layout(3, 64)[0]
    for lows in ([6, 5, 9], [5, 5, 9]):
        with pytest.raises(CorruptPayload, match="increase"):
            elias_fano_decode(kernels.pack_bits(torch.tensor(lows) & ((1 << L3) - 1), L3), hi, 3, 64)


def test_topk_decode_hostile_sections():
    codec = gc.get_codec("topk:k=20")
    s = codec.root
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    good = s.encode(x, ctx())
    assert torch.equal(s.decode(good, (1000,)), gc.decode(gc.encode(x, "topk:k=20")))
    bad_values = [
        good[:2] + [good[2][:-1]],  # one value short
        good[:2] + [torch.cat([good[2], good[2][:1]])],  # one too many
        good[:2] + [good[2].clone().fill_(float("nan"))],  # non-finite values
        good[:2] + [good[2].clone().fill_(float("inf"))],
        good[:2] + [good[2].to(torch.int32)],  # not floats
        good[:2],  # values missing
        good[:1],
        [],
    ]
    for sections in bad_values:
        with pytest.raises(CorruptPayload):
            s.decode(sections, (1000,))
    # the same through the public API, behind a valid checksum
    blob = repack(codec, (1000,), good[:1] + [set_bit(good[1], ef_bits(good[1], 100).index(0))] + good[2:])
    with pytest.raises(CorruptPayload):
        gc.decode(blob)
    with pytest.raises(CorruptPayload):
        gc.decode(repack(codec, (1000,), good[:2] + [good[2][:5]]))


def test_randk_decode_hostile_sections():
    codec = gc.get_codec("randk:ratio=0.1|int8")
    s = codec.root
    x = torch.randn(999, generator=torch.Generator().manual_seed(0))
    good = s.encode(x, ctx())
    s.decode(good, (999,))
    cases = [
        [torch.tensor([-1])] + good[1:],  # seed out of range
        [torch.tensor([2**40])] + good[1:],
        [good[0].to(torch.int32)] + good[1:],  # seed with the wrong dtype
        [torch.tensor([1, 2])] + good[1:],  # two seeds
        good[:1] + [good[1][:-1], good[2]],  # int8 codes short
        good[:1] + [good[1], good[2].clone().fill_(float("nan"))],  # bad scales
        good[:1],
        [],
    ]
    for sections in cases:
        with pytest.raises(CorruptPayload):
            s.decode(sections, (999,))
    raw = stage("randk:ratio=0.1")
    good = raw.encode(x, ctx())
    for vals in (good[1].clone().fill_(float("inf")), good[1].clone().fill_(3e38), good[1][:-1], good[1].to(torch.int64)):
        with pytest.raises(CorruptPayload):
            raw.decode([good[0], vals], (999,))
    with pytest.raises(CorruptPayload):
        gc.decode(repack(gc.get_codec("randk:ratio=0.1"), (999,), [torch.tensor([-5]), good[1]]))


@pytest.mark.slow
def test_topk_16m_roundtrip():
    x = torch.randn(1 << 24, generator=torch.Generator().manual_seed(0))
    for ratio in (0.1, 0.001):
        blob = gc.encode(x, f"topk:ratio={ratio}")
        y = gc.decode(blob)
        topk_reference_check(x, y, kept_count(x.numel(), ratio, 0))


@pytest.mark.parametrize("dist", ["gaussian", "heavy", "few_nonzero", "ties"])
@pytest.mark.parametrize("ratio", [0.1, 0.01, 0.0001])
def test_sampled_selection_on_large_tensors_keeps_exactly_the_largest(dist, ratio):
    from gradcodec.codecs.sparse import SAMPLE, topk_indices

    g = torch.Generator().manual_seed(2)
    n = 8 * SAMPLE + 12345  # large enough for the sampled path
    x = {
        "gaussian": lambda: torch.randn(n, generator=g),
        "heavy": lambda: torch.randn(n, generator=g) / torch.rand(n, generator=g) ** 2,
        "few_nonzero": lambda: torch.zeros(n).index_fill_(0, torch.randint(0, n, (50,), generator=g), 3.0),
        "ties": lambda: torch.randint(-3, 4, (n,), generator=g).float(),
    }[dist]()
    k = max(1, int(ratio * n))
    idx = topk_indices(x, k)
    assert idx.numel() == k and bool((idx[1:] > idx[:-1]).all())
    kept = torch.zeros(n, dtype=torch.bool)
    kept[idx] = True
    assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())
