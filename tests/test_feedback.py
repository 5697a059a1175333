"""ErrorFeedback: what an encode loses is carried to the next, and the state can be saved."""
import pytest
import torch

import gradcodec
from gradcodec.errors import InvalidInput

LOSSY = ["int8", "int4", "int4:stochastic=true", "topk:ratio=0.05|fp16", "sign", "powersgd:rank=1"]


@pytest.mark.parametrize("spec", LOSSY)
def test_residual_is_exactly_what_the_decoder_missed(spec):
    g = torch.Generator().manual_seed(0)
    codec = gradcodec.get_codec(spec, error_feedback=True, seed=1)
    x1, x2 = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    d1 = gradcodec.decode(codec.encode({"w": x1}))["w"]
    torch.testing.assert_close(codec.residuals["w"], x1 - d1, rtol=0, atol=1e-6)
    d2 = gradcodec.decode(codec.encode({"w": x2}))["w"]
    torch.testing.assert_close(codec.residuals["w"], x1 + x2 - d1 - d2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["int4", "topk:ratio=0.05|fp16", "sign"])
def test_sum_of_decoded_updates_tracks_sum_of_inputs(spec):
    g = torch.Generator().manual_seed(0)
    codec = gradcodec.get_codec(spec, error_feedback=True, seed=1)
    plain = gradcodec.get_codec(spec, seed=1)
    sent = torch.zeros(4096)
    got_ef, got_plain = torch.zeros(4096), torch.zeros(4096)
    for _ in range(30):
        x = torch.randn(4096, generator=g) + 0.5  # a persistent direction plus noise
        sent += x
        got_ef += gradcodec.decode(codec.encode(x))
        got_plain += gradcodec.decode(plain.encode(x))
    # with feedback the accumulated error is one round's residual; without, it grows with the rounds
    assert float((sent - got_ef).norm()) < 0.5 * float((sent - got_plain).norm())
    assert float((sent - got_ef).norm()) <= float(codec.residuals[""].norm()) + 1e-3


def test_fused_int8_feedback_matches_encode_then_decode():
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(1000, generator=g), torch.randn(1000, generator=g) * 0.01
    ef = gradcodec.get_codec("int8", error_feedback=True)
    ef.residuals = {"": r.clone()}
    fused = gradcodec.decode(ef.encode(x))
    e = x + r
    plain = gradcodec.decode(gradcodec.encode(e, "int8"))
    assert torch.equal(fused, plain)
    assert torch.equal(ef.residuals[""], e - plain)


def test_state_dict_round_trips_and_is_copied():
    codec = gradcodec.get_codec("int4", error_feedback=True)
    codec.encode({"a": torch.randn(10), "b": torch.randn(3, 3)})
    state = codec.state_dict()
    assert sorted(state) == ["residual.a", "residual.b"]
    other = gradcodec.get_codec("int4", error_feedback=True)
    other.load_state_dict(state)
    assert torch.equal(other.residuals["a"], codec.residuals["a"])
    other.encode({"a": torch.randn(10), "b": torch.randn(3, 3)})
    assert torch.equal(state["residual.a"], codec.residuals["a"])  # loading did not alias


def test_state_dict_includes_stage_state():
    codec = gradcodec.get_codec("powersgd:rank=2", error_feedback=True, seed=0)
    codec.encode({"m": torch.randn(16, 12)})
    keys = sorted(codec.state_dict())
    assert "residual.m" in keys and any(k.startswith("codec.") for k in keys)


def test_shape_change_is_refused_with_advice():
    codec = gradcodec.get_codec("int8", error_feedback=True)
    codec.encode({"a": torch.randn(10)})
    with pytest.raises(InvalidInput, match="reset"):
        codec.encode({"a": torch.randn(11)})
    codec.reset()
    codec.encode({"a": torch.randn(11)})


def test_lossless_codec_needs_no_feedback():
    with pytest.raises(InvalidInput, match="lossy"):
        gradcodec.get_codec("raw", error_feedback=True)


def test_bad_state_keys_are_refused():
    with pytest.raises(InvalidInput, match="unexpected key"):
        gradcodec.get_codec("int8", error_feedback=True).load_state_dict({"x": torch.zeros(1)})
