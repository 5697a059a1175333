"""Model presets of the reference federated app: preset name -> `transformers.LlamaConfig` keyword arguments.

`tiny` is the CPU default: small enough to pre-train and LoRA-fine-tune in minutes on two cores, yet a
real LLaMA block stack (RMSNorm, RoPE, SwiGLU, grouped-query attention with 2 KV heads per 4 query
heads), so the LoRA tensors the codecs see have the same structure as on a real checkpoint. Its
vocabulary is the byte tokenizer's (`tokenizer.BYTE_VOCAB_SIZE`), which is why it needs no downloaded
tokenizer.

The LLaMA presets copy the published `config.json` of each checkpoint (hidden and intermediate sizes,
layers, query / KV heads, head_dim, RoPE, norm epsilon, tied embeddings, vocabulary and special ids):

    llama-3.2-1b  2048 / 8192, 16 layers, 32 query / 8 KV heads, head_dim 64, RoPE θ 500000 (llama3
                  scaling), tied embeddings
    llama-2-7b    4096 / 11008, 32 layers, 32 / 32 heads, θ 10000
    llama-3-8b    4096 / 14336, 32 layers, 32 / 8 heads, θ 500000
    llama-7b      LLaMA-1 7B: llama-2-7b's shapes with a 2048-token context and eps 1e-6

No weights can be downloaded here, so these presets are instantiated with random weights, and with the
byte tokenizer's vocabulary instead of the published one: `preset_config(name, vocab="byte")`, which
`model.build_model` uses, swaps vocab_size and the pad/bos/eos ids for the byte tokenizer's. Every
other shape, and so every LoRA adapter shape, stays the published one; only the embedding and LM-head
matrices shrink (for llama-3.2-1b: 128256 -> 259 rows, 1.24 G -> 0.97 G parameters).
`preset_config(name)` keeps the published vocabulary, for parameter counts and sizing.

A preset name may end in `:layers=N` (e.g. `llama-3.2-1b:layers=2`): the same shapes with only the
first N decoder layers, for trying a large preset at a fraction of its memory and time.
"""
from __future__ import annotations

from typing import Any, Sequence

from .tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0),
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}
PRESETS["llama-7b"] = {**PRESETS["llama-2-7b"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}

VOCABS = ("published", "byte")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _split(name: str) -> tuple[str, int | None]:
    """`"llama-3.2-1b:layers=2"` -> ("llama-3.2-1b", 2); a plain preset name -> (name, None)."""
    base, sep, option = name.partition(":")
    if base not in PRESETS:
        raise ValueError(f"unknown model preset {base!r}; known presets: {', '.join(sorted(PRESETS))}")
    if not sep:
        return base, None
    key, _, value = option.partition("=")
    if key.strip() != "layers" or not value.strip().isdigit() or not 1 <= int(value) <= PRESETS[base]["num_hidden_layers"]:
        raise ValueError(f"preset {name!r}: the only option is layers=N with 1 <= N <= "
                         f"{PRESETS[base]['num_hidden_layers']} (e.g. {base}:layers=2)")
    return base, int(value)


def is_preset(name: object) -> bool:
    """Whether `name` names a preset (with or without a valid `:layers=N`)."""
    if not isinstance(name, str):
        return False
    try:
        _split(name)
    except ValueError:
        return False
    return True


def preset_kwargs(name: str, vocab: str = "published") -> dict[str, Any]:
    """The `LlamaConfig` keyword arguments of preset `name`; `vocab="byte"` sizes the vocabulary and
    special ids for the byte tokenizer (what `build_model` instantiates), "published" keeps the
    checkpoint's."""
    if vocab not in VOCABS:
        raise ValueError(f"vocab must be one of {', '.join(VOCABS)}, got {vocab!r}")
    base, layers = _split(name)
    kwargs = dict(PRESETS[base])
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    if vocab == "byte":
        kwargs.update(vocab_size=BYTE_VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    return kwargs


def preset_config(name: str, vocab: str = "published"):
    """The `transformers.LlamaConfig` of preset `name` (see `preset_kwargs`); an unknown name lists the known ones."""
    from transformers import LlamaConfig

    return LlamaConfig(**preset_kwargs(name, vocab))


def lora_shapes(preset: str, rank: int = 8, targets: Sequence[str] = LORA_TARGETS) -> dict[str, tuple[int, int]]:
    """Shapes of the LoRA A/B tensors `model.attach_lora` would create on preset `preset`, named as
    `gradcodec.integrations.peft.lora_state` names them, computed from the preset table alone (no
    model, no transformers import).

    This is how 7B-scale payloads are sized on a machine that cannot hold the model, and what
    `gradcodec bench`'s LoRA workloads are shaped by. Under grouped-query attention k_proj and v_proj
    map to `num_key_value_heads * head_dim` outputs, fewer than q_proj's.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    c = preset_kwargs(preset)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    h, m = c["hidden_size"], c["intermediate_size"]
    io = {"q_proj": ("self_attn", h, q), "k_proj": ("self_attn", h, kv), "v_proj": ("self_attn", h, kv),
          "o_proj": ("self_attn", q, h), "gate_proj": ("mlp", h, m), "up_proj": ("mlp", h, m), "down_proj": ("mlp", m, h)}
    unknown = [t for t in targets if t not in io]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; LLaMA linear layers are {', '.join(io)}")
    shapes = {}
    for layer in range(c["num_hidden_layers"]):
        for target in targets:
            block, fan_in, fan_out = io[target]
            name = f"model.layers.{layer}.{block}.{target}"
            shapes[f"{name}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{name}.lora_B.weight"] = (fan_out, rank)
    return shapes
