"""The `budget` codec: never spends more than its budget, decodes from the bytes alone, and spends them
where they remove the most error."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradcodec
from gradcodec import metrics, wire
from gradcodec.errors import CorruptPayload, InvalidInput
from tests.strategies import FAST, tensors


@st.composite
def tensor_dicts(draw):
    """1..5 float tensors of any shape (empty and 0-d included) and scale, maybe an int tensor."""
    out = {}
    for i in range(draw(st.integers(1, 5))):
        scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 50.0]))
        out[f"layer.{i}.w"] = draw(tensors(max_numel=3000)) * scale
    if draw(st.booleans()):
        out["step"] = torch.tensor([draw(st.integers(0, 2**40))])
    return out


def lora_like(seed: int = 0, spread: float = 1.0) -> dict[str, torch.Tensor]:
    """A rank-8 LoRA-shaped update whose tensors' scales differ by a log-normal factor (std `spread`)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(6):
        for proj in ("q", "v"):
            scale = float(torch.exp(torch.randn((), generator=g) * spread))
            out[f"l{layer}.{proj}.lora_A"] = torch.randn(8, 512, generator=g) * scale * 0.02
            out[f"l{layer}.{proj}.lora_B"] = torch.randn(512, 8, generator=g) * scale * 1e-3
    return out


def rel_error(x, blob) -> float:
    return metrics.distortion(x, gradcodec.decode(blob))["rel_l2"]


@FAST
@given(x=tensor_dicts(), bpv=st.floats(0.05, 12), by_reference=st.booleans())
def test_payload_never_exceeds_the_budget(x, bpv, by_reference):
    codec = gradcodec.get_codec(f"budget:bpv={bpv!r}")
    budget = codec.budget_for(x)
    try:
        blob = codec.encode(x, by_reference=by_reference)
    except InvalidInput as e:
        assert "below" in str(e)  # only a budget smaller than the header itself is refused
        return
    assert len(blob) <= budget
    assert codec.last_spent.bytes == len(blob) == gradcodec.inspect(blob, layout=x).payload_bytes
    assert codec.last_spent.budget == budget


@FAST
@given(x=tensor_dicts(), size=st.integers(100, 40000))
def test_each_tensor_decodes_as_its_width_alone_would(x, size):
    """Decoding needs only the bytes, and tensor i comes back exactly as int<b_i> encodes it (zeros at b_i = 0)."""
    codec = gradcodec.get_codec(f"budget:bytes={size}")
    try:
        blob = codec.encode(x)
    except InvalidInput:
        return
    out = gradcodec.decode(blob)
    assert list(out) == list(x)
    for name, t in x.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        if not t.is_floating_point():
            assert torch.equal(out[name], t)
            continue
        bits = codec.last_spent.widths[name]
        alone = torch.zeros_like(t) if bits == 0 else gradcodec.decode(gradcodec.encode(t, f"int{bits}"))
        assert torch.equal(out[name], alone), (name, bits)


def test_widths_travel_in_the_shared_section():
    x = lora_like()
    codec = gradcodec.get_codec("budget:bpv=3")
    blob = codec.encode(x)
    msg = wire.unpack(blob)
    assert msg.codec == "budget:block=64"
    assert msg.shared[0].tolist() == list(codec.last_spent.widths.values())


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_beats_a_uniform_width_at_equal_bytes_when_scales_differ(bits):
    x = lora_like(spread=1.0)
    uniform = gradcodec.encode(x, f"int{bits}")
    blob = gradcodec.encode(x, f"budget:bytes={len(uniform)}")
    assert len(blob) <= len(uniform)
    assert rel_error(x, blob) < 0.5 * rel_error(x, uniform)


@pytest.mark.parametrize("bits", [2, 4])
def test_matches_a_uniform_width_when_tensors_are_alike(bits):
    g = torch.Generator().manual_seed(0)
    x = {f"t{i}": torch.randn(4096, generator=g) for i in range(8)}
    uniform = gradcodec.encode(x, f"int{bits}")
    # the same widths in a budget payload: int<bits>'s bytes plus the width table (a byte per tensor)
    same_widths = len(gradcodec.encode(x, f"budget:bytes={len(uniform) + 64}"))
    assert same_widths <= len(uniform) + 24
    blob = gradcodec.encode(x, f"budget:bytes={same_widths}")
    assert rel_error(x, blob) <= 1.02 * rel_error(x, uniform)


