"""The model file: encoder-only and decoder-only parts, one fingerprint, and refusal of anything altered."""
import json
import struct

import pytest
import torch

from gradcodec.errors import InvalidInput, ModelMismatch
from gradcodec.learned.canvas import CanvasLayout
from gradcodec.learned.model import AEConfig, build_decoder, build_encoder
from gradcodec.learned.modelfile import LearnedModel, load_model

LAYOUT = CanvasLayout.for_shapes({"l0.lora_A": (4, 32), "l0.lora_B": (32, 4), "l1.lora_A": (4, 32), "l1.lora_B": (16, 4)})


def make_model(arch="conv", seed=0) -> LearnedModel:
    cfg = AEConfig.conv(LAYOUT, 1 / 4, stages=2, width=4) if arch == "conv" else AEConfig.block(LAYOUT, 1 / 8)
    torch.manual_seed(seed)
    return LearnedModel.trained(cfg, build_encoder(cfg), build_decoder(cfg), training={"note": "test"})


@pytest.fixture(params=["conv", "block"])
def files(request, tmp_path):
    model = make_model(request.param)
    paths = {"full": tmp_path / "ae.safetensors", "encoder": tmp_path / "enc.safetensors", "decoder": tmp_path / "dec.safetensors"}
    model.save(paths["full"])
    model.save(paths["encoder"], parts=("encoder",))
    model.save(paths["decoder"], parts=("decoder",))
    return model, paths


def test_every_part_loads_with_the_same_fingerprint_and_weights(files):
    model, paths = files
    full, enc, dec = (load_model(paths[k]) for k in ("full", "encoder", "decoder"))
    assert full.fingerprint == enc.fingerprint == dec.fingerprint == model.fingerprint
    assert full.parts == ("encoder", "decoder") and enc.parts == ("encoder",) and dec.parts == ("decoder",)
    for a, b in zip(enc.encoder.state_dict().values(), model.encoder.state_dict().values()):
        assert torch.equal(a, b)
    assert full.config == model.config and full.training == {"note": "test"}


def test_a_missing_part_is_named(files):
    _, paths = files
    with pytest.raises(ModelMismatch, match="holds encoder, not the decoder"):
        load_model(paths["encoder"], parts=("decoder",))
    with pytest.raises(ModelMismatch, match="has no encoder"):
        load_model(paths["decoder"]).require("encoder")


def test_different_weights_give_a_different_fingerprint():
    assert make_model(seed=0).fingerprint != make_model(seed=1).fingerprint
    assert make_model(seed=0).fingerprint == make_model(seed=0).fingerprint


@pytest.mark.parametrize("keep", [0, 7, 100, -1, -100])
def test_a_truncated_file_raises_model_mismatch(files, keep):
    _, paths = files
    data = paths["full"].read_bytes()
    paths["full"].write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(ModelMismatch, match=str(paths["full"])):
        load_model(paths["full"])


def test_an_altered_weight_byte_raises_model_mismatch(files):
    _, paths = files
    data = bytearray(paths["decoder"].read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's data
    paths["decoder"].write_bytes(bytes(data))
    with pytest.raises(ModelMismatch, match="decoder's weights are corrupted"):
        load_model(paths["decoder"])


def rewrite_metadata(path, edit):
    """Rewrite a safetensors file's JSON header with `edit(header)` applied (same tensors)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def test_altered_config_or_hashes_raise_model_mismatch(files):
    _, paths = files

    def more_rows(h):
        cfg = json.loads(h["__metadata__"]["config"])
        cfg["canvas_height"] += 1
        h["__metadata__"]["config"] = json.dumps(cfg)

    rewrite_metadata(paths["full"], more_rows)
    with pytest.raises(ModelMismatch, match="fingerprint does not match"):
        load_model(paths["full"])

    def relabel(h):
        meta = h["__metadata__"]
        meta["part_hashes"] = json.dumps({"encoder": json.loads(meta["part_hashes"])["decoder"]})

    rewrite_metadata(paths["decoder"], relabel)
    with pytest.raises(ModelMismatch):
        load_model(paths["decoder"])


def test_other_files_are_refused_clearly(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelMismatch, match="not a gradcodec AE file"):
        load_model(tmp_path / "other.safetensors")
    (tmp_path / "junk").write_bytes(b"\x00" * 50)
    with pytest.raises(ModelMismatch, match="not a readable safetensors file"):
        load_model(tmp_path / "junk")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")


def test_a_changed_encoder_cannot_be_saved_under_the_old_fingerprint(tmp_path):
    model = make_model()
    with torch.no_grad():
        next(model.encoder.parameters()).add_(1)
    with pytest.raises(InvalidInput, match="new AE"):
        model.save(tmp_path / "x.safetensors")


def test_an_adapted_decoder_keeps_the_fingerprint_as_a_new_revision(tmp_path):
    model = make_model("block")
    decoder = build_decoder(model.config)
    decoder.load_state_dict(model.decoder.state_dict())
    with torch.no_grad():
        decoder.bias.add_(0.5)
    adapted = LearnedModel(model.config, None, decoder, dict(model.code_hashes), revision=1)
    adapted.save(tmp_path / "dec1.safetensors")
    loaded = load_model(tmp_path / "dec1.safetensors")
    assert loaded.fingerprint == model.fingerprint and loaded.revision == 1
    assert torch.equal(loaded.decoder.bias, decoder.bias)
    rewrite_metadata(tmp_path / "dec1.safetensors", lambda h: h["__metadata__"].update(revision="0"))
    with pytest.raises(ModelMismatch, match="not the ones its fingerprint names"):
        load_model(tmp_path / "dec1.safetensors")
