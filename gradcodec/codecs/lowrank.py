"""PowerSGD (Vogels et al., NeurIPS 2019): a rank-r approximation by power iteration.

    x ──▶ M = x viewed as [shape[0], prod(shape[1:])] (fp32)
      ──▶ Q ∈ R^{cols×r}: last call's Q for this tensor (warm start) or N(0, 1) from ctx.next_seed()
      ──▶ repeat `iterations` times:  P = M Q ;  P = orthonormal basis of P (QR) ;  Q = Mᵀ P
      ──▶ P [rows×r] ──▶ inner ──▶ sections        decode:  x̂ = P Qᵀ (fp32) = P Pᵀ M
      ──▶ Q [cols×r] ──▶ inner ──▶ sections

P has orthonormal columns, so x̂ = P Pᵀ M is the projection of M onto span(P): ||M - x̂|| <= ||M||
(a contraction, which error feedback needs), and x̂ = M exactly (up to fp32 rounding) when rank(M) <= r:
one iteration from a random Q spans the column space almost surely. With a single iteration the fp32
rounding of M Q is amplified by the condition number of M Q, which for rank(M) = r is heavy-tailed
over the random start (median relative error 3e-7, but 1 start in 300 to 1000 exceeds 1e-4); a second
iteration, or the next warm-started round, brings it back to ~1e-6. For a general M the error
approaches the best rank-r error sqrt(σ_{r+1}² + σ_{r+2}² + ...) (Eckart–Young) as iterations grow,
the subspace converging at the rate (σ_{r+1}/σ_r)^iterations of subspace iteration. With an inner quantizer the factors carry
its error too ("powersgd:rank=4|fp16", "|int8").

Size: r · (rows + cols) values instead of rows · cols. A tensor with fewer than 2 dimensions, or
whose factors would not be smaller (r · (rows + cols) >= rows · cols, which covers r >= min(rows, cols)
and empty tensors), is handed to `inner` unchanged; n_sections follows the same rule, so it is a
function of the shape.

Warm start (warm_start=true, the default): each call starts from the Q of the previous call for the
same tensor name, so on a slowly changing M (successive gradients) every round is one more power
iteration and the approximation improves across rounds at the cost of one iteration per round.
These Q live on the client only (`state_dict()` / `load_state_dict()`, saved with the codec or its
ErrorFeedback wrapper). The payload carries both factors, so the decoder needs no state at all and
any payload decodes on its own. A client that joins late, restarts without its state, or encodes a
tensor for the first time simply starts from a random Q; clients that come and go between rounds
lose nothing with warm_start=false, which draws Q from a fresh seed on every call.
"""
from __future__ import annotations

import math

import torch

from ..errors import CorruptPayload, InvalidInput
from ..registry import register
from .base import TransformStage, check_section_count, require


