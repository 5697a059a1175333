"""The shared AE's codec paths (SharedEncoder.encode_factors, SharedDecoder.decode_factors: tiles staged in
a reused scratch, per-type passes) against a straightforward reference written here: a loop over every
factor and band that cuts the tile out by hand and multiplies it by that band's weights."""
import math

import pytest
import torch

import gradcodec
from gradcodec.codec import unpack
from gradcodec.errors import CorruptPayload, InvalidInput
from gradcodec.integrations.fedlora.presets import ALL_LINEAR, lora_shapes
from gradcodec.learned import model as model_module
from gradcodec.learned.canvas import CanvasLayout
from gradcodec.learned.model import AEConfig, build_decoder, build_encoder, factor_types
from gradcodec.learned.modelfile import LearnedModel

QMAX = {8: 127, 4: 7}
# two layers of LLaMA-3.2-1B, all seven linear targets, rank 16: grouped-query k/v B factors [512, 16]
GQA = ("llama-3.2-1b:layers=2", 16, ALL_LINEAR)
TINY = ("tiny", 16, ALL_LINEAR)  # its MLP's 344 rows end in a zero-padded band


def random_model(shapes, seed=0) -> LearnedModel:
    """Random weights, and random biases and gains too, so that every term of the AE is exercised."""
    torch.manual_seed(seed)
    config = AEConfig.shared(CanvasLayout.for_shapes(shapes))
    enc, dec = build_encoder(config), build_decoder(config)
    with torch.no_grad():
        for p in list(enc.bias) + list(dec.bias):
            p.normal_(0, 0.05)
        for p in list(enc.gain) + list(dec.gain):
            p.uniform_(0.5, 2.0)
    return LearnedModel.trained(config, enc, dec)


def tiles_of(x: torch.Tensor, band: int) -> list[torch.Tensor]:
    """The tiles of one factor, one per band, flattened in its own orientation, cut out one by one."""
    a, b = x.shape
    long = max(a, b)
    out = []
    for start in range(0, long, band):
        if a < b:  # [r, L]: rows x this band's columns
            t = torch.zeros(a, band)
            t[:, : min(band, b - start)] = x[:, start:start + band]
        else:  # [L, r]: this band's rows x all columns
            t = torch.zeros(band, b)
            t[: min(band, a - start)] = x[start:start + band]
        out.append(t.reshape(-1))
    return out


def put_tiles(tiles: list[torch.Tensor], shape: tuple[int, int], band: int) -> torch.Tensor:
    a, b = shape
    y = torch.zeros(shape)
    for bi, t in enumerate(tiles):
        start = bi * band
        if a < b:
            y[:, start:start + band] = t.view(a, band)[:, : min(band, b - start)]
        else:
            y[start:start + band] = t.view(band, b)[: min(band, a - start)]
    return y


