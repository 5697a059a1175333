"""The stage interface that every per-tensor codec family implements.

A pipeline spec such as "topk:ratio=0.01|int8|zstd" is a chain of stages:

    x ──▶ [transform]* ──▶ quantizer ──▶ sections ──▶ (wire) ──▶ optional zstd over the payload

* a *transform* (top-k, random-k, PowerSGD) turns a tensor into sections of its own (indices, a
  seed) plus smaller float tensors that it hands to the next stage (`inner`);
* a *quantizer* (raw, fp16, bf16, int8, int4, qsgd, sign) turns a float tensor into sections;
* the byte stage (zstd) is applied by the wire layer to the whole payload.

Stages see one tensor at a time, flattened or with its shape, and never bytes: sections are flat
typed tensors that gradcodec.wire serialises.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from ..errors import CorruptPayload, InvalidInput


@dataclass
class EncodeContext:
    """Per-tensor facts a stage may need while encoding: the tensor's name and fresh random seeds."""

    name: str
    generator: torch.Generator = field(default_factory=torch.Generator)

    def next_seed(self) -> int:
        """A fresh 32-bit seed from the codec's generator (reproducible when the codec is seeded)."""
        return int(torch.randint(0, 2**31 - 1, (), generator=self.generator))


class Stage(ABC):
    """One step of a pipeline. Subclasses register with `gradcodec.registry.register`.

    Constructor parameters are the stage's spec parameters; `wire_params` returns those the decoder
    needs, which the canonical spec (and so every payload) records explicitly.
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # "transform" or "quantizer"
    lossless: ClassVar[bool] = False
    # True when encode() itself raises InvalidInput on NaN/Inf (cheaply, e.g. from block scales),
    # so the pipeline can skip its separate finiteness pass.
    checks_finite: ClassVar[bool] = False

    def wire_params(self) -> dict[str, Any]:
        """Parameters that decoding depends on, written into the payload's codec spec."""
        return {}

    @abstractmethod
    def n_sections(self, shape: tuple[int, ...]) -> int:
        """How many sections `encode` produces for a tensor of `shape` (the decoder relies on it)."""

    @abstractmethod
    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> list[torch.Tensor]:
        """Sections that represent `x` (any float dtype, contiguous)."""

    @abstractmethod
    def decode(self, sections: Sequence[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor of `shape` that `sections` represent (float32, or the dtype stored losslessly)."""

    def encode_feedback(self, x: torch.Tensor, residual: torch.Tensor, ctx: EncodeContext) -> list[torch.Tensor]:
        """Encode x + residual and leave in `residual` (float32, in place) what the decoder will miss.

        The default encodes, then decodes to measure the loss; stages with a fused kernel override it.
        """
        e = x.float() + residual.view(x.shape)
        sections = self.encode(e, ctx)
        # not in place on e: a section may alias it (raw float32 behind the lossy dp pre-pass)
        torch.sub(e, self.decode(sections, tuple(x.shape)).to(e.device), out=residual.view(x.shape))
        return sections

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Client-side state kept between encodes (e.g. PowerSGD's warm-start factors)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise InvalidInput(f"stage {self.name!r} keeps no state but was given {sorted(state)[:3]}")


class TransformStage(Stage):
    """A stage that hands smaller float tensors to `inner` (the rest of the pipeline)."""

    kind = "transform"
    inner: Stage

    def __init__(self, inner: Stage):
        self.inner = inner


class QuantizerStage(Stage):
    """A terminal stage: float tensor -> sections."""

    kind = "quantizer"


def check_section(sections: Sequence[torch.Tensor], i: int, dtype: torch.dtype, count: int, what: str) -> torch.Tensor:
    """Section `i`, verified to hold `count` elements of `dtype`; CorruptPayload otherwise."""
    if i >= len(sections):
        raise CorruptPayload(f"{what}: section {i} missing (payload has {len(sections)})")
    s = sections[i]
    if s.dtype != dtype or s.numel() != count:
        raise CorruptPayload(f"{what}: section {i} holds {s.numel()} × {s.dtype}, expected {count} × {dtype}")
    return s


def check_section_count(sections: Sequence[torch.Tensor], expected: int, what: str) -> None:
    if len(sections) != expected:
        raise CorruptPayload(f"{what}: payload has {len(sections)} sections, the codec expects {expected}")


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of a float tensor is finite: one reduction pass, nothing allocated.

    min and max propagate NaN and are ±Inf when any element is, so both are finite exactly when every
    element is. (torch.isfinite(t).all() allocates an |x| copy and two masks, 1.75x a float32 input;
    checking it chunk by chunk costs hundreds of small ops, which stall when the CPUs are shared.)
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def require(condition: bool, message: str) -> None:
    """Validate a stage parameter; the registry turns this into InvalidInput or CorruptPayload."""
    if not condition:
        raise InvalidInput(message)


def power_of_two_block(block: int, lo: int = 8, hi: int = 4096) -> None:
    require(lo <= block <= hi and block & (block - 1) == 0, f"block must be a power of two in [{lo}, {hi}], got {block}")
