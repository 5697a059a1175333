"""The `cgfed` codec through the public API: bytes round trips, model matching, error feedback, hostile payloads."""
import functools
import zlib

import pytest
import torch

import gradcodec
from gradcodec import wire
from gradcodec.errors import CorruptPayload, GradcodecError, InvalidInput, ModelMismatch
from gradcodec.learned.canvas import CanvasLayout
from gradcodec.learned.model import AEConfig
from gradcodec.learned.tgap import TrainConfig, train_autoencoder
from gradcodec.metrics import distortion

from .test_learned_model import low_rank_set

SHAPES = {"l0.q.lora_A": (4, 32), "l0.q.lora_B": (32, 4), "l0.k.lora_A": (4, 32), "l0.k.lora_B": (16, 4),
          "l1.q.lora_A": (4, 32), "l1.q.lora_B": (32, 4), "l1.k.lora_A": (4, 32), "l1.k.lora_B": (16, 4)}
LAYOUT = CanvasLayout.for_shapes(SHAPES)
ARCHS = {"conv": AEConfig.conv(LAYOUT, 1 / 4, stages=2, width=4), "block": AEConfig.block(LAYOUT, 1 / 8),
         "shared": AEConfig.shared(LAYOUT, 1 / 8)}


@functools.cache
def trained(arch: str):
    """A small AE of `arch` trained on a rank-3 span (cached: tests only read it)."""
    return train_autoencoder(low_rank_set(40, LAYOUT, rank=3), ARCHS[arch], TrainConfig(steps=200 if arch == "conv" else 0, lr=3e-3))


@pytest.fixture(scope="module", params=sorted(ARCHS))
def model_files(request, tmp_path_factory):
    model = trained(request.param)
    d = tmp_path_factory.mktemp(request.param)
    for name, parts in [("ae", None), ("enc", ("encoder",)), ("dec", ("decoder",))]:
        model.save(d / f"{name}.safetensors", parts=parts)
    return model, {k: d / f"{k}.safetensors" for k in ("ae", "enc", "dec")}


def update(draw=5, scale=1e-3):
    return {k: v * scale for k, v in low_rank_set(1, LAYOUT, rank=3, draw=draw)[0].items()}


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_through_bytes_with_split_model_files(model_files, bits):
    model, paths = model_files
    x = update()
    blob = gradcodec.encode(x, "cgfed", model=str(paths["enc"]), bits=bits)
    info = gradcodec.inspect(blob)
    assert info.codec == f"cgfed:bits={bits},latent_block=64,residual=0.0"
    assert info.fingerprint == model.fingerprint.hex()
    y = gradcodec.decode(blob, models=[str(paths["dec"])])
    assert list(y) == list(x) and all(y[k].shape == x[k].shape and y[k].dtype == x[k].dtype for k in x)
    assert distortion(x, y)["cosine"] > (0.9 if model.config.arch == "block" else 0.5)


def test_decoding_picks_the_model_with_the_payloads_fingerprint(model_files):
    model, paths = model_files
    other = trained("block" if model.config.arch == "conv" else "conv")
    blob = gradcodec.encode(update(), "cgfed", model=model)
    y = gradcodec.decode(blob, models=[other, str(paths["dec"])])
    assert set(y) == set(SHAPES)
    with pytest.raises(ModelMismatch, match=model.fingerprint.hex()):
        gradcodec.decode(blob, models=[other])
    with pytest.raises(ModelMismatch, match="Pass its model file"):
        gradcodec.decode(blob)


def test_decoding_needs_the_decoder_and_encoding_the_encoder(model_files):
    _, paths = model_files
    blob = gradcodec.encode(update(), "cgfed", model=str(paths["enc"]))
    with pytest.raises(ModelMismatch, match="has no decoder"):
        gradcodec.decode(blob, models=[str(paths["enc"])])
    with pytest.raises(ModelMismatch, match="has no encoder"):
        gradcodec.encode(update(), "cgfed", model=str(paths["dec"]))
    with pytest.raises(InvalidInput, match="needs its AE"):
        gradcodec.encode(update(), "cgfed")


def test_error_feedback_keeps_exactly_what_was_not_decoded(model_files):
    model, _ = model_files
    codec = gradcodec.get_codec("cgfed", model=model, error_feedback=True)
    total_x, total_y = {}, {}
    for draw in range(4):
        before = {k: v.clone() for k, v in codec.residuals.items()}
        x = update(draw)
        y = codec.decode(codec.encode(x))
        for k in x:
            sent = x[k] + before.get(k, 0)
            torch.testing.assert_close(sent - y[k], codec.residuals[k], rtol=0, atol=1e-7)
            total_x[k] = total_x.get(k, 0) + x[k]
            total_y[k] = total_y.get(k, 0) + y[k]
    for k in total_x:  # the sums differ by exactly the final residual
        torch.testing.assert_close(total_x[k] - total_y[k], codec.residuals[k], rtol=0, atol=1e-6)


def test_error_feedback_needs_the_decoder_on_the_client(model_files):
    _, paths = model_files
    with pytest.raises(ModelMismatch, match="has no decoder"):
        gradcodec.get_codec("cgfed", model=str(paths["enc"]), error_feedback=True).encode(update())


