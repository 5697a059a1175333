"""`cgfed`: the CG-FedLLM learned codec (Wu et al., "CG-FedLLM: How to Compress Gradients in Federated
Fine-tuning for Large Language Models", arXiv 2405.13746), made to work on round updates.

    update (+ EF residual) ──▶ LoRA canvas, per-factor RMS scales ──▶ AE encoder ──▶ latent ──▶ int8/int4
          [named A/B factors]        (kernels.canvas_pack)          (conv | block | shared)  (quantize_blockwise)
                                                                                                 │
    update ◀── unpack × scales ◀── AE decoder ◀── dequantise ◀───────────── bytes ◀──────────────┘
          (kernels.canvas_unpack)                                   + optional top-k of the AE's residual

Encode the round *update* (the delta from the global adapter), not the LoRA state: the state is almost
all shared history, and an AE of the state reconstructs nothing of one client's update (see
docs/results.md). Each factor is divided by its RMS, so the AE sees unit-scale inputs whatever
the layer or the A/B gauge; the scales travel (fp32, 4 bytes per factor).

Payload: every float tensor is listed in the tensor table (names and shapes give the canvas layout);
the AE's sections are shared: factor scales (fp32), latent codes (int8, or int4 nibbles), and for the
conv AE the latent block scales (fp32). The `shared` AE (gradcodec.learned.model) reads the factors
directly, with no canvas: per factor type, its layers stacked; its codes are per type [layers, bands,
latents], types in order of first appearance, and its scales are the same per-factor RMS. With `residual=R`, each tensor also carries
`topk:ratio=R|int8` of what the AE missed. Integer and bool tensors travel raw. The header's
fingerprint names the AE (gradcodec.learned.modelfile); decoding with another AE raises ModelMismatch.

Parameters (the canonical spec lists bits, latent_block and residual; the model travels as its
fingerprint, not its path):
  model         path or LearnedModel: the AE file (an encoder-only file is enough to encode)
  bits          8 (default) or 4: latent quantisation
  latent_block  block of the conv AE's blockwise absmax latent quantiser (the block AE has fixed-range codes)
  residual      top-k ratio of the optional residual stage (0: off)
  models        decode side: candidate model files; the one whose fingerprint the payload names is used

Error feedback: `get_codec("cgfed", model=..., error_feedback=True)` keeps r = e - decoded on the
client, which needs the AE's decoder there too (load the full model file, not the encoder-only one).
Shared state: none beyond the model file; the decoder needs no earlier payload.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .. import kernels, wire
from ..codec import RAW, Codec, check_finite
from ..errors import CorruptPayload, InvalidInput, ModelMismatch
from ..learned.canvas import CanvasLayout
from ..learned.model import LATENT_QMAX, factor_types
from ..learned.modelfile import LearnedModel, load_model
from ..registry import build, canonical_spec, register
from .base import EncodeContext, all_finite, check_section, power_of_two_block

# RMS scales come from a sum of squares, which overflows fp32 for values beyond ~1.8e19
MAX_SCALE = 2.0**63


@register("cgfed")
class CGFedCodec(Codec):
    """The learned codec: a LoRA update through an AutoEncoder (see the module docstring)."""

    kind = "codec"
    lossless = False

    def __init__(self, model: Any = None, bits: int = 8, latent_block: int = 64, residual: float = 0.0,
                 models: Any = None, byte_stage=None, seed: int | None = None, allow_nonfinite: bool = False):
        super().__init__(byte_stage, seed, allow_nonfinite)
        if bits not in LATENT_QMAX:
            raise InvalidInput(f"cgfed bits must be 8 or 4, got {bits}")
        power_of_two_block(latent_block)
        if not 0 <= residual <= 1:
            raise InvalidInput(f"cgfed residual is a top-k ratio in [0, 1], got {residual}")
        self.bits, self.latent_block, self.residual = bits, latent_block, residual
        self.residual_stage = build(f"topk:ratio={residual!r}|int8")[1] if residual else None
        self.spec = canonical_spec([self] + ([byte_stage] if byte_stage else []))
        self._check_options()
        self.model = load_model(model) if model is not None else None
        self.candidates = ([self.model] if self.model else []) + [load_model(m) for m in (models or [])]
        self._layouts: dict = {}  # (canvas height, layout digest, names and shapes) -> (layout, factor types)

    def wire_params(self) -> dict[str, Any]:
        return {"bits": self.bits, "latent_block": self.latent_block, "residual": self.residual}

    # ------------------------------------------------------------------ helpers
    def _layout(self, shapes: dict[str, tuple[int, ...]], model: LearnedModel) -> CanvasLayout:
        # a federation sends one adapter every round: its layout (and factor types) are worked out once
        key = (model.config.canvas_height, model.config.layout_digest, tuple(shapes.items()))
        if key in self._layouts:
            return self._layouts[key][0]
        layout = CanvasLayout.for_shapes(shapes, height=model.config.canvas_height)
        if layout.digest() != model.config.layout_digest:
            raise InvalidInput(
                f"these tensors are not the adapter layout {model.describe()} was trained on (layout "
                f"{layout.digest()[:12]}, the AE's {model.config.layout_digest[:12]}): same names, order, shapes "
                "and rank are needed; train an AE for this adapter (gradcodec train-ae)"
            )
        if len(self._layouts) >= 8:
            self._layouts.clear()
        self._layouts[key] = (layout, factor_types(layout))
        return layout

    def _types(self, layout: CanvasLayout) -> tuple:
        """factor_types(layout), from the cache _layout filled."""
        for cached, types in self._layouts.values():
            if cached is layout:
                return types
        return factor_types(layout)

    def model_for(self, fingerprint: bytes) -> LearnedModel:
        """The candidate model whose fingerprint a payload names; ModelMismatch when none has it."""
        for m in self.candidates:
            if m.fingerprint == fingerprint:
                return m
        known = ", ".join(m.fingerprint.hex() for m in self.candidates) or "none given"
        raise ModelMismatch(
            f"payload was encoded with AE {fingerprint.hex() or '(no fingerprint)'}; models available: {known}."
            " Pass its model file: gradcodec.decode(blob, models=[path])"
        )

    def _latent_sections(self, model: LearnedModel) -> list[tuple[torch.dtype, int]]:
        """(dtype, count) of the shared sections after the factor scales."""
        n = model.config.latent_numel
        codes = (torch.int8, n) if self.bits == 8 else (torch.uint8, (n + 1) // 2)
        if model.config.arch == "conv":
            return [codes, (torch.float32, -(-n // self.latent_block))]
        return [codes]

    def _decode_canvas(self, model: LearnedModel, latent: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The conv AE's normalised canvas from its latent sections (codes, block scales)."""
        cfg = model.config
        decoder = model.require("decoder").to(device)
        z = kernels.dequantize_blockwise(latent[0], latent[1], self.bits, self.latent_block, cfg.latent_numel)
        with torch.no_grad():
            return decoder(z.view(1, *cfg.latent_shape))[0].contiguous()

    def _decode_factors(self, model: LearnedModel, layout: CanvasLayout, scales: torch.Tensor,
                        latent: list[torch.Tensor], device: torch.device, check_finite: bool = False
                        ) -> tuple[list[torch.Tensor], bool | None]:
        """What the AE reconstructs: one float32 tensor per factor, in layout order, and, where the decoder
        checked it on the way (the shared AE, if `check_finite`), whether all are finite, else None."""
        cfg = model.config
        if cfg.arch == "conv":
            outputs = [torch.empty(f.shape, dtype=torch.float32, device=device) for f in layout.factors]
            canvas = self._decode_canvas(model, latent, device)
            outputs = kernels.canvas_unpack(layout.table(device), canvas, scales, layout.height, outputs)
            return outputs, None
        decoder = model.require("decoder")
        codes = latent[0]
        if self.bits == 4:
            codes = (kernels.unpack_bits(codes, 4, cfg.latent_numel) - 8).to(torch.int8)
        if cfg.arch == "shared":
            return self._shared_decode(decoder.to(device), layout, codes, scales, check_finite)
        outputs = [torch.empty(f.shape, dtype=torch.float32, device=device) for f in layout.factors]
        outputs = kernels.block_decode(layout.table(device), codes.view(cfg.latent_shape), scales, layout.height,
                                       decoder.weight.detach().to(device), decoder.bias.detach().to(device),
                                       cfg.block_rows, cfg.block_cols, outputs, LATENT_QMAX[self.bits])
        return outputs, None

    def _shared_decode(self, decoder, layout: CanvasLayout, codes: torch.Tensor, scales: torch.Tensor,
                       check_finite: bool) -> tuple[list[torch.Tensor], bool | None]:
        """The factors (SharedDecoder.decode_factors: no band-major intermediate as large as the update)
        and whether they are finite (if `check_finite`)."""
        types = self._types(layout)
        u = codes.float().div_(LATENT_QMAX[self.bits])
        latents, at = [], 0
        for (_, a, b, n, band, k) in decoder.config.types:
            size = n * -(-max(a, b) // band) * k
            latents.append(u[at:at + size].view(-1, n, k))
            at += size
        per_type, finite = decoder.decode_factors(latents, [scales[list(t.members)] for t in types], check_finite)
        outputs: list[torch.Tensor] = [None] * len(layout.factors)  # type: ignore[list-item]
        for t, factors in zip(types, per_type):
            for i, y in zip(t.members, factors):
                outputs[i] = y
        return outputs, finite

    def _shared_encode(self, encoder, layout: CanvasLayout, sources: list[torch.Tensor],
                       res: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes [latent_numel], fp32 scales [factors]) of the shared AE: per type, its factors'
        tiles stacked band-major (SharedEncoder.encode_factors), codes [bands, layers, latents]."""
        types = self._types(layout)
        if res is not None:
            sources = [x.float() + r for x, r in zip(sources, res)]
        scales = torch.empty(len(sources), dtype=torch.float32, device=sources[0].device)
        zs = []
        # one type at a time (RMS, tiles, product), so that its factors are read while still in cache
        for i, (t, cfg_type) in enumerate(zip(types, encoder.config.types)):
            xs = [sources[j] for j in t.members]
            if all(x.dtype == torch.float32 for x in xs):
                norms = torch._foreach_norm(xs)  # = vector_norm per tensor, one call
            else:
                norms = [torch.linalg.vector_norm(x, dtype=torch.float32) for x in xs]
            s = torch.stack(norms)
            s /= torch.full_like(s, math.sqrt(xs[0].numel()))
            scales[list(t.members)] = s
            zs.append(encoder.encode_factors(i, xs, s))
        qmax = LATENT_QMAX[self.bits]
        codes = torch.cat([z.reshape(-1) for z in zs]).tanh_().mul_(qmax).add_(0.5).floor_().clamp_(-qmax, qmax)
        return codes.to(torch.int8), scales

    # ------------------------------------------------------------------ encode
    def encode_named(self, named, residuals):
        model = self.model
        if model is None:
            raise InvalidInput("cgfed needs its AE to encode: get_codec('cgfed', model='ae.safetensors')")
        encoder = model.require("encoder")
        if residuals is not None or self.residual_stage is not None:
            model.require("decoder")  # the client must know what the server will decode
        floats = {k: v for k, v in named.items() if v.is_floating_point()}
        if not floats:
            raise InvalidInput("cgfed encodes LoRA factors; the input has no float tensors")
        layout = self._layout({k: tuple(v.shape) for k, v in floats.items()}, model)
        cfg = model.config
        device = next(iter(floats.values())).device
        dtypes = {v.dtype for v in floats.values()}
        sources = [v.contiguous() if len(dtypes) == 1 and v.dtype != torch.float64 else v.float().contiguous()
                   for v in floats.values()]
        res = [residuals[k] for k in floats] if residuals is not None else None
        table = layout.table(device) if cfg.arch != "shared" else None  # the shared AE reads no canvas
        with torch.no_grad():
            if cfg.arch == "conv":
                canvas, scales = kernels.canvas_pack(table, sources, layout.height, cfg.padded_shape, res)
                self._check_scales(scales, floats)
                z = encoder.to(device)(canvas[None]).reshape(-1)
                latent = list(kernels.quantize_blockwise(z, self.bits, self.latent_block))
            elif cfg.arch == "shared":
                codes, scales = self._shared_encode(encoder.to(device), layout, sources, res)
                self._check_scales(scales, floats)
                latent = [codes if self.bits == 8 else kernels.pack_bits((codes + 8).to(torch.uint8), 4)]
            else:
                codes, scales = kernels.block_encode(table, sources, layout.height, cfg.padded_shape,
                                                     encoder.weight.detach().to(device), encoder.bias.detach().to(device),
                                                     cfg.block_rows, cfg.block_cols, res, LATENT_QMAX[self.bits])
                self._check_scales(scales, floats)
                codes = codes.reshape(-1)
                latent = [codes if self.bits == 8 else kernels.pack_bits((codes + 8).to(torch.uint8), 4)]
            if not all(torch.isfinite(t).all() for t in latent if t.is_floating_point()):
                raise InvalidInput(f"{model.describe()} produced a non-finite latent for this update")
            extra = self._feedback(model, layout, table, scales, latent, sources, res, device)

        entries = []
        for name, x in named.items():
            if not x.is_floating_point():
                entries.append(wire.TensorEntry(name, x.dtype, tuple(x.shape), RAW.encode(x.contiguous(), None)))
            else:
                entries.append(wire.TensorEntry(name, x.dtype, tuple(x.shape), extra.get(name, [])))
        return wire.Message(self.payload_spec, entries, [scales] + latent, fingerprint=model.fingerprint)

    def _check_scales(self, scales: torch.Tensor, floats: dict[str, torch.Tensor]) -> None:
        bad = (~(scales < MAX_SCALE)).nonzero().flatten()
        if bad.numel():
            name = list(floats)[int(bad[0])]
            check_finite(name, floats[name])  # names NaN/Inf precisely
            raise InvalidInput(f"tensor {name!r} has values beyond ±1e19, which cgfed's scales cannot represent")

    def _feedback(self, model, layout, table, scales, latent, sources, res, device) -> dict[str, list[torch.Tensor]]:
        """Residual-stage sections per tensor name, and the error-feedback update of `res` (in place)."""
        if res is None and self.residual_stage is None:
            return {}
        if self.residual_stage is None and model.config.arch == "conv":
            canvas = self._decode_canvas(model, latent, device)
            kernels.canvas_feedback(table, canvas, scales, layout.height, sources, res)
            return {}
        decoded, _ = self._decode_factors(model, layout, scales, latent, device)
        extra = {}
        for i, f in enumerate(layout.factors):
            e = sources[i].float() + (res[i] if res is not None else 0)
            missed = e - decoded[i]
            if self.residual_stage is not None:
                sections = self.residual_stage.encode(missed.contiguous(), EncodeContext(f.name, self.generator))
                extra[f.name] = sections
                missed -= self.residual_stage.decode(sections, f.shape).to(device)
            if res is not None:
                res[i].copy_(missed)
        return extra

    # ------------------------------------------------------------------ decode
    def decode_named(self, msg, device):
        model = self.model_for(msg.fingerprint)
        model.require("decoder")
        cfg = model.config
        floats = [e for e in msg.tensors if e.dtype.is_floating_point]
        try:
            layout = self._layout({e.name: e.shape for e in floats}, model)
        except InvalidInput as e:
            raise CorruptPayload(f"the payload's tensor table does not fit its AE: {e}") from None
        what = "cgfed shared sections"
        expected = [(torch.float32, len(floats))] + self._latent_sections(model)
        if len(msg.shared) != len(expected):
            raise CorruptPayload(f"{what}: payload has {len(msg.shared)}, the {cfg.arch} AE needs {len(expected)}")
        shared = [check_section(msg.shared, i, dt, n, what).to(device) for i, (dt, n) in enumerate(expected)]
        scales, latent = shared[0], shared[1:]
        for t, label in [(scales, "factor scales")] + ([(latent[1], "latent scales")] if cfg.arch == "conv" else []):
            if t.numel() and not bool(((t >= 0) & (t < MAX_SCALE)).all()):
                raise CorruptPayload(f"cgfed {label} must be finite, non-negative and below 2**63")
        if cfg.arch != "conv":
            self._check_block_codes(latent[0], cfg.latent_numel)

        # without a residual stage nothing is added after the AE, and the shared AE's decoder checks
        # finiteness on its scratch while it is in cache; else the factors are checked at the end
        factors, finite = self._decode_factors(model, layout, scales, latent, device,
                                               check_finite=self.residual_stage is None)
        decoded = dict(zip((f.name for f in layout.factors), factors))
        out = {}
        for entry in msg.tensors:
            if not entry.dtype.is_floating_point:
                if len(entry.sections) != 1:
                    raise CorruptPayload(f"tensor {entry.name!r}: a raw tensor has one section, payload has {len(entry.sections)}")
                out[entry.name] = RAW.decode([s.to(device) for s in entry.sections], entry.shape)
                continue
            want = self.residual_stage.n_sections(entry.shape) if self.residual_stage else 0
            if len(entry.sections) != want:
                raise CorruptPayload(f"tensor {entry.name!r}: payload has {len(entry.sections)} sections, cgfed expects {want}")
            t = decoded[entry.name]
            if want:
                t += self.residual_stage.decode([s.to(device) for s in entry.sections], entry.shape).to(device)
            out[entry.name] = t
        if finite is None:
            finite = all(all_finite(t) for t in factors)
        if not finite:
            raise CorruptPayload("cgfed payload decodes to non-finite values")
        return out

    def _check_block_codes(self, codes: torch.Tensor, n: int) -> None:
        """The light AE writes codes in [-QMAX, QMAX]: int8 -128 or an int4 nibble 0 (-8) is corruption."""
        values = codes if self.bits == 8 else kernels.unpack_bits(codes, 4, n) - 8
        if values.numel() and int(values.min()) < -LATENT_QMAX[self.bits]:
            raise CorruptPayload(f"cgfed latent codes outside the light AE's range ±{LATENT_QMAX[self.bits]}")
