"""Local training and evaluation of the reference federated app.

`local_train` is what one client runs in one federated round: a few AdamW steps on the LoRA parameters
over its own examples. `evaluate` measures what the codecs are compared on: the response loss and the
greedy-decoding exact-match accuracy, overall and per task category. Both are deterministic given their
inputs (and `seed`), and neither changes torch's global random state or thread settings.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import OPTIMIZERS
from .dataset import IGNORE_INDEX, Example, collate, format_prompt, tokenize_example
from .tokenizer import Tokenizer

Feature = dict[str, list[int]]


def _features(data: Sequence[Example | Feature], tokenizer: Tokenizer, max_length: int) -> list[Feature]:
    """Tokenised features of `data`, which holds examples (tokenised here) or already tokenised features."""
    return [d if "input_ids" in d else tokenize_example(d, tokenizer, max_length) for d in data]


def _token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of next-token cross-entropy over labelled positions, and per-row labelled-token counts."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"][:, 1:].to(device)
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


def train_steps(model: torch.nn.Module, params: Iterable[torch.nn.Parameter], features: Sequence[Feature],
                pad_id: int, *, steps: int, lr: float, batch_size: int, seed: int, weight_decay: float = 0.0,
                betas: tuple[float, float] = (0.9, 0.999), max_grad_norm: float | None = 1.0,
                lr_schedule: Callable[[int], float] | None = None, progress: bool = False,
                desc: str = "train", optimizer: str = "adamw") -> list[float]:
    """Run `steps` optimizer steps on `params` and return each step's loss (mean over the batch's labelled tokens).

    Batches are cut from a stream of seeded random permutations of `features`, so every batch has
    `batch_size` rows and every feature is seen once per pass. The optimizer (`OPTIMIZERS`) is fresh on
    each call, as a federated client's is at each round. `lr_schedule(step)`, if given, multiplies `lr`
    at each step.
    Full pre-training and LoRA fine-tuning both use this loop.
    """
    params = list(params)
    if not params:
        raise ValueError("no parameters to train")
    if not features:
        raise ValueError("cannot train on an empty dataset")
    if steps < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need steps >= 0, batch_size >= 1 and lr > 0; got {steps}, {batch_size}, {lr}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    losses = []
    device = params[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout, if the model has any
        for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            if lr_schedule is not None:
                for group in opt.param_groups:
                    group["lr"] = lr * lr_schedule(step)
            while len(order) < batch_size:
                order += torch.randperm(len(features), generator=generator).tolist()
            batch = collate([features[i] for i in order[:batch_size]], pad_id)
            del order[:batch_size]
            loss_sum, count = _token_losses(model, batch)
            loss = loss_sum.sum() / count.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            losses.append(loss.item())
    model.train(was_training)
    return losses


def local_train(model: torch.nn.Module, data: Sequence[Example | Feature], tokenizer: Tokenizer, *,
                steps: int | None = None, epochs: float | None = None, lr: float = 1e-3, batch_size: int = 16,
                seed: int = 0, max_length: int = 128, weight_decay: float = 0.0,
                max_grad_norm: float | None = 1.0, progress: bool = False, optimizer: str = "adamw") -> dict[str, float | int]:
    """Train the model's LoRA adapter with `optimizer` (AdamW or SGD) on `data`; give exactly one of `steps`, `epochs`.

    `data` holds examples (`dataset.generate_examples` / `load_instructions`) or features already made by
    `dataset.tokenize_example`. `epochs` may be fractional: it sets `ceil(epochs * len(data) / batch_size)`
    steps. Returns `loss` (mean of the step losses), `num_examples` (len(data), the usual FedAvg weight)
    and `steps`.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= or epochs=")
    if epochs is not None:
        if not epochs > 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        steps = math.ceil(epochs * len(data) / batch_size)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    not_lora = [n for n in trainable if "lora_" not in n]
    if not trainable or not_lora:
        found = f"not all LoRA (e.g. {not_lora[0]})" if not_lora else "none"
        raise ValueError(f"local_train trains a LoRA adapter only, but the model's trainable parameters are {found}; "
                         "wrap it with fedlora.model.attach_lora first")
    losses = train_steps(model, trainable.values(), _features(data, tokenizer, max_length), tokenizer.pad_id,
                         steps=steps, lr=lr, batch_size=batch_size, seed=seed, weight_decay=weight_decay,
                         max_grad_norm=max_grad_norm, progress=progress, desc="local train", optimizer=optimizer)
    return {"loss": sum(losses) / len(losses) if losses else float("nan"), "num_examples": len(data), "steps": steps}


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompts: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of `prompts` (left-padded into one batch, with a KV cache), each cut before its eos."""
    device = next(model.parameters()).device
    batch = collate([{"input_ids": p} for p in prompts], pad_id, padding_side="left")
    input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding must not shift the real tokens' positions
    out = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    cache = None
    for _ in range(max_new_tokens):
        result = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        cache = result.cache
        next_ids = result.logits[:, -1].argmax(dim=-1)
        done |= next_ids == eos_id
        for row, (token, finished) in enumerate(zip(next_ids.tolist(), done.tolist())):
            if not finished:
                out[row].append(token)
        if bool(done.all()):
            break
        input_ids = next_ids[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: Sequence[Example], tokenizer: Tokenizer, *, batch_size: int = 64,
             max_new_tokens: int = 16, max_length: int = 128, progress: bool = False) -> dict:
    """Response loss and exact-match accuracy of `model` on `examples`, overall and per category.

    The loss is the mean cross-entropy per response token (eos included), teacher-forced. Accuracy is
    the share of examples whose greedy answer (up to eos or `max_new_tokens`), stripped of surrounding
    whitespace, equals the stripped expected output. Returns `{"loss", "accuracy", "num_examples",
    "categories": {category: {"loss", "accuracy", "num_examples"}}}`.
    """
    if not examples:
        raise ValueError("cannot evaluate on an empty example list")
    was_training = model.training
    model.eval()
    stats: dict[str, list[float]] = {}  # category -> [loss sum, token count, correct, examples]
    for start in tqdm(range(0, len(examples), batch_size), desc="evaluate", disable=not progress, leave=False):
        chunk = examples[start:start + batch_size]
        loss_sum, count = _token_losses(model, collate(_features(chunk, tokenizer, max_length), tokenizer.pad_id))
        prompts = [tokenizer.encode(format_prompt(e), add_bos=True)[:max_length] for e in chunk]
        answers = _greedy(model, prompts, tokenizer.pad_id, tokenizer.eos_id, max_new_tokens)
        for e, ls, c, answer in zip(chunk, loss_sum.tolist(), count.tolist(), answers):
            s = stats.setdefault(e["category"], [0.0, 0, 0, 0])
            s[0] += ls
            s[1] += c
            s[2] += tokenizer.decode(answer).strip() == e["output"].strip()
            s[3] += 1
    model.train(was_training)

    def summary(loss_sum: float, tokens: int, correct: int, n: int) -> dict:
        return {"loss": loss_sum / tokens if tokens else float("nan"), "accuracy": correct / n, "num_examples": n}

    totals = [sum(s[i] for s in stats.values()) for i in range(4)]
    return {**summary(*totals), "categories": {c: summary(*s) for c, s in sorted(stats.items())}}
