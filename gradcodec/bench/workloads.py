"""Tensors to benchmark codecs on: synthetic gradients, the LLaMA-7B LoRA shape, or a saved file.

Synthetic workloads are seeded and shaped as 2-D matrices so low-rank codecs apply:
  gaussian   i.i.d. N(0, 1)
  heavy      Student-t with 3 degrees of freedom (gradient outliers)
  lowrank    a rank-8 matrix plus 10 % Gaussian noise (LoRA-update-like structure)
  lora7b     a dict shaped like a LLaMA-7B rank-8 LoRA adapter on q/k/v/o in 32 layers (8.4M values)
  file:PATH  a tensor or dict of tensors saved with torch.save or safetensors, or a capture file
             (gradcodec.capture; file:PATH#i picks its round update i)
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .. import capture
from ..codec import Tensors

SYNTHETIC = ("gaussian", "heavy", "lowrank", "lora7b")
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


def lora7b_shapes(rank: int = 8, layers: int = 32, hidden: int = 4096) -> dict[str, tuple[int, int]]:
    """Names and shapes of a LLaMA-7B LoRA adapter (A: [r, d], B: [d, r]) on q/k/v/o projections."""
    shapes = {}
    for layer in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            prefix = f"model.layers.{layer}.self_attn.{proj}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, hidden)
            shapes[f"{prefix}.lora_B.weight"] = (hidden, rank)
    return shapes


def make_workload(name: str, size: int, seed: int = 0, device: str = "cpu") -> Tensors:
    """The workload `name` with about `size` elements (lora7b and files have their own size)."""
    g = torch.Generator().manual_seed(seed)
    if name.startswith("file:"):
        return load_tensors(name[5:], device)
    if name == "lora7b":
        out = {}
        for key, shape in lora7b_shapes().items():
            out[key] = torch.randn(shape, generator=g) * (0.02 if key.endswith("lora_A.weight") else 1e-3)
        return {k: v.to(device) for k, v in out.items()}
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
