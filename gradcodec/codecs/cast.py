"""Lossless raw bytes and the fp16 / bf16 casts.

    x ──▶ (cast to fp16 | bf16 | keep) ──▶ one section ──▶ cast back to x's dtype

Error bounds (for finite inputs in the target's normal range): fp16 keeps 11 significant bits,
|x - x̂| <= 2^-11 |x| for 2^-14 <= |x| <= 65504, and |x - x̂| <= 2^-25 below that (subnormals);
bf16 keeps 8 bits, |x - x̂| <= 2^-8 |x| over fp32's range. Values a cast would turn into Inf are
refused with InvalidInput rather than sent as Inf.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import CorruptPayload, InvalidInput
from ..registry import register
from .base import EncodeContext, QuantizerStage, all_finite, check_section, check_section_count, numel


@register("raw")
class Raw(QuantizerStage):
    """The tensor's own bytes, bit-exact, in its own dtype (floats, integers, bool)."""

    lossless = True

    def n_sections(self, shape):
        return 1

    def encode(self, x, ctx):
        return [x.reshape(-1)]

    def decode(self, sections, shape):
        check_section_count(sections, 1, "raw tensor")
        s = sections[0]
        if s.numel() != numel(shape):
            raise CorruptPayload(f"raw section holds {s.numel()} elements, the tensor needs {numel(shape)}")
        return s.reshape(shape)


class _Cast(QuantizerStage):
    dtype: ClassVar[torch.dtype]

    def n_sections(self, shape):
        return 1

    def encode(self, x: torch.Tensor, ctx: EncodeContext):
        y = x.reshape(-1).to(self.dtype)
        if not all_finite(y):
            raise InvalidInput(
                f"tensor {ctx.name!r} has values outside the {self.name} range (max {torch.finfo(self.dtype).max:g});"
                " scale the update or use bf16/int8"
            )
        return [y]

    def decode(self, sections, shape):
        return check_section(sections, 0, self.dtype, numel(shape), f"{self.name} tensor").reshape(shape)


@register("fp16")
class Fp16(_Cast):
    """Cast to IEEE half precision: 16 bits per element."""

    dtype = torch.float16


@register("bf16")
class Bf16(_Cast):
    """Cast to bfloat16: 16 bits per element, fp32's exponent range."""

    dtype = torch.bfloat16
