"""Models of the reference federated app: preset or local-checkpoint LLaMA models, the pre-trained
CPU default, and LoRA attachment.

`pretrained_base()` is what the default app fine-tunes: the `tiny` preset, briefly pre-trained here on
generated data (no download) so that LoRA fine-tuning starts from a model that already knows something
and moves measurably within a small CPU budget. Its weights are cached on disk after the first call.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .presets import PRESETS, preset_config
from .tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer, HFTokenizer, Tokenizer

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _is_preset(preset_or_path: str | os.PathLike) -> bool:
    if isinstance(preset_or_path, str) and preset_or_path in PRESETS:
        return True
    if not os.path.isdir(preset_or_path):
        raise ValueError(f"{os.fspath(preset_or_path)!r} is neither a model preset ({', '.join(sorted(PRESETS))}) "
                         "nor an existing local checkpoint directory (nothing is downloaded)")
    return False


def build_model(preset_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                gradient_checkpointing: bool = False, seed: int = 0) -> torch.nn.Module:
    """A `LlamaForCausalLM` from a preset name (weights randomly initialised from `seed`), or the causal-LM
    checkpoint saved in a local directory (loaded with `local_files_only=True`).

    Initialisation does not disturb torch's global random state. `gradient_checkpointing` trades
    compute for activation memory (non-reentrant, so it also works when the base weights are frozen).
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if _is_preset(preset_or_path):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(preset_config(preset_or_path)).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(preset_or_path, local_files_only=True, dtype=dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_tokenizer(preset_or_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer matching `build_model(preset_or_path)`: the byte tokenizer for a preset sized for it,
    the checkpoint's own tokenizer for a local directory."""
    if not _is_preset(preset_or_path):
        return HFTokenizer(preset_or_path)
    if PRESETS[preset_or_path]["vocab_size"] != BYTE_VOCAB_SIZE:
        raise ValueError(f"preset {preset_or_path!r} has a {PRESETS[preset_or_path]['vocab_size']}-token vocabulary, "
                         "not the byte tokenizer's; it is for shape-only uses, or load a checkpoint directory")
    return ByteTokenizer()


def attach_lora(model: torch.nn.Module, rank: int = 8, alpha: float = 16, targets: Sequence[str] = LORA_TARGETS,
                dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    """Wrap `model` in a PEFT LoRA adapter on the `targets` linear layers; only the adapter stays trainable.

    The adapter's initial A matrices are drawn from `seed` (B starts at zero, so the wrapped model
    computes exactly what `model` did), without disturbing torch's global random state.
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft probes a transformers attribute that transformers has deprecated; nothing for a caller to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def lora_shapes(preset: str, rank: int = 8, targets: Sequence[str] = LORA_TARGETS) -> dict[str, tuple[int, int]]:
    """Shapes of the LoRA A/B tensors `attach_lora` would create on preset `preset`, named as
    `gradcodec.integrations.peft.lora_state` names them, computed from the config without building the model.

    This is how 7B-scale payloads are sized on a machine that cannot hold the model.
    """
    config = preset_config(preset)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    h, m = config.hidden_size, config.intermediate_size
    io = {"q_proj": ("self_attn", h, q), "k_proj": ("self_attn", h, kv), "v_proj": ("self_attn", h, kv),
          "o_proj": ("self_attn", q, h), "gate_proj": ("mlp", h, m), "up_proj": ("mlp", h, m), "down_proj": ("mlp", m, h)}
    unknown = [t for t in targets if t not in io]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; LLaMA linear layers are {', '.join(io)}")
    shapes = {}
    for layer in range(config.num_hidden_layers):
        for target in targets:
            block, fan_in, fan_out = io[target]
            name = f"model.layers.{layer}.{block}.{target}"
            shapes[f"{name}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{name}.lora_B.weight"] = (fan_out, rank)
    return shapes
