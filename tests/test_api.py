"""The public API: round trips of names, shapes and dtypes, input policy, inspect, specs."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradcodec
from gradcodec import registry
from gradcodec.codecs.base import all_finite
from gradcodec.errors import CorruptPayload, InvalidInput, UnknownCodec

from .strategies import FAST, tensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 4)]


def per_tensor_specs() -> list[str]:
    # dp acts on the whole update with noise of its own (tests/test_dp.py), not tensor by tensor
    return [n for n in gradcodec.list_codecs()
            if registry.lookup(n).kind in ("transform", "quantizer") and not hasattr(registry.lookup(n), "prepare")]


@pytest.mark.parametrize("spec", per_tensor_specs())
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_codec_round_trips_names_shapes_and_dtypes(spec, dtype):
    g = torch.Generator().manual_seed(1)
    named = {f"t{i}": torch.randn(shape, generator=g).to(dtype) for i, shape in enumerate(SHAPES)}
    out = gradcodec.decode(gradcodec.encode(named, spec))
    assert list(out) == list(named)
    for name, x in named.items():
        assert out[name].shape == x.shape and out[name].dtype == x.dtype and out[name].device.type == "cpu"


@pytest.mark.parametrize("spec", per_tensor_specs())
def test_single_tensor_round_trips_as_a_tensor(spec):
    x = torch.randn(64, 8)
    out = gradcodec.decode(gradcodec.encode(x, spec))
    assert isinstance(out, torch.Tensor) and out.shape == x.shape


@pytest.mark.parametrize("spec", per_tensor_specs())
def test_non_contiguous_input_encodes_like_its_contiguous_copy(spec):
    x = torch.randn(48, 32).t()[::2]
    assert not x.is_contiguous()
    a = gradcodec.decode(gradcodec.encode(x, spec, seed=5))
    b = gradcodec.decode(gradcodec.encode(x.contiguous(), spec, seed=5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.int64])
def test_raw_is_bit_exact(dtype):
    x = (torch.randn(33, 3) * 100).to(dtype)
    assert torch.equal(gradcodec.decode(gradcodec.encode(x, "raw")), x)


def test_fp16_input_through_fp16_is_bit_exact():
    x = torch.randn(100).half()
    assert torch.equal(gradcodec.decode(gradcodec.encode(x, "fp16")), x)


def test_lossless_zstd_pipeline_is_bit_exact():
    x = torch.randn(1000).bfloat16()
    assert torch.equal(gradcodec.decode(gradcodec.encode(x, "zstd")), x)


def test_zstd_frame_of_a_payload_fed_in_several_slices_is_the_one_shot_frame():
    import zstandard

    from gradcodec.codecs.lossless import STEP

    x = torch.randint(-3, 4, (STEP + 3 * STEP // 4 + 5,), dtype=torch.int8)  # two sections, three slices
    blob = gradcodec.encode({"a": x, "b": x[:1000]}, "raw|zstd")
    assert torch.equal(gradcodec.decode(blob)["a"], x)
    region = x.numpy().tobytes() + x[:1000].numpy().tobytes()
    assert zstandard.ZstdCompressor(level=3, write_content_size=True).compress(region) in blob


@pytest.mark.parametrize("spec", per_tensor_specs())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_is_refused_by_default(spec, bad):
    x = torch.randn(200)
    x[137] = bad
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        gradcodec.encode({"w": x}, spec)


@FAST
@given(x=tensors(), where=st.floats(0, 1), bad=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]))
def test_finiteness_check_agrees_with_isfinite_wherever_the_bad_value_sits(x, where, bad):
    if bad is not None and x.numel():
        x.view(-1)[int(where * (x.numel() - 1))] = bad  # x may be non-contiguous: view() keeps it a view
    assert all_finite(x) == bool(torch.isfinite(x).all())


def test_allow_nonfinite_passes_nan_through_lossless_codecs():
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    for spec in ("raw", "raw|zstd"):
        out = gradcodec.decode(gradcodec.encode(x, spec, allow_nonfinite=True))
        assert torch.equal(out.isnan(), x.isnan()) and torch.equal(out[~x.isnan()], x[~x.isnan()])


def test_allow_nonfinite_is_refused_for_lossy_codecs():
    with pytest.raises(InvalidInput, match="lossless"):
        gradcodec.get_codec("int8", allow_nonfinite=True)


@pytest.mark.parametrize("spec", per_tensor_specs())
def test_integer_and_bool_tensors_travel_raw_with_any_codec(spec):
    named = {"step": torch.tensor(12345678901, dtype=torch.int64), "mask": torch.rand(40) > 0.5, "w": torch.randn(40)}
    out = gradcodec.decode(gradcodec.encode(named, spec))
    assert torch.equal(out["step"], named["step"]) and torch.equal(out["mask"], named["mask"])
    assert gradcodec.inspect(gradcodec.encode(named, spec)).tensors[0].payload_bytes == 8


def test_error_feedback_skips_integer_tensors():
    codec = gradcodec.get_codec("int8", error_feedback=True)
    codec.encode({"step": torch.tensor(3), "w": torch.randn(8)})
    assert list(codec.residuals) == ["w"]


@pytest.mark.parametrize(
    "bad",
    [[1.0, 2.0], {"a": [1.0]}, {1: torch.zeros(1)}, torch.zeros(2, dtype=torch.complex64), torch.zeros(3).to_sparse()],
)
def test_bad_input_kinds_are_refused(bad):
    with pytest.raises(InvalidInput):
        gradcodec.encode(bad, "raw")


def test_fp16_overflow_is_refused_not_sent_as_inf():
    with pytest.raises(InvalidInput, match="range"):
        gradcodec.encode(torch.tensor([1e5]), "fp16")


def test_requires_grad_tensor_is_encoded_without_autograd():
    x = torch.randn(10, requires_grad=True)
    out = gradcodec.decode(gradcodec.encode(x, "int8"))
    assert not out.requires_grad


def test_decode_places_tensors_on_the_requested_device():
    blob = gradcodec.encode({"a": torch.randn(5)}, "int8")
    assert gradcodec.decode(blob, device="cpu")["a"].device.type == "cpu"


def test_unknown_codec_names_the_registered_ones():
    with pytest.raises(UnknownCodec, match="int8"):
        gradcodec.encode(torch.zeros(1), "int9")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("int8:block=100", "power of two"),
        ("int8:blocks=64", "no parameter 'blocks'"),
        ("int8:block=abc", "integer"),
        ("int8:block", "key=value"),
        ("int8|int4", "last tensor stage"),
        ("zstd|int8", "end"),
        ("int8||zstd", "empty stage"),
        ("", "non-empty"),
        ("int8:stochastic=maybe", "true or false"),
    ],
)
def test_malformed_specs_say_what_is_wrong(spec, message):
    with pytest.raises(InvalidInput, match=message):
        gradcodec.get_codec(spec)


def test_keyword_params_reach_the_stage():
    assert gradcodec.get_codec("int8", block=128).spec == "int8:block=128"
    with pytest.raises(InvalidInput, match="no stage"):
        gradcodec.get_codec("int8", ratio=0.1)


def test_canonical_spec_lists_decode_parameters_explicitly():
    assert gradcodec.get_codec("int4|zstd:level=7").spec == "int4:block=64|zstd"


def test_codec_object_refuses_payload_of_another_codec():
    blob = gradcodec.encode(torch.zeros(4), "int4")
    with pytest.raises(InvalidInput, match="gradcodec.decode"):
        gradcodec.get_codec("int8").decode(blob)


def test_inspect_describes_without_decoding():
    named = {"a": torch.randn(64, 8), "b": torch.randn(3).half()}
    blob = gradcodec.encode(named, "int8|zstd")
    info = gradcodec.inspect(blob)
    assert info.codec == "int8:block=64|zstd" and info.version == 1 and info.compressed and not info.single
    assert [(t.name, t.shape, t.dtype) for t in info.tensors] == [("a", (64, 8), torch.float32), ("b", (3,), torch.float16)]
    assert info.tensors[0].payload_bytes == 512 + 8 * 4  # int8 codes + one fp32 scale per 64-block
    assert info.payload_bytes == len(blob) and info.original_bytes == 64 * 8 * 4 + 3 * 2
    assert info.ratio == pytest.approx(info.original_bytes / len(blob))


def test_inspect_of_garbage_is_corrupt():
    with pytest.raises(CorruptPayload):
        gradcodec.inspect(b"hello")


def test_same_seed_gives_same_bytes_for_stochastic_codecs():
    x = torch.randn(1000)
    a = gradcodec.encode(x, "int8:stochastic=true", seed=3)
    assert a == gradcodec.encode(x, "int8:stochastic=true", seed=3)
    assert a != gradcodec.encode(x, "int8:stochastic=true", seed=4)


def test_empty_dict_round_trips():
    assert gradcodec.decode(gradcodec.encode({}, "int8")) == {}


def test_unicode_names_round_trip():
    named = {"模型.层.0": torch.ones(2), "": torch.zeros(1)}
    assert list(gradcodec.decode(gradcodec.encode(named, "raw"))) == list(named)


@pytest.mark.slow
def test_tensor_with_more_than_2_pow_31_elements_round_trips():
    n = (1 << 31) + 3
    x = torch.zeros(n, dtype=torch.bfloat16)
    x[-1] = 1.0
    blob = gradcodec.encode(x, "int8")
    del x
    out = gradcodec.decode(blob)
    assert out.shape == (n,) and out[-1].item() == 1.0 and out[-4].item() == 0.0
