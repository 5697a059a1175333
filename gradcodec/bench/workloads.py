"""Tensors to benchmark codecs on: synthetic gradients, real LLaMA LoRA adapter shapes, or a saved file.

Synthetic workloads are seeded and shaped as 2-D matrices so low-rank codecs apply:
  gaussian   i.i.d. N(0, 1)
  heavy      Student-t with 3 degrees of freedom (gradient outliers)
  lowrank    a rank-8 matrix plus 10 % Gaussian noise (LoRA-update-like structure)
  lora7b     LLaMA-2-7B, rank-8 LoRA on q/k/v/o in 32 layers (8.4 M values, 32 MiB)
  lora1b     LLaMA-3.2-1B, rank-16 LoRA on all seven linear layers in 16 layers (11.3 M values, GQA 32/8)
  lora8b     LLaMA-3-8B, rank-16 LoRA on all seven linear layers in 32 layers (41.9 M values, 160 MiB)
  file:PATH  a tensor or dict of tensors saved with torch.save or safetensors, or a capture file
             (gradcodec.capture; file:PATH#i picks its round update i)

The LoRA workloads take their shapes from the model presets (`integrations/fedlora/presets.py`, the
published configs), and their values from LoRA's scales after some training: A factors N(0, 0.02²),
B factors N(0, 0.001²).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .. import capture
from ..codec import Tensors
from ..integrations.fedlora.presets import ALL_LINEAR, LORA_TARGETS, lora_shapes

# LoRA workload -> (model preset, rank, target projections)
LORA_WORKLOADS = {
    "lora7b": ("llama-2-7b", 8, LORA_TARGETS),
    "lora1b": ("llama-3.2-1b", 16, ALL_LINEAR),
    "lora8b": ("llama-3-8b", 16, ALL_LINEAR),
}
SYNTHETIC = ("gaussian", "heavy", "lowrank", *LORA_WORKLOADS)
SIZED = ("gaussian", "heavy", "lowrank")  # the workloads that --size applies to
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64K' -> 65536, '16M' -> 16777216, '1000' -> 1000."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G suffix")
    return int(float(m.group(1)) * 1024 ** " KMG".index(m.group(2).upper() or " "))


def parse_sizes(text: str) -> list[int]:
    """'64K,1M,16M' -> [65536, 1048576, 16777216]: a comma-separated list of parse_size items."""
    return [parse_size(item) for item in text.split(",")]


def _matrix_shape(n: int) -> tuple[int, int]:
    rows = 1 << max(0, (n.bit_length() - 1) // 2)
    return rows, -(-n // rows)


def lora_workload_shapes(name: str) -> dict[str, tuple[int, int]]:
    """Names and shapes of LoRA workload `name` (A: [r, fan_in], B: [fan_out, r]), from its preset."""
    preset, rank, targets = LORA_WORKLOADS[name]
    return lora_shapes(preset, rank, targets)


def make_workload(name: str, size: int, seed: int = 0, device: str = "cpu") -> Tensors:
    """The workload `name` with about `size` elements (the LoRA workloads and files have their own size)."""
    g = torch.Generator().manual_seed(seed)
    if name.startswith("file:"):
        return load_tensors(name[5:], device)
    if name in LORA_WORKLOADS:
        out = {}
        for key, shape in lora_workload_shapes(name).items():
            out[key] = (torch.randn(shape, generator=g) * (0.02 if key.endswith("lora_A.weight") else 1e-3)).to(device)
        return out
    rows, cols = _matrix_shape(size)
    if name == "gaussian":
        x = torch.randn(rows, cols, generator=g)
    elif name == "heavy":
        normal = torch.randn(rows, cols, generator=g)
        chi2 = torch.distributions.Chi2(torch.tensor(3.0)).sample((rows, cols))
        x = normal / torch.sqrt(chi2 / 3)
    elif name == "lowrank":
        u, v = torch.randn(rows, 8, generator=g), torch.randn(8, cols, generator=g)
        x = u @ v / math.sqrt(8) + 0.1 * torch.randn(rows, cols, generator=g)
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(SYNTHETIC)} or file:PATH")
    return x.to(device)


def load_tensors(path: str | Path, device: str = "cpu") -> Tensors:
    """A tensor or a dict of tensors from a torch.save or .safetensors file.

    A capture file (gradcodec.capture) gives one recorded round update: `PATH#i` picks record i
    (default 0).
    """
    path, _, index = str(path).partition("#")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"workload file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=device)
    obj = torch.load(path, map_location=device, weights_only=True)
    if capture.is_capture(obj):
        capture.check_records(obj, str(path))
        records = obj["records"]
        i = int(index or 0)
        if not 0 <= i < len(records):
            raise ValueError(f"{path} holds {len(records)} records; #{i} does not exist")
        return records[i]["update"]
    if isinstance(obj, torch.Tensor) or (isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())):
        return obj
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a tensor, a dict of tensors or a capture")
