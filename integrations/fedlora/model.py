"""Models of the reference federated app: preset or local-checkpoint LLaMA models, the pre-trained
CPU default, and LoRA attachment.

`pretrained_base()` is what the default app fine-tunes: the `tiny` preset, briefly pre-trained here on
generated data (no download) so that LoRA fine-tuning starts from a model that already knows something
and moves measurably within a small CPU budget. Its weights are cached on disk after the first call.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .dataset import TaskSizes, format_plain, format_prompt, generate_examples, pretraining_windows
from .presets import LORA_TARGETS, PRESETS, is_preset, lora_shapes, preset_config  # noqa: F401 - lora_shapes re-exported
from .tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer, HFTokenizer, Tokenizer
from .train import train_steps

def _is_preset(preset_or_path: str | os.PathLike) -> bool:
    """True for a preset name, False for an existing directory; anything else is an error worth explaining."""
    if is_preset(preset_or_path):
        return True
    if not os.path.isdir(preset_or_path):
        raise ValueError(f"{os.fspath(preset_or_path)!r} is neither a model preset ({', '.join(sorted(PRESETS))}) "
                         "nor an existing local checkpoint directory (nothing is downloaded)")
    return False


def build_model(preset_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                gradient_checkpointing: bool = False, seed: int = 0) -> torch.nn.Module:
    """A `LlamaForCausalLM` from a preset name (weights randomly initialised from `seed`, vocabulary sized
    for the byte tokenizer: `presets.preset_config(name, vocab="byte")`), or the causal-LM checkpoint
    saved in a local directory (loaded with `local_files_only=True`).

    Initialisation does not disturb torch's global random state. `gradient_checkpointing` trades
    compute for activation memory (non-reentrant, so it also works when the base weights are frozen, as
    under LoRA).
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if _is_preset(preset_or_path):
        config = preset_config(preset_or_path, vocab="byte")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if dtype == torch.float32:
                model = LlamaForCausalLM(config)
            else:  # initialised in `dtype` directly: no float32 copy of a 1B model on the way (4 GB)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(preset_or_path, local_files_only=True, dtype=dtype)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_tokenizer(preset_or_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer matching `build_model(preset_or_path)`: the byte tokenizer for a preset (whose
    vocabulary build_model sizes for it), the checkpoint's own tokenizer for a local directory."""
    if not _is_preset(preset_or_path):
        return HFTokenizer(preset_or_path)
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


@dataclasses.dataclass(frozen=True)
class PretrainRecipe:
    """How `pretrained_base` pre-trains: full-parameter AdamW on a packed corpus of generated tasks.

    The corpus (`dataset.pretraining_windows`) renders `corpus_examples` generated examples (seed
    `corpus_seed`, disjoint from the seeds the app draws train/eval data from) mostly as plain text and a
    `template_share` of them in the instruction template; the default size gives just enough windows
    for `steps * batch_size`, so no window repeats. The learning rate warms up linearly over
    `warmup_steps`, then follows a cosine down to `final_lr_fraction` of `lr`; Adam's beta2 is LLaMA's
    pre-training 0.95, which measurably helped this short run (vs. 0.999).
    """

    steps: int = 800
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 40
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    adam_beta2: float = 0.95
    corpus_examples: int = 90_000
    corpus_seed: int = 1_000_003
    template_share: float = 0.05
    sizes: TaskSizes = TaskSizes()

    def lr_multiplier(self, step: int) -> float:
        """The factor applied to `lr` at `step`: linear warm-up, then cosine decay."""
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * step / max(1, self.steps)))
        return warm * (self.final_lr_fraction + (1 - self.final_lr_fraction) * cosine)


_PRETRAIN_CODE_VERSION = 1  # bump when the pre-training loop changes in a way the recipe does not capture


def default_cache_dir() -> Path:
    """Where pre-trained bases are cached: `$GRADCODEC_CACHE` if set, else `~/.cache/gradcodec`."""
    return Path(os.environ.get("GRADCODEC_CACHE") or Path.home() / ".cache" / "gradcodec")


def pretrained_base(preset: str = "tiny", cache_dir: str | os.PathLike | None = None, seed: int = 0,
                    recipe: PretrainRecipe = PretrainRecipe(), progress: bool = False) -> torch.nn.Module:
    """The default base model: preset `preset` pre-trained on generated data by `recipe`, cached on disk.

    The first call trains (full-parameter) and writes `pretrained-<preset>-<key>.safetensors` to
    `cache_dir` (default `default_cache_dir()`); later calls load that file in well under a second.
    The key hashes the preset, seed, recipe and a sample of the generated corpus in both renderings, so
    changing any of them (or the data generator or prompt format) trains a new base, never loads a
    stale one.

    The corpus is mostly plain task text (`"Reverse the text. abc = cba"`), so the base learns the
    skills, and 5% instruction-template examples, so it has seen the format without having learned to
    use it: like a pre-trained LLM before instruction tuning, which is what LoRA fine-tuning then adds.
    With the default recipe `tiny` pre-trains in about 3 minutes on a 2-core CPU (docs/results.md).
    """
    if preset not in PRESETS or PRESETS[preset]["vocab_size"] != BYTE_VOCAB_SIZE:
        raise ValueError(f"pretrained_base pre-trains only the small byte-vocabulary presets "
                         f"({', '.join(p for p in PRESETS if PRESETS[p]['vocab_size'] == BYTE_VOCAB_SIZE)}), not {preset!r}; "
                         "a LLaMA-shape preset runs with random weights (fedtrain --no-pretrained)")
    sample = generate_examples(64, recipe.corpus_seed, sizes=recipe.sizes)
    digest = hashlib.sha256(json.dumps({
        "preset": PRESETS[preset], "seed": seed, "recipe": dataclasses.asdict(recipe), "code": _PRETRAIN_CODE_VERSION,
        "sample": [[format_plain(e), format_prompt(e), e["output"]] for e in sample],
    }, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"pretrained-{preset}-{digest[:16]}.safetensors"
    model = build_model(preset, seed=seed)
    if path.exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path))
        return model
    tokenizer = ByteTokenizer()
    corpus = pretraining_windows(generate_examples(recipe.corpus_examples, recipe.corpus_seed, sizes=recipe.sizes),
                                 tokenizer, recipe.seq_len, recipe.template_share, recipe.corpus_seed)
    train_steps(model, model.parameters(), corpus, tokenizer.pad_id, steps=recipe.steps, lr=recipe.lr,
                batch_size=recipe.batch_size, seed=seed, weight_decay=recipe.weight_decay,
                betas=(0.9, recipe.adam_beta2), lr_schedule=recipe.lr_multiplier, progress=progress,
                desc=f"pre-training the {preset} base (once)")
    _save_atomically(model, path)
    return model


def _save_atomically(model: torch.nn.Module, path: Path) -> None:
    """Write the weights under a temporary name, then rename, so concurrent runs never read a partial file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, partial)
    os.replace(partial, path)
