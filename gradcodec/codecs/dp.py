"""`dp`: client-level differential privacy in front of any codec (the Gaussian mechanism of DP-FedAvg,
McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018).

    update ──▶ clip the whole update to L2 norm ≤ clip ──▶ + N(0, (noise · clip)²) per coordinate ──▶ codec
    {name: tensor}    (one norm over every tensor)            (cryptographically seeded)              (int4, top-k, cgfed, ...)

Spec: ``dp:clip=1.0,noise=0.8|int4``. The stage must come first: it needs the whole update (one norm
over all tensors, not one per tensor), so the codec runs it as a pre-pass (`Codec.attach_prepass`)
before the per-tensor stages and before error feedback adds its residual. Everything after it,
compression and the error-feedback residual included, is post-processing of its output, so the
codec and the residual cannot weaken the guarantee (a residual of the un-noised update would leak).

Client-side only: the decoder needs nothing from it, so payloads do not name it (`Codec.payload_spec`):
a payload says neither that DP was applied nor with which noise, and never the seed. `Codec.spec`
names it with `clip` and `noise` (never `seed`), so a spec that travels to clients (a Flower
handshake) makes them apply it.

Parameters:
  clip    L2 bound of the whole update (> 0); an update with a larger norm is scaled down to it
  noise   noise multiplier (≥ 0): standard deviation noise · clip per coordinate; 0 adds nothing
  seed    tests only: a fixed noise seed. By default every encode draws a fresh 63-bit seed from the
          operating system's CSPRNG (`secrets`); the samples come from PyTorch's generator for the
          tensors' device, which is not itself a cryptographic generator (nor are Flower's or Opacus'
          default samplers)

With noise = 0 and an update whose norm is ≤ clip the stage leaves the tensors as they are, so the
payload is bit-identical to the codec's without the stage. Only float tensors can be noised: an
integer or bool tensor in the update is refused rather than sent as it is. The privacy this buys is
computed by `gradcodec.privacy.epsilon` (docs/codecs.md, "Differential privacy").
"""
from __future__ import annotations

import math
import secrets
from typing import Optional, Sequence

import torch

from ..errors import InvalidInput
from ..registry import register
from .base import EncodeContext, TransformStage, all_finite, require

# Relative margins below clip, tried in turn: rounding the scaled update back to bf16 / fp16 can raise
# its norm by up to 2**-8 / 2**-11 of itself; float32 and float64 need only the first.
_CLIP_MARGINS = (2.0**-20, 2.0**-14, 2.0**-10, 2.0**-7, 2.0**-5)


def update_norm(named: dict[str, torch.Tensor]) -> float:
    """L2 norm of all float tensors of `named` taken together (accumulated in float64)."""
    total = 0.0
    for t in named.values():
        if t.is_floating_point() and t.numel():
            total += float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
    return math.sqrt(total)


@register("dp")
class GaussianDP(TransformStage):
    """Clip the whole update to `clip`, add N(0, (noise·clip)²) per coordinate (see the module docstring)."""

    def __init__(self, inner, clip: float = 1.0, noise: float = 1.0, seed: Optional[int] = None):
        super().__init__(inner)
        require(clip > 0, f"dp clip must be > 0 (the L2 bound of the whole update), got {clip}")
        require(noise >= 0, f"dp noise must be >= 0 (a multiplier of clip), got {noise}")
        self.clip, self.noise = float(clip), float(noise)
        self._seeds = None if seed is None else torch.Generator().manual_seed(seed)

    def wire_params(self):
        return {"clip": self.clip, "noise": self.noise}  # never the seed

    # ------------------------------------------------------------------ the pre-pass
    def prepare(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The clipped, noised update: same names, shapes and dtypes."""
        for name, t in named.items():
            if not t.is_floating_point():
                raise InvalidInput(f"dp noises float tensors only; {name!r} is {t.dtype}: send integer and bool"
                                   " tensors outside the private update")
            if not all_finite(t):
                raise InvalidInput(f"tensor {name!r} contains NaN or Inf; dp cannot clip it")
        out = self._clipped(named)
        if self.noise > 0:
            out = self._noised(out)
        return out

    def _clipped(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        norm = update_norm(named)
        if norm <= self.clip:
            return named  # untouched: with noise 0 the payload is the codec's own
        for margin in _CLIP_MARGINS:
            out = {k: (t.double() * (self.clip / norm * (1 - margin))).to(t.dtype) for k, t in named.items()}
            if update_norm(out) <= self.clip:
                return out
        raise InvalidInput(f"dp could not scale the update below clip={self.clip} in its dtypes")  # unreachable: see _CLIP_MARGINS

    def _noised(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seed = secrets.randbits(63) if self._seeds is None else int(torch.randint(0, 2**62, (), generator=self._seeds))
        generators: dict[torch.device, torch.Generator] = {}
        std = self.noise * self.clip
        out = {}
        for k, t in named.items():
            gen = generators.get(t.device)
            if gen is None:
                gen = generators[t.device] = torch.Generator(device=t.device).manual_seed(seed)
            work = torch.float64 if t.dtype == torch.float64 else torch.float32
            z = torch.randn(t.shape, generator=gen, dtype=work, device=t.device)
            out[k] = z.mul_(std).add_(t.to(work)).to(t.dtype)
        return out

    # ------------------------------------------------------------------ per tensor: the inner stages'
    # The codec runs this stage as a pre-pass and hands tensors straight to `inner`; these keep the
    # Stage interface whole.
    def n_sections(self, shape: tuple[int, ...]) -> int:
        return self.inner.n_sections(shape)

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> list[torch.Tensor]:
        return self.inner.encode(x, ctx)

    def decode(self, sections: Sequence[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return self.inner.decode(sections, shape)
