"""Scaled sign (1-bit) quantisation, as in signSGD / EF-SignSGD (Karimireddy et al. 2019).

    x ──▶ blocks of `block` values ──▶ scale = mean |x| of the block ──▶ bit = (x >= 0) ──▶ bits, scales

x̂ = +scale for a set bit, -scale otherwise. Bits per element: 1 + 32/block; at the default block of
256, 1.125 (a 28x compression of fp32, 14x of bf16).

Error: for a block v of d values, mean |v| is the scale that minimises ||v - s·sign(v)||², and

    ||v - v̂||² = ||v||² - ||v||_1² / d   (exactly, up to fp32 rounding)

so the codec preserves every sign and every block's L1 norm, and is a contraction
(||v - v̂||² <= (1 - 1/d) ||v||²). It is biased and deterministic: x̂ - x is the bias itself, e.g. a
block's large values are shrunk and its small ones inflated to the block mean. Pair it with error
feedback (get_codec("sign", error_feedback=True)), with which EF-SignSGD converges like SGD.
On a Gaussian tensor the relative error ||x - x̂|| / ||x|| is sqrt(1 - 2/π) ≈ 0.60 whatever the
block; on heavy-tailed tensors it is far worse (≈ 0.92 for Student-t with 2 degrees of freedom):
one bit cannot express outliers, so prefer int4 or top-k there.

Choice of the default block (measured on 2^20 elements, relative error at 1 + 32/block bits):

    block                      64      128     256     512     1024
    bits / element             1.5     1.25    1.125   1.0625  1.031
    Gaussian                   0.598   0.601   0.602   0.602   0.603
    Student-t (2 dof)          0.914   0.918   0.920   0.920   0.921
    rows of 768, row scales    0.595   0.597   0.599   0.665   0.773
      ~ exp(N(0, 1))

Smaller blocks buy almost nothing on i.i.d. data; what matters is that a block does not straddle
rows of different scale. 256 divides the row length of nearly every transformer matrix (768, 1024,
1280, 2048, 2304, 4096, 5120, ...) while 512 does not (768, 1280, 2304), hence 256.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..errors import CorruptPayload, InvalidInput
from ..registry import register
from .base import QuantizerStage, check_section, numel, power_of_two_block


@register("sign")
class Sign(QuantizerStage):
    """Scaled 1-bit: one sign bit per element (1 for x >= 0) and one fp32 mean |x| per block."""

    checks_finite = True

    def __init__(self, block: int = 256):
        power_of_two_block(block)
        self.block = block

    def wire_params(self):
        return {"block": self.block}

    def n_sections(self, shape):
        return 2

    def encode(self, x, ctx):
        flat = x.reshape(-1)
        if flat.dtype == torch.float64:
            flat = flat.float()
        bits, scales = kernels.sign_quantize(flat.contiguous(), self.block)
        if scales.numel() and not bool(torch.isfinite(scales).all()):
            raise InvalidInput(
                f"tensor {ctx.name!r} contains NaN or Inf (or values whose block mean overflows fp32); sign cannot encode it"
            )
        return [bits, scales]

    def decode(self, sections, shape):
        n = numel(shape)
        what = f"{self.name} tensor"
        bits = check_section(sections, 0, torch.uint8, (n + 7) // 8, what + " (sign bits)")
        scales = check_section(sections, 1, torch.float32, -(-n // self.block), what + " (block scales)")
        if scales.numel() and not bool((torch.isfinite(scales) & (scales >= 0)).all()):
            raise CorruptPayload(f"{what}: block scales must be finite and non-negative")
        if n % 8 and int(bits[-1]) >> (n % 8):
            raise CorruptPayload(f"{what}: padding bits after the last sign bit are set")
        return kernels.sign_dequantize(bits, scales, self.block, n).view(shape)
