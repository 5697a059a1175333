"""The shared AE (weights shared across layers): size bound at LLaMA scale, shapes at every preset,
closed-form streaming TGAP, and refusal of models that do not fit."""
import math

import pytest
import torch

import gradcodec
from gradcodec.capture import FORMAT, save_capture
from gradcodec.errors import InvalidInput, ModelMismatch
from gradcodec.integrations.fedlora.presets import ALL_LINEAR, lora_shapes
from gradcodec.learned.canvas import CanvasLayout
from gradcodec.learned.model import AEConfig, build_decoder, build_encoder, factor_types
from gradcodec.learned.modelfile import LearnedModel, load_model
from gradcodec.learned.tgap import CaptureSnapshots, TrainConfig, fit_shared, train_autoencoder
from gradcodec.metrics import distortion

# (preset, rank, targets): the adapters issue 9 names; ":layers=2" keeps the per-layer shapes, small
ADAPTERS = {
    "tiny-r16-all": ("tiny", 16, ALL_LINEAR),
    "1b-r16-all": ("llama-3.2-1b", 16, ALL_LINEAR),
    "7b-r8-qkvo": ("llama-2-7b", 8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "8b-r16-all": ("llama-3-8b", 16, ALL_LINEAR),
}


def random_model(shapes, ratio=1 / 64, block_rows=None) -> LearnedModel:
    torch.manual_seed(0)
    config = AEConfig.shared(CanvasLayout.for_shapes(shapes), ratio, block_rows)
    return LearnedModel.trained(config, build_encoder(config), build_decoder(config))


def test_the_encoder_file_for_llama_2_7b_qkvo_r8_is_under_one_fp32_update(tmp_path):
    shapes = lora_shapes("llama-2-7b", 8)
    update_bytes = sum(math.prod(s) for s in shapes.values()) * 4
    assert update_bytes == 33_554_432
    path = tmp_path / "enc.safetensors"
    random_model(shapes).save(path, parts=("encoder",))
    assert path.stat().st_size <= update_bytes / 3.9  # 8.5 MB: 8 latents x one layer's 262 144 values, fp32


@pytest.mark.parametrize("name", ["1b-r16-all", "7b-r8-qkvo", "8b-r16-all"])
def test_weights_do_not_grow_with_layers_only_the_per_layer_gains(name):
    preset, rank, targets = ADAPTERS[name]
    counts = {}
    for layers in (1, 16):
        model = random_model(lora_shapes(f"{preset}:layers={layers}", rank, targets))
        counts[layers] = {k: sum(v.numel() for n, v in model.encoder.named_parameters() if n.startswith(k))
                          for k in ("weight", "bias", "gain")}
    assert counts[1]["weight"] == counts[16]["weight"] and counts[1]["bias"] == counts[16]["bias"]
    assert counts[16]["gain"] == 16 * counts[1]["gain"] < counts[16]["weight"] / 100


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_full_size_latent_is_one_64th_of_the_adapter(name):
    preset, rank, targets = ADAPTERS[name]
    shapes = lora_shapes(preset, rank, targets)
    config = AEConfig.shared(CanvasLayout.for_shapes(shapes))
    numel = sum(math.prod(s) for s in shapes.values())
    # the tiny MLP's 344 rows are padded to whole bands, so its latent is a little larger
    assert config.latent_numel == numel // 64 if preset != "tiny" else numel // 64 < config.latent_numel < numel // 60


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_round_trip_keeps_names_shapes_and_dtypes_at_each_preset(name, bits):
    preset, rank, targets = ADAPTERS[name]
    shapes = lora_shapes(f"{preset}:layers=2" if preset != "tiny" else preset, rank, targets)
    model = random_model(shapes)
    g = torch.Generator().manual_seed(1)
    x = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    blob = gradcodec.encode(x, "cgfed", model=model, bits=bits)
    y = gradcodec.decode(blob, models=[model])
    assert [(k, v.shape, v.dtype) for k, v in y.items()] == [(k, v.shape, v.dtype) for k, v in x.items()]
    assert all(torch.isfinite(v).all() for v in y.values())


def test_grouped_query_k_and_v_are_types_of_their_own_shape():
    types = factor_types(CanvasLayout.for_shapes(lora_shapes("llama-3-8b:layers=3", 16, ALL_LINEAR)))
    assert len(types) == 14 and all(len(t.members) == 3 for t in types)
    k_b = next(t for t in types if "k_proj.lora_B" in t.pattern)
    assert k_b.pattern == "model.layers.#.self_attn.k_proj.lora_B.weight" and k_b.shape == (1024, 16)


def span_shared_by_layers(n: int, layers: int = 3, rank: int = 2, seed: int = 0) -> list[dict]:
    """Updates whose every layer lies in one span per factor type (the structure the shared AE assumes)."""
    shapes = {f"l{i}.{p}.lora_{f}": s for i in range(layers)
              for p, s in [("q", {"A": (4, 64), "B": (64, 4)}), ("k", {"A": (4, 64), "B": (32, 4)})]
              for f, s in s.items()}
    g = torch.Generator().manual_seed(seed)
    basis = {}
    for name, shape in shapes.items():
        basis.setdefault(name.split(".", 1)[1], torch.randn(rank, *shape, generator=g))
    out = []
    for _ in range(n):
        out.append({k: torch.einsum("r,rab->ab", torch.randn(rank, generator=g), basis[k.split(".", 1)[1]])
                    for k in shapes})
    return out


def test_fit_shared_learns_a_span_common_to_all_layers():
    draws = span_shared_by_layers(35)  # one span, 35 draws: 30 to fit, 5 held out
    train, held = draws[:30], draws[30:]
    config = AEConfig.shared(CanvasLayout.of(train[0]), 1 / 16)
    model = train_autoencoder(train, config, TrainConfig(steps=0))
    codec = gradcodec.get_codec("cgfed", model=model)
    for x in held:
        assert distortion(x, codec.decode(codec.encode(x)))["cosine"] > 0.99


@pytest.mark.slow  # one memory-mapped pass per factor type and pass
def test_streaming_fit_from_a_capture_file_equals_the_in_memory_fit(tmp_path):
    snapshots = span_shared_by_layers(12)
    records = [{"round": i // 3, "client": i % 3, "num_examples": 1, "loss": 0.0, "update": s}
               for i, s in enumerate(snapshots)]
    save_capture({"format": FORMAT, "config": {}, "records": records, "history": []}, tmp_path / "c.pt")
    config = AEConfig.shared(CanvasLayout.of(snapshots[0]), 1 / 16)
    streamed = fit_shared(CaptureSnapshots([tmp_path / "c.pt"]), config, max_gram_bytes=1)  # one type per pass
    in_memory = fit_shared(snapshots, config)
    for a, b in zip(streamed.encoder.parameters(), in_memory.encoder.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_model_for_another_adapter_or_payload_is_refused(tmp_path):
    tiny, other = random_model(lora_shapes("tiny", 8)), random_model(lora_shapes("tiny", 8), block_rows=32)
    x = {k: torch.randn(s) for k, s in lora_shapes("llama-2-7b:layers=1", 8).items()}
    with pytest.raises(InvalidInput, match="not the adapter layout"):
        gradcodec.encode(x, "cgfed", model=tiny)
    blob = gradcodec.encode({k: torch.randn(s) for k, s in lora_shapes("tiny", 8).items()}, "cgfed", model=tiny)
    with pytest.raises(ModelMismatch, match=tiny.fingerprint.hex()):
        gradcodec.decode(blob, models=[other])
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(ModelMismatch):
        gradcodec.decode(blob, models=[str(tmp_path / "other.safetensors")])


def test_a_shared_model_file_round_trips_and_a_tampered_one_is_refused(tmp_path):
    model = random_model(lora_shapes("tiny", 8))
    model.save(tmp_path / "ae.safetensors")
    assert load_model(tmp_path / "ae.safetensors").fingerprint == model.fingerprint
    data = bytearray((tmp_path / "ae.safetensors").read_bytes())
    data[-5] ^= 0xFF  # a weight byte
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelMismatch, match="corrupted"):
        load_model(tmp_path / "bad.safetensors")


def test_configs_of_the_older_archs_keep_their_json():
    assert '"types"' not in AEConfig.block(CanvasLayout.for_shapes(lora_shapes("tiny", 8))).to_json()


def test_the_shared_ae_is_fitted_in_closed_form_only():
    snapshots = span_shared_by_layers(4)
    with pytest.raises(InvalidInput, match="closed form"):
        train_autoencoder(snapshots, AEConfig.shared(CanvasLayout.of(snapshots[0]), 1 / 16), TrainConfig(steps=10))