@register("powersgd")
class PowerSGD(TransformStage):
    """Rank-r approximation P Qᵀ of the tensor viewed as a matrix, by warm-started power iteration."""

    def __init__(self, inner, rank: int = 4, iterations: int = 1, warm_start: bool = True):
        super().__init__(inner)
        require(1 <= rank <= 1 << 16, f"rank must be in [1, 65536], got {rank}")
        require(1 <= iterations <= 100, f"iterations must be in [1, 100], got {iterations}")
        self.rank = rank
        self.iterations = iterations
        self.warm_start = warm_start
        self._q: dict[str, torch.Tensor] = {}  # tensor name -> last Q (warm start)

    def wire_params(self):
        return {"rank": self.rank}  # iterations and warm_start only shape what the encoder sends

    def matrix_shape(self, shape) -> tuple[int, int] | None:
        """(rows, cols) when the tensor is sent as factors, None when it passes through to `inner`."""
        if len(shape) < 2:
            return None
        rows, cols = shape[0], math.prod(shape[1:])
        if self.rank * (rows + cols) >= rows * cols:
            return None
        return rows, cols

    def n_sections(self, shape):
        mat = self.matrix_shape(tuple(shape))
        if mat is None:
            return self.inner.n_sections(tuple(shape))
        rows, cols = mat
        return self.inner.n_sections((rows, self.rank)) + self.inner.n_sections((cols, self.rank))

    def _initial_q(self, name: str, cols: int, seed: int, device) -> torch.Tensor:
        q = self._q.get(name) if self.warm_start else None
        if q is not None and q.shape == (cols, self.rank):
            q = q.to(device)
            dead = q.norm(dim=0) == 0  # e.g. after an all-zero update: restart those columns at random
            if not bool(dead.any()):
                return q
        else:
            dead = None
        fresh = torch.randn(cols, self.rank, generator=torch.Generator().manual_seed(seed)).to(device)
        return fresh if dead is None else torch.where(dead, fresh, q)

    def factors(self, x: torch.Tensor, name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Q) with x ≈ P Qᵀ for a tensor that matrix_shape() accepts; updates the warm-start state."""
        rows, cols = self.matrix_shape(tuple(x.shape))
        m = x.reshape(rows, cols).float()
        q = self._initial_q(name, cols, seed, m.device)
        for _ in range(self.iterations):
            p = torch.linalg.qr(m @ q).Q
            q = m.T @ p
        if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(q).all())):
            raise InvalidInput(f"tensor {name!r}: PowerSGD factors overflow fp32; scale the update down")
        if self.warm_start:
            self._q[name] = q
        return p.contiguous(), q.contiguous()

    def encode(self, x, ctx):
        mat = self.matrix_shape(tuple(x.shape))
        if mat is None:
            return self.inner.encode(x, ctx)
        p, q = self.factors(x, ctx.name, ctx.next_seed())
        return self.inner.encode(p, ctx) + self.inner.encode(q, ctx)

    def decode(self, sections, shape):
        shape = tuple(shape)
        mat = self.matrix_shape(shape)
        if mat is None:
            check_section_count(sections, self.inner.n_sections(shape), f"{self.name} tensor (passed through)")
            return self.inner.decode(sections, shape)
        rows, cols = mat
        what = f"{self.name} tensor"
        split = self.inner.n_sections((rows, self.rank))
        check_section_count(sections, split + self.inner.n_sections((cols, self.rank)), what)
        p = self._factor(self.inner.decode(sections[:split], (rows, self.rank)), rows, what + " (P)")
        q = self._factor(self.inner.decode(sections[split:], (cols, self.rank)), cols, what + " (Q)")
        out = p @ q.T
        if not bool(torch.isfinite(out).all()):
            raise CorruptPayload(f"{what}: P Qᵀ overflows fp32")
        return out.view(shape)

    def _factor(self, f: torch.Tensor, length: int, what: str) -> torch.Tensor:
        if not f.is_floating_point() or f.numel() != length * self.rank:
            raise CorruptPayload(f"{what}: decodes to {f.numel()} × {f.dtype}, expected {length * self.rank} floats")
        f = f.reshape(length, self.rank).float()
        if not bool(torch.isfinite(f).all()):
            raise CorruptPayload(f"{what}: factor contains NaN or Inf, which the encoder never sends")
        return f

    def state_dict(self):
        return dict(self._q)

    def load_state_dict(self, state):
        if state and not self.warm_start:
            raise InvalidInput(f"powersgd with warm_start=false keeps no state but was given {sorted(state)[:3]}")
        loaded = {}
        for name, q in state.items():
            if not isinstance(q, torch.Tensor) or q.dtype != torch.float32 or q.dim() != 2 or q.shape[1] != self.rank:
                raise InvalidInput(f"powersgd state {name!r} must be a float32 [cols, {self.rank}] tensor")
            if not bool(torch.isfinite(q).all()):
                raise InvalidInput(f"powersgd state {name!r} contains NaN or Inf")
            loaded[name] = q.detach().clone()
        self._q = loaded
