"""FAF: client uploads with an encoder-only file, server decoding and averaging, decoder adaptation on verified pairs."""
import pytest
import torch

import gradcodec
from gradcodec.errors import InvalidInput, ModelMismatch
from gradcodec.learned.faf import FAFClient, FAFServer
from gradcodec.learned.modelfile import load_model
from gradcodec.metrics import distortion

from .test_learned_codec import trained, update


@pytest.fixture(scope="module", params=["block", "conv"])
def files(request, tmp_path_factory):
    model = trained(request.param)
    d = tmp_path_factory.mktemp("faf")
    model.save(d / "enc.safetensors", parts=("encoder",))
    model.save(d / "dec.safetensors", parts=("decoder",))
    model.save(d / "ae.safetensors")
    return model, d


def test_clients_upload_with_the_encoder_only_and_the_server_averages(files):
    model, d = files
    clients = [FAFClient(d / "enc.safetensors") for _ in range(3)]
    server = FAFServer([d / "dec.safetensors"])
    updates = [update(draw) for draw in range(3)]
    blobs = [c.upload(u) for c, u in zip(clients, updates)]
    avg = server.aggregate(blobs, [1, 2, 1])
    decoded = [server.decode(b) for b in blobs]
    for k in avg:
        torch.testing.assert_close(avg[k], (decoded[0][k] + 2 * decoded[1][k] + decoded[2][k]) / 4)
    with pytest.raises(InvalidInput):
        server.aggregate(blobs, [0, 0, 0])


def test_the_server_refuses_other_codecs_and_other_models(files):
    model, d = files
    server = FAFServer([d / "dec.safetensors"])
    with pytest.raises(InvalidInput, match="cgfed payloads"):
        server.decode(gradcodec.encode(update(), "int8"))
    other = trained("conv" if model.config.arch == "block" else "block")
    with pytest.raises(ModelMismatch):
        server.decode(gradcodec.encode(update(), "cgfed", model=other))
    with pytest.raises(ModelMismatch, match="holds encoder"):
        FAFServer([d / "enc.safetensors"])


def test_calibration_sends_the_encoded_input_through_the_reference_codec(files):
    model, d = files
    client = FAFClient(d / "ae.safetensors", error_feedback=True)
    client.upload(update(0))
    residual = {k: v.clone() for k, v in client.codec.residuals.items()}
    blob, reference = client.upload(update(1), calibrate=True)
    ref = gradcodec.decode(reference)
    expected = {k: update(1)[k] + residual[k] for k in ref}
    assert distortion(expected, ref)["rel_l2"] < 0.01  # int8's error
    assert gradcodec.inspect(blob).codec.startswith("cgfed")


def test_adapting_the_decoder_keeps_the_fingerprint_and_fits_the_pairs(files, tmp_path):
    model, d = files
    server = FAFServer([d / "dec.safetensors"])
    client = FAFClient(d / "enc.safetensors")
    # this federation's updates: the TGAP span, scaled differently per factor than in training
    drift = {k: (2.0 if "l1" in k else 0.5) for k in update()}
    pairs = [client.upload({k: v * drift[k] for k, v in update(draw).items()}, calibrate=True) for draw in range(30)]
    for blob, ref in pairs:
        server.observe(blob, ref)
    test = {k: v * drift[k] for k, v in update(99).items()}
    blob = client.upload(test)
    before = distortion(test, server.decode(blob))["rel_l2"]
    adapted = server.adapt(ridge=1.0, steps=100, lr=1e-3)
    after = distortion(test, server.decode(blob))["rel_l2"]
    assert adapted.revision == 1 and adapted.fingerprint == model.fingerprint
    assert after <= before + 1e-6, (before, after)
    adapted.save(tmp_path / "dec1.safetensors", parts=("decoder",))
    reloaded = load_model(tmp_path / "dec1.safetensors")
    assert reloaded.revision == 1
    assert distortion(server.decode(blob), gradcodec.decode(blob, models=[reloaded]))["rel_l2"] < 1e-6


def test_adapt_needs_pairs(files):
    _, d = files
    with pytest.raises(InvalidInput, match="no verified pairs"):
        FAFServer([d / "dec.safetensors"]).adapt()


def test_observe_refuses_a_reference_of_other_tensors(files):
    _, d = files
    server = FAFServer([d / "dec.safetensors"])
    blob = FAFClient(d / "enc.safetensors").upload(update())
    wrong = {k: v for k, v in update().items() if not k.startswith("l1")}
    with pytest.raises(InvalidInput, match="same tensors"):
        server.observe(blob, gradcodec.encode(wrong, "int8"))
