"""PowerSGD: exactness on low rank, approach to the SVD optimum, warm start and its state, hostile payloads."""
import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradcodec as gc
from gradcodec import wire
from gradcodec.codecs.lowrank import PowerSGD
from gradcodec.errors import CorruptPayload, InvalidInput
from gradcodec.registry import build

from .strategies import DTYPES, FAST, ctx


def stage(spec):
    kind, root, _ = build(spec)
    assert kind == "pipeline"
    return root


def roundtrip(s, x, seed=0, name="w"):
    return s.decode(s.encode(x.contiguous(), ctx(seed, name)), tuple(x.shape))


def spectrum_matrix(rows, cols, sigmas, seed=0):
    """U diag(sigmas) Vᵀ with random orthonormal U, V (float64), and its singular values."""
    g = torch.Generator().manual_seed(seed)
    k = len(sigmas)
    u = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64)).Q
    return u @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ v.T


def best_error(m, r):
    """Eckart–Young: the smallest ||M - M_r||_F over rank-r M_r, from torch.linalg.svd."""
    s = torch.linalg.svdvals(m.double())
    return float(s[r:].square().sum().sqrt())


# ---------------------------------------------------------------------------------- shapes, passthrough


@pytest.mark.parametrize(
    "shape,factored",
    [((), False), ((7,), False), ((0, 5), False), ((5, 0), False), ((3, 3), False), ((8, 8), False),
     ((9, 9), True), ((100, 50), True), ((10, 3, 4), True), ((2, 1000), False), ((4, 0, 3), False)],
)
def test_passthrough_rule_and_section_count(shape, factored):
    s = PowerSGD(stage("raw"), rank=4)
    assert (s.matrix_shape(shape) is not None) == factored
    rows = shape[0] if shape else 1
    if factored:
        assert 4 * (rows + math.prod(shape[1:])) < math.prod(shape)
    x = torch.randn(shape)
    sections = s.encode(x, ctx())
    assert len(sections) == s.n_sections(shape) == (2 if factored else 1)
    y = s.decode(sections, shape)
    assert y.shape == x.shape
    if not factored:
        assert torch.equal(y, x)  # handed to raw unchanged: bit-exact
    else:
        assert [t.numel() for t in sections] == [shape[0] * 4, math.prod(shape[1:]) * 4]


def test_wire_params_only_rank():
    assert gc.get_codec("powersgd:rank=2,iterations=3,warm_start=false|int8").spec == "powersgd:rank=2|int8:block=64"
    for bad in ("powersgd:rank=0", "powersgd:iterations=0", "powersgd:rank=-1"):
        with pytest.raises(InvalidInput):
            gc.get_codec(bad)


# --------------------------------------------------------------------------------------- exactness


@st.composite
def low_rank_tensors(draw):
    """A tensor of rank <= r when viewed as [shape[0], rest], maybe 3-D, maybe non-contiguous."""
    r = draw(st.integers(1, 4))
    true_rank = draw(st.integers(0, r))
    rows = draw(st.integers(2 * r + 1, 60))
    tail = draw(st.sampled_from([[], [1], [3], [2, 2]]))
    cols = draw(st.integers(2 * r + 1, 50))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-6, 1.0, 1e4]))
    a = torch.randn(rows, true_rank, generator=g)
    b = torch.randn(true_rank, cols * math.prod(tail), generator=g)
    m = (a @ b * scale).reshape([rows, cols] + tail)
    if draw(st.booleans()):  # non-contiguous: every other element of a larger tensor
        big = torch.zeros(list(m.shape) + [2])
        big[..., 0] = m
        m = big[..., 0]
        assert not m.is_contiguous()
    return m, r


@FAST
@given(low_rank_tensors(), st.sampled_from([2, 3]), st.booleans(), st.integers(0, 2**31 - 1))
def test_exact_on_rank_at_most_r(case, iterations, warm, seed):
    """x̂ = M up to fp32 rounding when rank(M) <= r (from the second iteration on: see the next test)."""
    m, r = case
    s = PowerSGD(stage("raw"), rank=r, iterations=iterations, warm_start=warm)
    assert s.matrix_shape(tuple(m.shape)) is not None
    y = roundtrip(s, m, seed)
    assert y.dtype == torch.float32 and y.shape == m.shape
    assert float((y - m).norm()) <= 1e-5 * float(m.norm()) + 1e-30
    z = gc.decode(gc.encode({"w": m}, f"powersgd:rank={r},iterations=2", seed=seed))["w"]  # the public API
    assert float((z - m).norm()) <= 1e-5 * float(m.norm()) + 1e-30


