"""The LoRA canvas: the named A/B factors of an adapter laid out as one 2-D matrix, and back.

CG-FedLLM feeds its AutoEncoder one image per upload: for LLaMA-7B (hidden 4096, rank 8, q/k/v/o in
32 layers) a [4096, 2048] canvas holding, for each layer and projection, Aᵀ (4096 x r) and B (4096 x r)
side by side. `CanvasLayout` generalises that to any adapter, using only the names and shapes of its
tensors, so a decoder rebuilds the layout from a payload's tensor table:

* every tensor is a 2-D factor; it is stood on its long side: a [r, L] tensor (LoRA A) is transposed,
  an [L, r] one (LoRA B) is not; r may differ between factors (any rank);
* the canvas height H is the most common long side (ties: the larger), which is the hidden size for
  q/k/v/o adapters; a factor longer than H is folded into ceil(L / H) column blocks of H rows (MLP
  targets), and a shorter one is zero-padded at the bottom. Grouped-query attention is the short case:
  k/v B factors of 64 rows in a 128-row canvas are padded (12.5 % of the tiny preset's canvas). We
  pad rather than build one canvas per shape because one canvas keeps one AE and one latent, and the
  padding costs only AE input area, never payload bytes;
* factors follow in the tensor table's order, each taking `folds * r` columns.

The mapping is exact: `adapter_from_lora_canvas(lora_canvas_from_adapter(x))` returns x bit for bit.
The codec's normalised packing (per-factor scales, error feedback) is the kernel op
`gradcodec.kernels.canvas_pack`, which follows the same layout (`CanvasLayout.table`).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .. import kernels
from ..errors import InvalidInput


@dataclass(frozen=True)
class Factor:
    """One tensor on the canvas: its columns [column, column + folds * rank)."""

    name: str
    shape: tuple[int, int]
    transposed: bool  # the canvas holds the tensor's transpose (LoRA A, [r, L])
    length: int  # L, its long side: rows in canvas orientation
    rank: int  # r, its short side: columns per fold
    column: int
    folds: int  # ceil(L / height) column blocks of `height` rows

    @property
    def numel(self) -> int:
        return self.length * self.rank


@dataclass(frozen=True)
class CanvasLayout:
    """Where each named factor sits on a [height, width] canvas (see the module docstring)."""

    height: int
    factors: tuple[Factor, ...]

    @classmethod
    def for_shapes(cls, shapes: Mapping[str, Sequence[int]], height: int | None = None) -> "CanvasLayout":
        """The layout of tensors with these names and shapes, in this order; `height` overrides H."""
        if not shapes:
            raise InvalidInput("the LoRA canvas needs at least one tensor")
        dims = {}
        for name, shape in shapes.items():
            shape = tuple(int(d) for d in shape)
            if len(shape) != 2 or min(shape) < 1:
                raise InvalidInput(
                    f"the LoRA canvas takes non-empty 2-D factors (LoRA A [r, d] and B [d, r]); {name!r} has shape {shape}"
                )
            dims[name] = shape
        if height is None:
            counts = Counter(max(s) for s in dims.values())
            height = max(counts, key=lambda length: (counts[length], length))
        if height < 1:
            raise InvalidInput(f"canvas height must be positive, got {height}")
        factors, column = [], 0
        for name, shape in dims.items():
            transposed = shape[0] < shape[1]
            length, rank = (shape[1], shape[0]) if transposed else shape
            folds = -(-length // height)
            factors.append(Factor(name, shape, transposed, length, rank, column, folds))
            column += folds * rank
        return cls(height, tuple(factors))

    @classmethod
    def of(cls, named: Mapping[str, torch.Tensor], height: int | None = None) -> "CanvasLayout":
        return cls.for_shapes({k: tuple(v.shape) for k, v in named.items()}, height)

    @property
    def width(self) -> int:
        last = self.factors[-1]
        return last.column + last.folds * last.rank

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def numel(self) -> int:
        """Values the factors hold (the canvas minus its padding)."""
        return sum(f.numel for f in self.factors)

    @property
    def padding_fraction(self) -> float:
        return 1 - self.numel / (self.height * self.width)

    def digest(self) -> str:
        """sha256 of height, names and shapes: an AE trained on one layout refuses another."""
        text = json.dumps([self.height, [[f.name, list(f.shape)] for f in self.factors]], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 [factors, 4]: (length, rank, transposed, column) per factor, the kernels' view of the layout."""
        rows = [[f.length, f.rank, int(f.transposed), f.column] for f in self.factors]
        return torch.tensor(rows, dtype=torch.int64, device=device)

    def check(self, named: Mapping[str, torch.Tensor]) -> None:
        """Raise InvalidInput unless `named` has exactly this layout's names, order and shapes."""
        got = [(k, tuple(v.shape)) for k, v in named.items()]
        want = [(f.name, f.shape) for f in self.factors]
        if got != want:
            diff = next((f"{g} instead of {w}" for g, w in zip(got, want) if g != w), f"{len(got)} tensors instead of {len(want)}")
            raise InvalidInput(f"the tensors do not match the canvas layout: {diff}")


def lora_canvas_from_adapter(named: Mapping[str, torch.Tensor], layout: CanvasLayout | None = None) -> torch.Tensor:
    """The adapter's factors on one float32 [height, width] canvas (zeros where nothing sits), unscaled."""
    layout = layout or CanvasLayout.of(named)
    layout.check(named)
    tensors = list(named.values())
    device = tensors[0].device
    ones = torch.ones(len(tensors), dtype=torch.float32, device=device)
    return kernels.canvas_pack(layout.table(device), tensors, layout.height, layout.shape, scales=ones)[0]


def adapter_from_lora_canvas(canvas: torch.Tensor, layout: CanvasLayout) -> dict[str, torch.Tensor]:
    """The inverse of lora_canvas_from_adapter: float32 tensors named and shaped as the layout says."""
    if canvas.dim() != 2 or canvas.shape[0] < layout.height or canvas.shape[1] < layout.width:
        raise InvalidInput(f"canvas of shape {tuple(canvas.shape)} is smaller than the layout's {layout.shape}")
    outputs = [torch.empty(f.shape, dtype=torch.float32, device=canvas.device) for f in layout.factors]
    ones = torch.ones(len(outputs), dtype=torch.float32, device=canvas.device)
    kernels.canvas_unpack(layout.table(canvas.device), canvas.float().contiguous(), ones, layout.height, outputs)
    return {f.name: t for f, t in zip(layout.factors, outputs)}


def padded_shape(shape: tuple[int, int], multiple: int) -> tuple[int, int]:
    """`shape` rounded up to a multiple of `multiple` in both dimensions (the conv AE's input size)."""
    return tuple(math.ceil(d / multiple) * multiple for d in shape)