def test_residual_stage_sends_top_k_of_what_the_ae_missed(model_files):
    model, _ = model_files
    x = {k: v + 1e-3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) for k, v in update().items()}
    plain = gradcodec.encode(x, "cgfed", model=model)
    extra = gradcodec.encode(x, "cgfed", model=model, residual=0.1)
    assert gradcodec.inspect(extra).codec.endswith("residual=0.1")
    err_plain = distortion(x, gradcodec.decode(plain, models=[model]))["rel_l2"]
    err_extra = distortion(x, gradcodec.decode(extra, models=[model]))["rel_l2"]
    assert len(extra) > len(plain) and err_extra < err_plain


def test_integer_tensors_travel_raw_beside_the_factors(model_files):
    model, _ = model_files
    x = {**update(), "step": torch.tensor([7, 8], dtype=torch.int64)}
    y = gradcodec.decode(gradcodec.encode(x, "cgfed", model=model), models=[model])
    assert torch.equal(y["step"], x["step"]) and list(y) == list(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_updates_come_back_in_their_dtype(model_files, dtype):
    model, _ = model_files
    x = {k: v.to(dtype) for k, v in update().items()}
    y = gradcodec.decode(gradcodec.encode(x, "cgfed", model=model), models=[model])
    assert all(y[k].dtype == dtype for k in x)


def test_another_adapter_layout_is_refused(model_files):
    model, _ = model_files
    x = update()
    x["l1.k.lora_B"] = torch.zeros(32, 4)
    with pytest.raises(InvalidInput, match="not the adapter layout"):
        gradcodec.encode(x, "cgfed", model=model)
    reordered = dict(reversed(list(update().items())))
    with pytest.raises(InvalidInput, match="not the adapter layout"):
        gradcodec.encode(reordered, "cgfed", model=model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_non_finite_or_huge_values_are_refused(model_files, bad):
    model, _ = model_files
    x = update()
    x["l0.k.lora_B"][3, 1] = bad
    with pytest.raises(InvalidInput, match="l0.k.lora_B"):
        gradcodec.encode(x, "cgfed", model=model)


def test_parameters_are_validated():
    for kwargs in [dict(bits=5), dict(latent_block=63), dict(residual=2.0)]:
        with pytest.raises(InvalidInput):
            gradcodec.get_codec("cgfed", **kwargs)
    with pytest.raises(InvalidInput, match="lossless"):
        gradcodec.get_codec("cgfed", allow_nonfinite=True)


def recrc(blob: bytearray) -> bytes:
    blob[-4:] = zlib.crc32(bytes(blob[:-4])).to_bytes(4, "little")
    return bytes(blob)


def test_mutated_payloads_raise_gradcodec_errors(model_files):
    model, _ = model_files
    blob = gradcodec.encode(update(), "cgfed", model=model, residual=0.05)
    start = wire.read_header(blob).payload_offset
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        mutated = bytearray(blob)
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            i = int(torch.randint(0, len(blob) - 4, (), generator=g))
            if torch.rand((), generator=g) < 0.7:
                i = start + i % (len(blob) - 4 - start)  # mostly the sections
            mutated[i] = int(torch.randint(0, 256, (), generator=g))
        try:
            out = gradcodec.decode(recrc(mutated), models=[model])
        except GradcodecError:
            continue
        assert all(torch.isfinite(t).all() for t in out.values() if t.is_floating_point())


def test_bad_shared_sections_are_named(model_files):
    model, _ = model_files
    msg = gradcodec.codec.unpack(gradcodec.encode(update(), "cgfed", model=model))
    msg.shared[0] = -msg.shared[0].clone()
    with pytest.raises(CorruptPayload, match="factor scales"):
        gradcodec.decode(wire.pack(msg), models=[model])
    msg.shared = msg.shared[:1]
    with pytest.raises(CorruptPayload, match="shared sections"):
        gradcodec.decode(wire.pack(msg), models=[model])


def test_dp_in_front_of_cgfed_noises_the_whole_update_and_leaves_no_trace_in_the_payload(model_files):
    """`dp|cgfed`: the pre-pass clips and noises the update before the AE sees it; the payload names
    plain cgfed (nothing about dp or its seed), and noise=0 inside the clip is the codec's own payload."""
    model, paths = model_files
    x = update()
    plain = gradcodec.encode(x, "cgfed", model=str(paths["ae"]))
    silent = gradcodec.encode(x, "dp:clip=1e6,noise=0.0,seed=3|cgfed", model=str(paths["ae"]))
    assert silent == plain
    noised = gradcodec.encode(x, "dp:clip=1e-3,noise=1.0,seed=3|cgfed", model=str(paths["ae"]))
    assert gradcodec.inspect(noised).codec == gradcodec.inspect(plain).codec and "dp" not in gradcodec.inspect(noised).codec
    assert noised != plain
    with pytest.raises(InvalidInput, match="dp"):
        gradcodec.get_codec("int4|dp:clip=1.0,noise=0.5")