def reference(model: LearnedModel, x: dict[str, torch.Tensor], bits: int):
    """(scales, codes, decode(codes) per name): the shared AE computed tile by tile, factor by factor."""
    cfg, enc, dec = model.config, model.encoder, model.decoder
    layout = CanvasLayout.for_shapes({k: v.shape for k, v in x.items()})
    names = list(x)
    scales = torch.stack([torch.linalg.vector_norm(v) / math.sqrt(v.numel()) for v in x.values()])
    codes, decoded = [], {}
    with torch.no_grad():
        for i, (t, (_, a, b, n, band, k)) in enumerate(zip(factor_types(layout), cfg.types)):
            z = torch.zeros(-(-max(a, b) // band), n, k)
            for layer, member in enumerate(t.members):
                s = float(scales[member]) or 1.0
                for bi, tile in enumerate(tiles_of(x[names[member]], band)):
                    z[bi, layer] = enc.weight[i][bi] @ tile * enc.gain[i][bi, layer] / s + enc.bias[i][bi]
            codes.append(torch.floor(torch.tanh(z) * QMAX[bits] + 0.5).clamp(-QMAX[bits], QMAX[bits]))
    return scales, torch.cat([c.reshape(-1) for c in codes])


def reference_decode(model: LearnedModel, names: list[str], shapes, scales, codes, bits: int):
    cfg, dec = model.config, model.decoder
    layout = CanvasLayout.for_shapes(shapes)
    out, at = {}, 0
    with torch.no_grad():
        for i, (t, (_, a, b, n, band, k)) in enumerate(zip(factor_types(layout), cfg.types)):
            bands = -(-max(a, b) // band)
            u = codes[at:at + bands * n * k].view(bands, n, k).float() / QMAX[bits]
            at += bands * n * k
            for layer, member in enumerate(t.members):
                s = scales[member]
                tiles = [(dec.gain[i][bi, layer] * u[bi, layer] @ dec.weight[i][bi] + dec.bias[i][bi]) * s
                         for bi in range(bands)]
                out[names[member]] = put_tiles(tiles, (a, b), band)
    return out


def payload_codes(blob: bytes, n: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    shared = unpack(blob).shared
    codes = shared[1].to(torch.int16)
    if bits == 4:  # two nibbles a byte, low first, stored + 8
        codes = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)[:n] - 8
    return shared[0], codes


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("adapter", [GQA, TINY], ids=["1b-gqa-2-layers", "tiny-padded-band"])
def test_encode_and_decode_equal_a_tile_by_tile_reference(adapter, bits):
    shapes = lora_shapes(*adapter)
    model = random_model(shapes)
    g = torch.Generator().manual_seed(1)
    x = {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
    blob = gradcodec.encode(x, "cgfed", model=model, bits=bits)
    scales, codes = payload_codes(blob, model.config.latent_numel, bits)

    ref_scales, ref_codes = reference(model, x, bits)
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    # the reference sums each dot product in its own order: a code on a rounding boundary may go either way
    diff = (codes - ref_codes).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert codes.abs().max() <= QMAX[bits] and (codes != 0).float().mean() > 0.5  # not a trivial latent

    y = gradcodec.decode(blob, models=[model])
    want = reference_decode(model, list(x), shapes, scales, codes, bits)
    for k in x:
        assert y[k].shape == x[k].shape and y[k].is_contiguous()
        torch.testing.assert_close(y[k], want[k], rtol=1e-5, atol=1e-6 * float(want[k].abs().max()))


def test_scratch_chunks_of_a_few_bands_give_the_same_bytes_and_tensors(monkeypatch):
    shapes = lora_shapes(*GQA)
    model = random_model(shapes)
    g = torch.Generator().manual_seed(2)
    x = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    blob = gradcodec.encode(x, "cgfed", model=model)
    y = gradcodec.decode(blob, models=[model])
    # one band per chunk for every type (a tile of rank 16 x 32 rows x 2 layers is 1024 values)
    monkeypatch.setattr(model_module, "SCRATCH_VALUES", 1000)
    assert gradcodec.encode(x, "cgfed", model=model) == blob
    y_small = gradcodec.decode(blob, models=[model])
    assert all(torch.equal(y[k], y_small[k]) for k in x)


def test_decoded_factors_are_separate_tensors():
    shapes = lora_shapes(*GQA)
    model = random_model(shapes)
    x = {k: torch.randn(s) for k, s in shapes.items()}
    y = gradcodec.decode(gradcodec.encode(x, "cgfed", model=model), models=[model])
    assert len({v.untyped_storage().data_ptr() for v in y.values()}) == len(y)
    first = next(iter(y))
    before = {k: v.clone() for k, v in y.items()}
    y[first].zero_()  # writing one leaves the others as they were
    assert all(torch.equal(y[k], before[k]) for k in y if k != first)


@pytest.mark.parametrize("residual", [0.0, 0.01])
def test_a_decoder_that_overflows_raises_corrupt_payload(residual):
    shapes = lora_shapes(*GQA)
    model = random_model(shapes)
    x = {k: torch.randn(s) for k, s in shapes.items()}
    blob = gradcodec.encode(x, "cgfed", model=model, residual=residual)
    with torch.no_grad():
        model.decoder.weight[3][5, 2, 7] = float("inf")  # one band of one type
    with pytest.raises(CorruptPayload, match="non-finite"):
        gradcodec.decode(blob, models=[model])


def test_nan_in_one_factor_is_refused_at_encode():
    shapes = lora_shapes(*GQA)
    model = random_model(shapes)
    x = {k: torch.randn(s) for k, s in shapes.items()}
    name = list(x)[9]
    x[name][3, 4] = float("nan")
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        gradcodec.encode(x, "cgfed", model=model)


def test_error_feedback_residual_is_what_the_server_does_not_decode():
    shapes = lora_shapes(*GQA)
    model = random_model(shapes)
    codec = gradcodec.get_codec("cgfed", model=model)
    x = {k: torch.randn(s) * 1e-2 for k, s in shapes.items()}
    res = {k: torch.randn(s) * 1e-3 for k, s in shapes.items()}
    before = {k: v.clone() for k, v in res.items()}
    blob = codec.encode(x, residuals=res)
    y = gradcodec.decode(blob, models=[model])
    for k in x:
        torch.testing.assert_close(res[k], x[k] + before[k] - y[k], rtol=0, atol=1e-6)
