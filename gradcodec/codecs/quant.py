"""Blockwise absmax quantisation to int8 and int4.

    x ──▶ blocks of `block` values ──▶ scale = absmax / QMAX ──▶ code = round(x / scale) ──▶ codes, scales

QMAX is 127 (int8) or 7 (int4, two codes per byte). Bits per element: 8 + 32/block (int8) and
4 + 32/block (int4); at the default block of 64, 8.5 and 4.5.

Error bound: round to nearest gives |x - x̂| <= scale/2 for every element of a block (up to fp32
rounding); stochastic rounding (`stochastic=true`) gives |x - x̂| < scale and E[x̂] = x over the
seed, i.e. it is unbiased. The kernels live in gradcodec.kernels (Triton on CUDA, PyTorch
elsewhere); with error feedback one fused pass reads x and the residual and writes codes, scales
and the new residual.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .. import kernels
from ..errors import CorruptPayload, InvalidInput
from ..registry import register
from .base import EncodeContext, QuantizerStage, check_section, numel, power_of_two_block


MAX_SCALE = 2.0**120


class _Blockwise(QuantizerStage):
    bits: ClassVar[int]
    checks_finite = True

    def __init__(self, block: int = 64, stochastic: bool = False):
        power_of_two_block(block)
        self.block = block
        self.stochastic = stochastic

    def wire_params(self):
        return {"block": self.block}

    def n_sections(self, shape):
        return 2

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1).float() if x.dtype == torch.float64 else x.reshape(-1)

    def _checked(self, codes, scales, ctx: EncodeContext):
        # one comparison catches NaN and Inf (whose block scales are non-finite) and values so large
        # that code * scale could round past the fp32 maximum on decode
        if scales.numel() and not bool((scales < MAX_SCALE).all()):
            raise InvalidInput(
                f"tensor {ctx.name!r} contains NaN or Inf (or values beyond ±1e36); {self.name} cannot encode it"
            )
        return [codes, scales]

    def encode(self, x, ctx):
        seed = ctx.next_seed() if self.stochastic else None
        return self._checked(*kernels.quantize_blockwise(self._flat(x), self.bits, self.block, seed), ctx)

    def encode_feedback(self, x, residual, ctx):
        seed = ctx.next_seed() if self.stochastic else None
        out = kernels.quantize_blockwise_feedback(self._flat(x), residual.view(-1), self.bits, self.block, seed)
        return self._checked(*out, ctx)

    def decode(self, sections, shape):
        n = numel(shape)
        what = f"{self.name} tensor"
        code_dtype, code_count = (torch.int8, n) if self.bits == 8 else (torch.uint8, (n + 1) // 2)
        codes = check_section(sections, 0, code_dtype, code_count, what)
        scales = check_section(sections, 1, torch.float32, -(-n // self.block), what)
        if scales.numel() and not bool((torch.isfinite(scales) & (scales >= 0)).all()):
            raise CorruptPayload(f"{what}: block scales must be finite and non-negative")
        return kernels.dequantize_blockwise(codes, scales, self.bits, self.block, n).view(shape)


@register("int8")
class Int8(_Blockwise):
    """Blockwise absmax int8: 8 bits per element plus one fp32 scale per block."""

    bits = 8


@register("int4")
class Int4(_Blockwise):
    """Blockwise absmax int4, two codes per byte: 4 bits per element plus one fp32 scale per block."""

    bits = 4