def test_exact_on_rank_r_with_one_iteration():
    """One iteration (the default): exact up to fp32 rounding times the condition number of M Q for
    the random Q, which is heavy-tailed when rank(M) = r; fixed seeds, so deterministic."""
    errs = []
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(30, 4, generator=g) @ torch.randn(4, 20, generator=g)
        y = roundtrip(PowerSGD(stage("raw"), rank=4), m, seed)
        errs.append(float((y - m).norm() / m.norm()))
    errs = torch.tensor(errs)
    assert float(errs.median()) < 1e-6
    assert float((errs > 1e-5).double().mean()) < 0.05
    assert float(errs.max()) < 1e-2
    # warm start: the next round on the same matrix is the second iteration, exact again
    s = PowerSGD(stage("raw"), rank=4)
    worst = int(errs.argmax())
    g = torch.Generator().manual_seed(worst)
    m = torch.randn(30, 4, generator=g) @ torch.randn(4, 20, generator=g)
    roundtrip(s, m, worst)
    assert float((roundtrip(s, m, worst) - m).norm() / m.norm()) < 1e-5


@FAST
@given(st.integers(9, 40), st.integers(9, 40), st.sampled_from(DTYPES), st.booleans(), st.integers(0, 2**31 - 1))
def test_any_dtype_contraction_and_near_optimal(rows, cols, dtype, transposed, seed):
    """fp16/bf16/fp32 inputs, computed in fp32: a projection (||M - x̂|| <= ||M||), near the SVD error."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(cols, rows, generator=g).to(dtype).T if transposed else torch.randn(rows, cols, generator=g).to(dtype)
    s = PowerSGD(stage("raw"), rank=2, iterations=4)
    y = roundtrip(s, m)
    mf = m.float()
    err = float((y - mf).norm())
    assert err <= float(mf.norm()) * (1 + 1e-5)
    assert err >= best_error(mf, 2) * (1 - 1e-4)
    out = gc.decode(gc.encode({"w": m}, "powersgd:rank=2"))["w"]
    assert out.dtype == dtype and out.shape == m.shape


# ----------------------------------------------------------------------------------- vs the SVD optimum


def errors_by_iterations(m, r, its, seed=0):
    out = []
    for it in its:
        s = PowerSGD(stage("raw"), rank=r, iterations=it, warm_start=False)
        out.append(float((roundtrip(s, m.float(), seed) - m).norm()))
    return out


def test_error_approaches_best_rank_r_as_iterations_grow():
    r = 4
    m = spectrum_matrix(120, 80, [0.8**i for i in range(80)])
    best = best_error(m, r)
    its = [1, 2, 4, 8, 16, 32]
    errs = errors_by_iterations(m, r, its)
    assert errs[0] > 1.02 * best  # one iteration from a random start is visibly suboptimal here
    for e in errs:
        assert e >= best * (1 - 1e-5)  # never better than Eckart–Young
    for a, b in zip(errs, errs[1:]):
        assert b <= a * (1 + 1e-4)  # more iterations never hurt (same start)
    assert errs[-1] <= best * (1 + 1e-4)
    # a random Gaussian matrix (small spectral gaps): slower, but still approaching the optimum
    g = torch.Generator().manual_seed(1)
    m = torch.randn(100, 70, generator=g, dtype=torch.float64)
    best = best_error(m, r)
    errs = errors_by_iterations(m, r, [1, 4, 32])
    assert errs[0] > errs[1] > errs[2] >= best * (1 - 1e-5)
    assert errs[2] <= best * 1.01


def test_warm_start_improves_across_calls():
    """On a slowly changing matrix each warm-started call is one more power iteration."""
    r = 4
    base = spectrum_matrix(150, 100, [0.9**i for i in range(100)], seed=2)
    g = torch.Generator().manual_seed(3)
    warm = gc.get_codec(f"powersgd:rank={r}", seed=0)
    cold = gc.get_codec(f"powersgd:rank={r},warm_start=false", seed=0)
    excess_warm, excess_cold = [], []
    for t in range(12):
        m = (base + 0.002 * torch.randn(150, 100, generator=g, dtype=torch.float64)).float()
        best = best_error(m, r)
        excess_warm.append(float((warm.decode(warm.encode(m)) - m).norm()) / best - 1)
        excess_cold.append(float((cold.decode(cold.encode(m)) - m).norm()) / best - 1)
    assert excess_warm[-1] < 0.2 * excess_warm[0]
    assert excess_warm[-1] < 0.2 * min(excess_cold)
    assert max(excess_cold) > 0.05  # without warm start a single iteration stays visibly suboptimal


# ------------------------------------------------------------------------------------------ state


def test_state_dict_roundtrip_and_decoder_needs_no_state():
    g = torch.Generator().manual_seed(0)
    named = {
        "a.weight": torch.randn(64, 48, generator=g),
        "b.weight": torch.randn(40, 3, 10, generator=g),
        "bias": torch.randn(64, generator=g),
    }
    a = gc.get_codec("powersgd:rank=3|fp16", seed=1)
    for _ in range(3):
        a.encode({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in named.items()})
    state = a.state_dict()
    assert sorted(state) == ["0.a.weight", "0.b.weight"]  # keyed by tensor name; 1-D passes through
    assert state["0.a.weight"].shape == (48, 3) and state["0.b.weight"].shape == (30, 3)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = gc.get_codec("powersgd:rank=3|fp16", seed=99)
    b.load_state_dict(torch.load(buf))
    blob_a, blob_b = a.encode(named), b.encode(named)
    assert blob_a == blob_b  # same warm start, same payload
    fresh = gc.get_codec("powersgd:rank=3|fp16", seed=1)
    assert fresh.encode(named) != blob_a
    # decoding needs nothing but the payload
    out = gc.decode(blob_a)
    again = gc.get_codec("powersgd:rank=3|fp16").decode(blob_a)
    for k in named:
        assert torch.equal(out[k], again[k]) and out[k].shape == named[k].shape


def test_state_dict_through_error_feedback():
    g = torch.Generator().manual_seed(0)
    ef = gc.get_codec("powersgd:rank=2|int8", error_feedback=True, seed=0)
    x = torch.randn(30, 40, generator=g)
    ef.encode({"w": x})
    state = ef.state_dict()
    assert set(state) == {"residual.w", "codec.0.w"}
    other = gc.get_codec("powersgd:rank=2|int8", error_feedback=True, seed=5)
    buf = io.BytesIO()
    torch.save(state, buf)  # a copy, as after a restart (ErrorFeedback keeps the residuals it is given)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    assert ef.encode({"w": x}) == other.encode({"w": x})


def test_load_state_dict_validates():
    s = PowerSGD(stage("raw"), rank=2)
    for bad in ({"w": torch.zeros(5, 3)}, {"w": torch.zeros(5, 2, dtype=torch.float64)}, {"w": torch.zeros(10)},
                {"w": torch.full((5, 2), float("nan"))}, {"w": [[0.0, 0.0]]}):
        with pytest.raises(InvalidInput):
            s.load_state_dict(bad)
    cold = PowerSGD(stage("raw"), rank=2, warm_start=False)
    assert cold.state_dict() == {}
    with pytest.raises(InvalidInput):
        cold.load_state_dict({"w": torch.zeros(5, 2)})
    cold.load_state_dict({})
    codec = gc.get_codec("powersgd:rank=2")
    with pytest.raises(InvalidInput):
        codec.load_state_dict({"7.w": torch.zeros(5, 2)})


def test_warm_start_false_draws_q_from_the_seed():
    m = torch.randn(50, 40, generator=torch.Generator().manual_seed(0))
    s = PowerSGD(stage("raw"), rank=2, warm_start=False)
    first = s.encode(m, ctx(1))
    assert s.state_dict() == {}
    assert all(torch.equal(a, b) for a, b in zip(first, s.encode(m, ctx(1))))  # same seed, same factors
    assert not torch.equal(first[0], s.encode(m, ctx(2))[0])


def test_warm_start_recovers_from_a_zero_update():
    s = PowerSGD(stage("raw"), rank=2)
    s.encode(torch.zeros(30, 20), ctx(0))  # leaves Q = 0
    m = spectrum_matrix(30, 20, [3.0, 2.0]).float()
    assert float((roundtrip(s, m, 1) - m).norm()) <= 1e-4 * float(m.norm())


# -------------------------------------------------------------------------------------- pipelines


def test_pipeline_roundtrip_names_shapes_dtypes():
    g = torch.Generator().manual_seed(0)
    named = {
        "q_proj.lora_A": torch.randn(8, 256, generator=g),
        "q_proj.lora_B": torch.randn(256, 8, generator=g).bfloat16(),
        "mlp.weight": torch.randn(64, 2, 32, generator=g).half(),
        "bias": torch.randn(64, generator=g),
        "scalar": torch.tensor(1.5),
        "empty": torch.empty(0, 9),
        "strided": torch.randn(40, 60, generator=g).t(),
    }
    spec = "powersgd:rank=2|int8"
    blob = gc.encode(named, spec, seed=0)
    out = gc.decode(blob)
    assert list(out) == list(named)
    for k, v in named.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
    assert gc.inspect(blob).codec == "powersgd:rank=2|int8:block=64"
    assert gc.inspect(blob).ratio > 5


def test_error_feedback_accumulates():
    g = torch.Generator().manual_seed(0)
    ef = gc.get_codec("powersgd:rank=2|int8", error_feedback=True, seed=0)
    drift = torch.randn(48, 64, generator=g) * 0.1
    total = torch.zeros(48, 64, dtype=torch.float64)
    sent = torch.zeros(48, 64, dtype=torch.float64)
    norms = []
    T = 100
    for _ in range(T):
        x = drift + torch.randn(48, 64, generator=g)
        y = ef.decode(ef.encode({"w": x}))["w"]
        total += x.double()
        sent += y.double()
        assert torch.allclose(total - sent, ef.residuals["w"].double(), atol=1e-3)
        norms.append(float(ef.residuals["w"].norm()))
    assert max(norms[T // 2 :]) <= 1.3 * max(norms[: T // 2])
    assert float((total - sent).norm() / total.norm()) < 0.3


def test_encode_refuses_factor_overflow():
    with pytest.raises(InvalidInput, match="overflow"):
        # constant M: P's first column is 1/sqrt(20) everywhere, so Q = Mᵀ P = 3e38 · sqrt(20) > fp32 max
        gc.encode(torch.full((20, 20), 3e38), "powersgd:rank=2", seed=0)


# ---------------------------------------------------------------------------------------- hostile


def test_decode_hostile_sections():
    codec = gc.get_codec("powersgd:rank=2")
    s = codec.root
    m = torch.randn(20, 30, generator=torch.Generator().manual_seed(0))
    p, q = s.encode(m, ctx())
    s.decode([p, q], (20, 30))
    cases = [
        [p],  # Q missing
        [p, q, q],  # one too many
        [],
        [p[:-1], q],  # P short
        [p, torch.cat([q, q[:2]])],
        [p.clone().fill_(float("nan")), q],
        [p, torch.where(torch.arange(q.numel()) == 7, float("inf"), q)],
        [p.to(torch.int32), q],  # not floats
        [p.clone().fill_(1e20), q.clone().fill_(1e20)],  # finite factors whose product overflows
    ]
    for sections in cases:
        with pytest.raises(CorruptPayload):
            s.decode(sections, (20, 30))
    with pytest.raises(CorruptPayload):  # passthrough tensors: the inner's checks, count included
        s.decode([torch.randn(6)], (7,))
    with pytest.raises(CorruptPayload):
        s.decode([], (7,))
    with pytest.raises(CorruptPayload):
        stage("powersgd:rank=2|int8").decode([torch.zeros(40, dtype=torch.int8)], (20, 30))

    def payload(spec, sections):
        return wire.pack(wire.Message(spec, [wire.TensorEntry("", torch.float32, (20, 30), sections)], single=True))

    with pytest.raises(CorruptPayload):
        gc.decode(payload(codec.spec, [p.clone().fill_(float("nan")), q]))
    with pytest.raises(CorruptPayload):  # an invalid parameter in the payload's spec
        gc.decode(payload("powersgd:rank=0|raw", [p, q]))
    blob = payload("powersgd:rank=2|raw", [p, q])
    assert torch.equal(gc.decode(blob), s.decode([p, q], (20, 30)))
    blob = payload("powersgd:rank=3|raw", [p, q])  # factors of rank 2 under a spec of rank 3
    with pytest.raises(CorruptPayload):
        gc.decode(blob)
