"""Blockwise absmax quantisation at every width from 1 to 8 bits: int1 ... int8.

    x ──▶ blocks of `block` values ──▶ scale = absmax / QMAX ──▶ level q = round(x / scale) ──▶ codes, scales

x̂ = q · scale. For b >= 2 bits the levels are the integers in [-QMAX, QMAX], QMAX = 2^(b-1) - 1
(int8: 127, int4: 7, int2: 1, i.e. ternary); int8 codes travel as int8, the other widths as the
fields q + 2^(b-1) packed densely, b bits each (int4: two per byte, low nibble first). One bit has the
two levels q = ±1/2 of the step `scale`: round to nearest uses scale = absmax (x̂ = ±absmax/2, the
two-level grid with the smallest worst-case error over [-absmax, absmax]); stochastic rounding uses
scale = 2·absmax (x̂ = ±absmax, the narrowest grid that can be unbiased there). The decoder needs
neither the rounding mode nor the width's rule: x̂ = q · scale.

Bits per element: b + 32/block; at the default block of 64, b + 0.5 (int1 1.5, int2 2.5, ... int8 8.5).

Error bound, the same for every width with `scale` the block's stored step: round to nearest gives
|x - x̂| <= scale/2 for every element of a block (up to fp32 rounding), i.e. absmax/(2·QMAX), or
absmax/2 at one bit; stochastic rounding (`stochastic=true`) gives |x - x̂| < scale and E[x̂] = x over
the seed, i.e. it is unbiased (one bit: |x - x̂| < 2·absmax). The absmax grid spends its levels on the
block's extremes: at one bit round to nearest has relative error ≈ 0.80 on Gaussian data, where
`sign` (levels ±mean |x|) has 0.60 at fewer bits; int1 is there for its unbiased stochastic form and
for the byte budget (gradcodec.codecs.budget).

The kernels live in gradcodec.kernels (Triton on CUDA, PyTorch elsewhere); with error feedback one
fused pass reads x and the residual and writes codes, scales and the new residual.
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
        code_dtype = torch.int8 if self.bits == 8 else torch.uint8
        codes = check_section(sections, 0, code_dtype, kernels.code_count(n, self.bits), what)
        scales = check_section(sections, 1, torch.float32, -(-n // self.block), what)
        if scales.numel() and not bool((torch.isfinite(scales) & (scales >= 0)).all()):
            raise CorruptPayload(f"{what}: block scales must be finite and non-negative")
        return kernels.dequantize_blockwise(codes, scales, self.bits, self.block, n).view(shape)


def _width(bits: int) -> type[_Blockwise]:
    cls = type(f"Int{bits}", (_Blockwise,), {
        "bits": bits,
        "__module__": __name__,
        "__doc__": f"Blockwise absmax to {bits} bit{'s' * (bits > 1)} per element plus one fp32 scale per block.",
    })
    return register(f"int{bits}")(cls)


BLOCKWISE = {bits: _width(bits) for bits in kernels.WIDTHS}  # bits -> stage class registered as int<bits>
Int8, Int4 = BLOCKWISE[8], BLOCKWISE[4]
