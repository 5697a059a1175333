"""The LLaMA shape presets: published configs, their LoRA adapter shapes (GQA, all seven projections,
rank 16) and the learned codec's canvas at those shapes. Shape-only: no full model is instantiated."""
import math

import pytest
import torch

from gradcodec.integrations.fedlora.model import attach_lora, build_model, load_tokenizer, lora_shapes
from gradcodec.integrations.fedlora.presets import ALL_LINEAR, PRESETS, is_preset, preset_config
from gradcodec.integrations.fedlora.tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer
from gradcodec.integrations.peft import _lora_parameters
from gradcodec.learned.canvas import CanvasLayout, adapter_from_lora_canvas, lora_canvas_from_adapter

LLAMAS = ("llama-3.2-1b", "llama-2-7b", "llama-3-8b", "llama-7b")

# Published: (hidden, intermediate, layers, query heads, KV heads, head_dim, RoPE theta, tied, parameters)
PUBLISHED = {
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 64, 500000.0, True, 1_235_814_400),
    "llama-2-7b": (4096, 11008, 32, 32, 32, 128, 10000.0, False, 6_738_415_616),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128, 500000.0, False, 8_030_261_248),
    "llama-7b": (4096, 11008, 32, 32, 32, 128, 10000.0, False, 6_738_415_616),
}


def _parameters(c) -> int:
    """Parameter count from the config's shapes: embeddings (+ LM head unless tied), layers, final norm."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, m = c.hidden_size, c.intermediate_size
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * m + 2 * h
    return (1 if c.tie_word_embeddings else 2) * c.vocab_size * h + c.num_hidden_layers * per_layer + h


@pytest.mark.parametrize("name", LLAMAS)
def test_every_llama_preset_builds_its_published_config(name):
    c = preset_config(name)
    hidden, inter, layers, heads, kv_heads, head_dim, theta, tied, params = PUBLISHED[name]
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (hidden, inter, layers)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (heads, kv_heads, head_dim)
    assert c.rope_parameters["rope_theta"] == theta and c.tie_word_embeddings == tied
    assert _parameters(c) == params


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_byte_vocabulary_changes_only_the_vocabulary_and_special_ids(name):
    published, byte = preset_config(name).to_dict(), preset_config(name, vocab="byte").to_dict()
    changed = {k for k in published if published[k] != byte[k]}
    assert changed <= {"vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"}
    tokens = ByteTokenizer()
    assert (byte["vocab_size"], byte["pad_token_id"], byte["bos_token_id"], byte["eos_token_id"]) == (
        BYTE_VOCAB_SIZE, tokens.pad_id, tokens.bos_id, tokens.eos_id)
    assert isinstance(load_tokenizer(name), ByteTokenizer)


def test_llama_3_2_1b_with_the_byte_vocabulary_has_0_97_g_parameters():
    assert _parameters(preset_config("llama-3.2-1b", vocab="byte")) == 1_235_814_400 - (128256 - 259) * 2048


def test_a_layers_suffix_keeps_the_shapes_and_cuts_the_depth():
    c = preset_config("llama-3-8b:layers=2")
    assert c.num_hidden_layers == 2 and c.intermediate_size == 14336 and c.num_key_value_heads == 8
    assert is_preset("llama-3.2-1b:layers=16") and not is_preset("llama-3.2-1b:layers=17")
    for bad in ("llama-3.2-1b:layers=0", "llama-3.2-1b:depth=2", "llama-3.2-1b:layers=x"):
        with pytest.raises(ValueError, match="layers=N"):
            preset_config(bad)


# Hand-computed (fan_in, fan_out) of each projection: k/v project to kv_heads * head_dim under GQA.
PROJECTIONS = {
    "llama-3.2-1b": {"q_proj": (2048, 2048), "k_proj": (2048, 512), "v_proj": (2048, 512), "o_proj": (2048, 2048),
                     "gate_proj": (2048, 8192), "up_proj": (2048, 8192), "down_proj": (8192, 2048)},
    "llama-2-7b": {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
                   "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)},
    "llama-3-8b": {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
                   "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)},
}
# r16 on all seven projections, values per adapter (sum over layers of r * (fan_in + fan_out))
ALL_LINEAR_R16 = {"llama-3.2-1b": 11_272_192, "llama-2-7b": 39_976_960, "llama-3-8b": 41_943_040}


@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_rank_16_adapter_shapes_on_all_seven_projections_match_hand_computed_ones(name):
    shapes = lora_shapes(name, rank=16, targets=ALL_LINEAR)
    layers = PUBLISHED[name][2]
    assert len(shapes) == layers * 7 * 2
    for layer in (0, layers - 1):
        for proj, (fan_in, fan_out) in PROJECTIONS[name].items():
            block = "self_attn" if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"model.layers.{layer}.{block}.{proj}"
            assert shapes[f"{prefix}.lora_A.weight"] == (16, fan_in)
            assert shapes[f"{prefix}.lora_B.weight"] == (fan_out, 16)
    assert sum(math.prod(s) for s in shapes.values()) == ALL_LINEAR_R16[name]


def test_llama_2_7b_qkvo_rank_8_has_8_4_m_values():
    assert sum(math.prod(s) for s in lora_shapes("llama-2-7b", rank=8).values()) == 32 * 4 * 2 * 8 * 4096


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3-8b"])
def test_lora_shapes_agree_with_peft_on_a_meta_device_model(name):
    """PEFT's own adapter on a 1-layer model built on the meta device (no memory, no weights)."""
    from transformers import LlamaForCausalLM

    one_layer = f"{name}:layers=1"
    with torch.device("meta"):
        model = LlamaForCausalLM(preset_config(one_layer, vocab="byte"))
    # lora_state's names, without its CPU copy (meta tensors hold no data to copy)
    real = {k: tuple(v.shape) for k, v in _lora_parameters(attach_lora(model, rank=16, targets=ALL_LINEAR), None).items()}
    assert real == lora_shapes(one_layer, rank=16, targets=ALL_LINEAR)