def test_more_bytes_give_less_error():
    x = lora_like(seed=3)
    errors = [rel_error(x, gradcodec.encode(x, f"budget:bpv={bpv}")) for bpv in (0.5, 1, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01


def test_zero_tensors_are_not_sent():
    x = {"a": torch.randn(1000), "zero": torch.zeros(1000)}
    codec = gradcodec.get_codec("budget:bpv=4")
    out = gradcodec.decode(codec.encode(x))
    assert codec.last_spent.widths["zero"] == 0 and torch.equal(out["zero"], x["zero"])
    assert codec.last_spent.widths["a"] > 0


def test_error_feedback_sends_withheld_tensors_later():
    x = {"big": torch.randn(4096), "small": torch.randn(4096) * 1e-3}
    codec = gradcodec.get_codec("budget:bpv=1.2", error_feedback=True, seed=0)
    total = {k: torch.zeros_like(v) for k, v in x.items()}
    widths = []
    for _ in range(40):
        for k, v in codec.decode(codec.encode(x)).items():
            total[k] += v
        widths.append(codec.codec.last_spent.widths["small"])
    assert widths[0] == 0 and max(widths) > 0  # withheld at first, sent once its residual has grown
    for k in x:
        assert torch.allclose(total[k] + codec.residuals[k], 40 * x[k], atol=1e-4)


def test_budget_below_the_header_is_refused():
    x = {f"layer.{i}": torch.randn(10) for i in range(20)}
    with pytest.raises(InvalidInput, match="below the .* bytes this payload needs"):
        gradcodec.encode(x, "budget:bytes=100")


@pytest.mark.parametrize("spec, match", [
    ("budget:bpv=1,bytes=100", "not both"),
    ("budget:bpv=0", "positive"),
    ("budget:bytes=-5", "positive"),
    ("budget:bpv=1|zstd", "byte stage"),
    ("budget:bpv=1,block=48", "power of two"),
])
def test_invalid_parameters_are_refused(spec, match):
    with pytest.raises(InvalidInput, match=match):
        gradcodec.get_codec(spec)


def test_encoding_needs_a_budget():
    with pytest.raises(InvalidInput, match="bpv= or bytes="):
        gradcodec.get_codec("budget").encode(torch.randn(10))


def _message(widths, sections_of_a, shared_count=1):
    entries = [wire.TensorEntry("a", torch.float32, (100,), sections_of_a)]
    shared = [torch.tensor(widths, dtype=torch.uint8)] * shared_count
    return wire.pack(wire.Message("budget:block=64", entries, shared))


def test_decode_refuses_corrupt_widths_and_sections():
    good = gradcodec.encode({"a": torch.randn(100)}, "int3")
    codes, scales = wire.unpack(good).tensors[0].sections
    empty = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.float32)]
    assert gradcodec.decode(_message([3], [codes, scales]))["a"].shape == (100,)
    with pytest.raises(CorruptPayload, match="widths must be 0..8"):
        gradcodec.decode(_message([9], [codes, scales]))
    with pytest.raises(CorruptPayload, match="section 0"):
        gradcodec.decode(_message([4], [codes, scales]))  # int3's codes are too short for int4
    with pytest.raises(CorruptPayload, match="not sent .* carries data"):
        gradcodec.decode(_message([0], [codes, scales]))
    with pytest.raises(CorruptPayload, match="shared sections"):
        gradcodec.decode(_message([3], [codes, scales], shared_count=2))
    with pytest.raises(CorruptPayload, match="expects 2"):
        gradcodec.decode(_message([0], empty[:1]))
    bad = scales.clone()
    bad[0] = float("nan")
    with pytest.raises(CorruptPayload, match="scales"):
        gradcodec.decode(_message([3], [codes, bad]))
