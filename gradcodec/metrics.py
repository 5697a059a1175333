"""Distortion measures between an update and its decoded version, used by every benchmark and report.

All are computed in float64 over every element of every tensor (a dict counts as one long vector),
so figures for a LoRA adapter describe the whole upload.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .codec import Tensors


def _flat(x: Tensors) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1).double().cpu()
    if not x:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).double().cpu() for _, t in sorted(x.items())])


def distortion(x: Tensors, x_hat: Tensors) -> dict[str, float]:
    """rel_l2, cosine, snr_db and max_abs between `x` and its reconstruction `x_hat`.

    rel_l2 = ||x - x̂|| / ||x||; snr_db = 10 log10(||x||² / ||x - x̂||²) (standard SNR, not the
    CG-FedLLM paper's energy / per-element MSE, which grows with the element count); cosine is 0 when
    either side is all zeros.
    """
    if isinstance(x, Mapping) != isinstance(x_hat, Mapping) or (
        isinstance(x, Mapping) and set(x) != set(x_hat)
    ):
        raise ValueError("x and x_hat must be the same kind with the same names")
    a, b = _flat(x), _flat(x_hat)
    if a.shape != b.shape:
        raise ValueError(f"x has {a.numel()} elements but x_hat has {b.numel()}")
    err = a - b
    energy, err_energy = float(a @ a), float(err @ err)
    denom = math.sqrt(energy * float(b @ b))
    return {
        "rel_l2": math.sqrt(err_energy / energy) if energy else (0.0 if err_energy == 0 else math.inf),
        "cosine": float(a @ b) / denom if denom else 0.0,
        "snr_db": 10 * math.log10(energy / err_energy) if err_energy else math.inf,
        "max_abs": float(err.abs().max()) if err.numel() else 0.0,
    }


def numel(x: Tensors) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else sum(t.numel() for t in x.values())


def nbytes(x: Tensors) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(t.numel() * t.element_size() for t in x.values())