def test_build_model_instantiates_a_cut_down_1b_in_bf16_with_the_byte_vocabulary():
    model = build_model("llama-3.2-1b:layers=1", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.shape == (BYTE_VOCAB_SIZE, 2048)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    logits = model(input_ids=torch.tensor([[257, 72, 105]])).logits
    assert logits.shape == (1, 3, BYTE_VOCAB_SIZE) and torch.isfinite(logits).all()


# --- the learned codec's canvas at each preset's adapter shape -------------------------------------

@pytest.mark.parametrize("name,rank,targets,canvas", [
    ("llama-3.2-1b", 16, ALL_LINEAR, (2048, 16 * 16 * (2 + 2 + 2 + 2 + 3 * (1 + 4)))),
    ("llama-2-7b", 8, ALL_LINEAR[:4], (4096, 32 * 4 * 2 * 8)),
    ("llama-3-8b", 16, ALL_LINEAR, (4096, 32 * 16 * (2 + 2 + 2 + 2 + 3 * (1 + 4)))),
])
def test_canvas_layout_at_full_preset_shape(name, rank, targets, canvas):
    """Shape-only: height is the hidden size, MLP factors fold into ceil(intermediate / hidden) blocks,
    GQA's short k/v B factors are padded; the canvas holds exactly the adapter's values."""
    shapes = lora_shapes(name, rank, targets)
    layout = CanvasLayout.for_shapes(shapes)
    assert layout.shape == canvas
    assert layout.numel == sum(math.prod(s) for s in shapes.values())


@pytest.mark.parametrize("name,rank,targets", [
    ("llama-3.2-1b:layers=2", 16, ALL_LINEAR),
    ("llama-2-7b:layers=2", 8, ALL_LINEAR[:4]),
    ("llama-3-8b:layers=1", 16, ALL_LINEAR),
])
def test_canvas_round_trips_exactly_at_the_preset_adapter_shape(name, rank, targets):
    """Real tensors for a few layers of each shape (cheap): every layer has the same factor shapes, so
    a few layers cover every case the full adapter has."""
    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(s, generator=g) for k, s in lora_shapes(name, rank, targets).items()}
    layout = CanvasLayout.of(x)
    y = adapter_from_lora_canvas(lora_canvas_from_adapter(x, layout), layout)
    assert list(y) == list(x) and all(torch.equal(y[k], x[k]) for k in x)
