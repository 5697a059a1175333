"""Model presets of the reference federated app: preset name -> `transformers.LlamaConfig` keyword arguments.

`tiny` is the CPU default: small enough to pre-train and LoRA-fine-tune in minutes on two cores, yet a
real LLaMA block stack (RMSNorm, RoPE, SwiGLU, grouped-query attention with 2 KV heads per 4 query
heads), so the LoRA tensors the codecs see have the same structure as on a real checkpoint. Its
vocabulary is the byte tokenizer's (`tokenizer.BYTE_VOCAB_SIZE`), which is why it needs no downloaded
tokenizer. `llama-7b` is the published LLaMA-7B shape, for shape-only uses such as sizing 7B-scale LoRA
payloads; it is never instantiated by the tests.
"""
from __future__ import annotations

from typing import Any

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
    "llama-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def preset_config(name: str):
    """The `transformers.LlamaConfig` of preset `name`; an unknown name lists the known ones."""
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return LlamaConfig(**PRESETS[name])
