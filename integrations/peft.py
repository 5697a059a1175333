"""LoRA adapters as named tensors, and the FedAvg of adapters: the bridge between PEFT models and codecs.

Codecs and the federated server handle plain `dict[str, Tensor]`; this module turns a PEFT model's
LoRA A/B matrices into such a dict and back. Names are the module path plus `.lora_A.weight` /
`.lora_B.weight` (e.g. `model.layers.0.self_attn.q_proj.lora_A.weight`), without PEFT's
`base_model.model.` wrapper prefix or the adapter's name, so two models with the same architecture and
LoRA targets produce the same names whatever their adapters are called.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from peft.tuners.lora import LoraLayer

_WRAPPER_PREFIX = "base_model.model."


def _active_adapter(model: torch.nn.Module, adapter_name: str | None) -> str:
    if adapter_name is not None:
        return adapter_name
    for module in model.modules():
        if isinstance(module, LoraLayer):
            active = module.active_adapters
            if len(active) != 1:
                raise ValueError(f"the model has {len(active)} active LoRA adapters ({active}); name one with adapter_name=")
            return active[0]
    raise ValueError("the model has no LoRA layers; attach an adapter first (e.g. fedlora.model.attach_lora)")


def _lora_parameters(model: torch.nn.Module, adapter_name: str | None) -> dict[str, torch.nn.Parameter]:
    """The adapter's A and B weights under normalised names, refusing adapters with other trainable tensors."""
    adapter = _active_adapter(model, adapter_name)
    found: dict[str, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            name = module_name.removeprefix(_WRAPPER_PREFIX)
            found[f"{name}.lora_A.weight"] = module.lora_A[adapter].weight
            found[f"{name}.lora_B.weight"] = module.lora_B[adapter].weight
    if not found:
        raise ValueError(f"the model has no LoRA layers for adapter {adapter!r}")
    covered = {id(p) for p in found.values()}
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if others:
        raise ValueError(f"the model trains {len(others)} tensors besides the LoRA A/B matrices (e.g. {others[0]}); "
                         "lora_state only carries A and B, so use plain LoRA (no DoRA, bias or modules_to_save)")
    return found


def lora_state(model: torch.nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The LoRA A/B tensors of `model`'s adapter (the active one by default) as detached CPU float32 copies."""
    return {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in _lora_parameters(model, adapter_name).items()}


def _check_same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    missing, extra = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    if missing or extra:
        raise ValueError(f"{what}: tensor names differ; missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    wrong = [f"{k}: {tuple(b[k].shape)} instead of {tuple(a[k].shape)}" for k in a if a[k].shape != b[k].shape]
    if wrong:
        raise ValueError(f"{what}: {len(wrong)} tensors have the wrong shape, e.g. {wrong[0]}")


def load_lora_state(model: torch.nn.Module, named: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
    """Copy `named` (as `lora_state` returns it) into `model`'s adapter, in place, keeping the model's dtype/device.

    The names and shapes must match the adapter's exactly (a ValueError lists the differences), so an
    adapter for another architecture, rank or target set is never half-loaded.
    """
    params = _lora_parameters(model, adapter_name)
    _check_same_layout({k: p.detach() for k, p in params.items()}, named, "loading LoRA state")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(named[name])


def lora_delta(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state - base`, tensor by tensor: the update a client sends after training from `base`."""
    _check_same_layout(base, state, "lora_delta")
    return {k: state[k] - base[k] for k in base}


def apply_delta(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base + delta`, tensor by tensor: the inverse of `lora_delta`."""
    _check_same_layout(base, delta, "apply_delta")
    return {k: base[k] + delta[k] for k in base}


def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of each named tensor over `states` (weights are usually client example counts).

    A and B are averaged separately, as FedIT and Shepherd do. Note that the product of the averages is
    not the average of the products: mean(B_i) @ mean(A_i) != mean(B_i @ A_i) in general, so the averaged
    adapter is not the average of the clients' weight updates. Accumulates in float64 and returns each
    tensor in the first state's dtype. Refuses mismatched names or shapes, negative or non-finite
    weights, and a total weight that is not positive.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state and at least one state; got {len(states)} states, {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    total = math.fsum(weights)
    if not total > 0:
        raise ValueError(f"the weights sum to {total}; at least one must be positive")
    for i, state in enumerate(states[1:], 1):
        _check_same_layout(states[0], state, f"fedavg, state {i} against state 0")
    return {k: sum(s[k].to(torch.float64) * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype)
            for k in states[0]}
