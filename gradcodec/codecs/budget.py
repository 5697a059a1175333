"""`budget`: a fixed number of bytes per upload, spent where it lowers the error most.

    update {name: x_i} ──▶ D_i(b): squared error of int<b> on a sample of x_i's blocks, b = 0 (not sent) .. 8
                       ──▶ widths b_i: the steepest drops in Σ D_i per byte first, until the budget is spent
                       ──▶ int<b_i> per tensor (gradcodec.codecs.quant) ──▶ one payload of at most the budget

The budget counts the whole payload, header included: `bytes=N` caps len(blob) at N, `bpv=r` at
floor(r · (float elements) / 8) bytes. It is never exceeded, whatever the tensors: the header's size is
measured (the message packed with placeholder sections; a budget below it raises InvalidInput), the widths
are chosen for what is left less a bound of what the sections add to the header, and the bytes that bound
leaves are spent on upgrades whose exact payload size still fits. What the payload spent is in
`codec.last_spent` and `gradcodec.inspect(blob).payload_bytes`.

Allocation (operational rate-distortion, the discrete form of reverse water-filling): for each tensor the
points (bytes, D) of widths 0..8 are reduced to their lower convex hull; the hull steps of all tensors are
taken in order of falling ΔD/Δbytes while they fit, and the bytes left over go to the single upgrade with
the best ΔD/Δbytes that still fits, repeatedly. D_i is measured, not modelled: every width quantises up to
SAMPLE_BLOCKS evenly spaced blocks of the tensor (the same rounding the payload will use), scaled to the
tensor's size, so a tensor whose energy sits in a few values gets the width its blocks need. A tensor
whose share of the error is too small to be worth its scales is not sent (width 0, decoded as zeros).

Payload: the shared section is one uint8 per float tensor, its width (0..8); each float tensor then carries
int<b>'s two sections (codes, fp32 block scales), both empty at width 0. Integer and bool tensors travel
raw. Decoding needs nothing but the bytes. Parameters in the canonical spec: `block` (decoding needs it);
the budget and `stochastic` change only the encoder.

Error feedback (`get_codec("budget:bpv=1", error_feedback=True)`) allocates on x + residual and keeps what
each tensor's payload misses (all of it for a tensor not sent): bytes withheld from a tensor this round are
spent on it once its residual has grown.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from .. import kernels, wire
from ..codec import RAW, Codec, check_finite
from ..errors import CorruptPayload, InvalidInput
from ..registry import canonical_spec, register
from .base import EncodeContext, check_section, power_of_two_block
from .quant import BLOCKWISE

SAMPLE_BLOCKS = 64  # blocks per tensor on which each width's error is measured
REFINE_STEPS = 4  # exact-size checks per round, and rounds, spending what the header bound left over
WIDTHS = (0,) + kernels.WIDTHS  # 0: the tensor is not sent


@dataclass
class Spent:
    """What one encode spent: payload bytes (len of the blob), the budget, and the width of each float tensor."""

    bytes: int
    budget: int
    widths: dict[str, int] = field(default_factory=dict)


def _varint_len(n: int) -> int:
    """Bytes of n as a LEB128 varint, the wire format's count encoding (docs/wire-format.md)."""
    return max(1, -(-n.bit_length() // 7))


@register("budget")
class BudgetCodec(Codec):
    """Blockwise absmax quantisation with a width per tensor chosen to fit a byte budget (module docstring)."""

    kind = "codec"
    lossless = False

    def __init__(self, bpv: float | None = None, bytes: int | None = None, block: int = 64, stochastic: bool = False,
                 byte_stage=None, seed: int | None = None, allow_nonfinite: bool = False):
        super().__init__(byte_stage, seed, allow_nonfinite)
        if byte_stage is not None:
            raise InvalidInput("budget counts the bytes it sends; a byte stage after it would change the count")
        if bpv is not None and bytes is not None:
            raise InvalidInput("budget takes bpv= (bits per value) or bytes= (per payload), not both")
        if bpv is not None and not bpv > 0:
            raise InvalidInput(f"budget bpv must be positive, got {bpv}")
        if bytes is not None and bytes <= 0:
            raise InvalidInput(f"budget bytes must be positive, got {bytes}")
        power_of_two_block(block)
        self.bpv, self.max_bytes, self.block, self.stochastic = bpv, bytes, block, stochastic
        self.spec = canonical_spec([self])
        self._check_options()
        self.last_spent: Spent | None = None
        self._pending: Spent | None = None

    def wire_params(self):
        return {"block": self.block}

    # ------------------------------------------------------------------ sizes
    def budget_for(self, named: dict[str, torch.Tensor]) -> int:
        """The payload bytes this codec may spend on `named`."""
        if self.max_bytes is not None:
            return self.max_bytes
        if self.bpv is None:
            raise InvalidInput("budget needs bpv= or bytes= to encode, e.g. get_codec('budget:bpv=2')")
        return math.floor(self.bpv * sum(t.numel() for t in named.values() if t.is_floating_point()) / 8)

    def _data_bytes(self, n: int, bits: int) -> int:
        """Codes and scales of a float tensor of n values at `bits` (0: nothing)."""
        return 0 if bits == 0 else kernels.code_count(n, bits) + 4 * -(-n // self.block)

    def _exact_size(self, named: dict[str, torch.Tensor], widths: list[int], by_reference: bool) -> int:
        """len() of the payload these widths give: the message packed with zero codes and scales of the right sizes."""
        entries, float_widths = [], iter(widths)
        for name, x in named.items():
            if x.is_floating_point():
                bits, n = next(float_widths), x.numel()
                codes, scales = (kernels.code_count(n, bits), -(-n // self.block)) if bits else (0, 0)
                sections = [torch.zeros(codes, dtype=torch.uint8), torch.zeros(scales, dtype=torch.float32)]
            else:
                sections = RAW.encode(x.contiguous(), None)
            entries.append(wire.TensorEntry(name, x.dtype, tuple(x.shape), sections))
        msg = wire.Message(self.spec, entries, [torch.zeros(len(widths), dtype=torch.uint8)])
        return len(wire.pack(msg, by_reference=by_reference))

    def _slack(self, floats: dict[str, torch.Tensor]) -> int:
        """What sending the tensors can add to the header beyond their codes and scales, at most: each
        section's count varint grows from 1 byte, fp32 scales may need 3 bytes of alignment, and the
        header's padding to 8 bytes may grow by 7."""
        return 7 + sum(_varint_len(x.numel()) - 1 + _varint_len(-(-x.numel() // self.block)) - 1 + 3
                       for x in floats.values())

    # ------------------------------------------------------------------ allocation
    def _sample(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to SAMPLE_BLOCKS evenly spaced blocks of x (+ residual) as fp32 [blocks, block], and the
        mask of real elements (the tensor's last block may be partial)."""
        flat = x.reshape(-1)
        n = flat.numel()
        nblocks = -(-n // self.block)
        pick = torch.linspace(0, nblocks - 1, min(nblocks, SAMPLE_BLOCKS)).round().long().unique().to(x.device)
        idx = (pick[:, None] * self.block + torch.arange(self.block, device=x.device)).reshape(-1)
        mask = idx < n
        idx = idx.clamp(max=n - 1)
        e = flat[idx].float()
        if residual is not None:
            e += residual.reshape(-1)[idx]
        return e.where(mask, torch.zeros((), device=x.device)), mask

    def _distortions(self, floats: dict[str, torch.Tensor], residuals) -> torch.Tensor:
        """[tensors, 9]: the estimated squared error of each tensor at widths 0..8."""
        samples, masks, owner, scale = [], [], [], []
        for i, (name, x) in enumerate(floats.items()):
            e, mask = self._sample(x, None if residuals is None else residuals[name])
            samples.append(e)
            masks.append(mask)
            owner.append(torch.full((e.numel(),), i, dtype=torch.long, device=e.device))
            scale.append(x.numel() / max(1, int(mask.sum())))
        e, mask, owner = torch.cat(samples), torch.cat(masks), torch.cat(owner)
        scale = torch.tensor(scale, dtype=torch.float64, device=e.device)
        d = torch.zeros(len(floats), len(WIDTHS), dtype=torch.float64, device=e.device)
        for j, bits in enumerate(WIDTHS):
            if bits == 0:
                err = e
            else:
                seed = 0 if self.stochastic else None
                codes, scales = kernels.quantize_blockwise(e, bits, self.block, seed)
                err = e - kernels.dequantize_blockwise(codes, scales, bits, self.block, e.numel())
            sq = (err.double() ** 2).where(mask, torch.zeros((), dtype=torch.float64, device=e.device))
            d[:, j].index_add_(0, owner, sq)
        return (d * scale[:, None]).cpu()

    def _costs(self, floats: dict[str, torch.Tensor]) -> list[list[int]]:
        return [[self._data_bytes(x.numel(), b) for b in WIDTHS] for x in floats.values()]

    @staticmethod
    def allocate(d: list[list[float]], cost: list[list[int]], data_budget: int) -> list[int]:
        """A width per tensor (0..8) whose data bytes `cost[i][b]` fit in `data_budget`, lowering Σ d[i][b]
        greedily along each tensor's lower convex hull, then with the best single upgrades that still fit."""
        steps = []  # (slope, tensor, from, to) of each tensor's lower convex hull
        for i in range(len(d)):
            hull = [0]
            for b in range(1, len(WIDTHS)):
                if d[i][b] >= d[i][hull[-1]]:
                    continue  # no better than a cheaper width
                while len(hull) >= 2 and _slope(d[i], cost[i], hull[-2], hull[-1]) <= _slope(d[i], cost[i], hull[-1], b):
                    hull.pop()
                hull.append(b)
            steps += [(_slope(d[i], cost[i], a, b), i, a, b) for a, b in zip(hull, hull[1:])]
        widths, left = [0] * len(d), data_budget
        for _, i, a, b in sorted(steps, key=lambda s: -s[0]):
            extra = cost[i][b] - cost[i][a]
            if widths[i] == a and extra <= left:
                widths[i], left = b, left - extra
        while True:
            best = next(_upgrades(d, cost, widths, left), None)
            if best is None:
                return widths
            i, b = best
            left -= cost[i][b] - cost[i][widths[i]]
            widths[i] = b

    # ------------------------------------------------------------------ encode / decode
    def encode(self, x, *, residuals=None, by_reference: bool = False) -> bytes:
        self._by_reference = by_reference  # the table's form changes the header size that encode_named plans for
        blob = super().encode(x, residuals=residuals, by_reference=by_reference)
        spent, self._pending = self._pending, None
        spent.bytes = len(blob)
        if spent.bytes > spent.budget:
            raise RuntimeError(f"internal: budget payload of {spent.bytes} bytes exceeds its budget of {spent.budget}")
        self.last_spent = spent
        return blob

    def encode_named(self, named, residuals):
        budget = self.budget_for(named)
        floats = {k: v for k, v in named.items() if v.is_floating_point()}
        for name, t in floats.items():
            check_finite(name, t)
        by_reference = getattr(self, "_by_reference", False)
        header = self._exact_size(named, [0] * len(floats), by_reference)
        if budget < header:
            raise InvalidInput(
                f"a budget of {budget} bytes is below the {header} bytes this payload needs for its header "
                f"({len(named)} tensors' names, shapes and sections); raise bpv= or bytes=, or send fewer tensors"
            )
        d, cost = self._distortions(floats, residuals).tolist(), self._costs(floats)
        widths = self.allocate(d, cost, max(0, budget - header - self._slack(floats)))
        # the slack is a bound: spend what the exact size leaves on further upgrades that fit
        size = self._exact_size(named, widths, by_reference)
        for _ in range(REFINE_STEPS):
            for i, b in itertools.islice(_upgrades(d, cost, widths, budget - size), REFINE_STEPS):
                trial = widths[:i] + [b] + widths[i + 1:]
                trial_size = self._exact_size(named, trial, by_reference)
                if trial_size <= budget:
                    widths, size = trial, trial_size
                    break
            else:
                break
        width_of = dict(zip(floats, widths))
        entries = []
        for name, t in named.items():
            t = t.contiguous()
            if not t.is_floating_point():
                sections = RAW.encode(t, None)
            elif width_of[name] == 0:
                sections = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.float32)]
                if residuals is not None:
                    residuals[name].add_(t.float())
            else:
                stage = BLOCKWISE[width_of[name]](self.block, self.stochastic)
                ctx = EncodeContext(name, self.generator)
                sections = (stage.encode(t, ctx) if residuals is None
                            else stage.encode_feedback(t, residuals[name], ctx))
            entries.append(wire.TensorEntry(name, t.dtype, tuple(t.shape), sections))
        self._pending = Spent(0, budget, width_of)
        shared = [torch.tensor(widths, dtype=torch.uint8)]
        return wire.Message(self.spec, entries, shared)

    def decode_named(self, msg, device):
        floats = [e for e in msg.tensors if e.dtype.is_floating_point]
        if len(msg.shared) != 1:
            raise CorruptPayload(f"budget payload has {len(msg.shared)} shared sections, expected 1 (the widths)")
        widths = check_section(msg.shared, 0, torch.uint8, len(floats), "budget widths").tolist()
        if any(b > WIDTHS[-1] for b in widths):
            raise CorruptPayload(f"budget widths must be 0..{WIDTHS[-1]}, payload has {max(widths)}")
        width_of = {e.name: b for e, b in zip(floats, widths)}
        out = {}
        for entry in msg.tensors:
            sections = [s.to(device) for s in entry.sections]
            if not entry.dtype.is_floating_point:
                if len(sections) != 1:
                    raise CorruptPayload(f"tensor {entry.name!r}: a raw tensor has one section, payload has {len(sections)}")
                out[entry.name] = RAW.decode(sections, entry.shape)
                continue
            if len(sections) != 2:
                raise CorruptPayload(f"tensor {entry.name!r}: payload has {len(sections)} sections, budget expects 2")
            bits = width_of[entry.name]
            if bits == 0:
                if any(s.numel() for s in sections):
                    raise CorruptPayload(f"tensor {entry.name!r} is marked not sent (width 0) but carries data")
                out[entry.name] = torch.zeros(entry.shape, dtype=torch.float32, device=device)
            else:
                out[entry.name] = BLOCKWISE[bits](self.block).decode(sections, entry.shape)
        return out


def _upgrades(d: list[list[float]], cost: list[list[int]], widths: list[int], left: int):
    """(tensor, width) upgrades whose extra data bytes fit in `left`, steepest distortion drop per byte first."""
    options = [(_slope(d[i], cost[i], widths[i], b), i, b) for i in range(len(d))
               for b in range(widths[i] + 1, len(WIDTHS))
               if cost[i][b] - cost[i][widths[i]] <= left and d[i][b] < d[i][widths[i]]]
    return ((i, b) for _, i, b in sorted(options, key=lambda o: -o[0]))


def _slope(d: list[float], cost: list[int], a: int, b: int) -> float:
    """Distortion removed per byte when a tensor goes from width a to width b (a tiny tensor's codes take
    one byte at several widths: an upgrade that costs nothing is infinitely steep)."""
    if cost[b] == cost[a]:
        return math.inf if d[b] < d[a] else 0.0
    return (d[a] - d[b]) / (cost[b] - cost[a])
