"""Codec objects: tensors (one, or a dict of named ones) <-> self-describing bytes.

`Codec` validates the caller's input, restores names, shapes and dtypes on decode, and hands the
byte layout to gradcodec.wire. Subclasses say how a set of named tensors becomes sections:
`PipelineCodec` runs a chain of per-tensor stages (gradcodec.codecs); a learned codec encodes the
whole set jointly.

A codec object may keep client-side state between encodes (PowerSGD warm start, and the residuals
of gradcodec.feedback.ErrorFeedback); decoding never needs state beyond the payload and, for a
learned codec, its model file.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Union

import torch

from . import wire
from .codecs.base import EncodeContext, Stage, all_finite
from .codecs.cast import Raw
from .codecs.lossless import ByteStage
from .errors import CorruptPayload, GradcodecError, InvalidInput
from .registry import byte_stage_of, canonical_spec

Tensors = Union[torch.Tensor, Mapping[str, torch.Tensor]]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SINGLE_NAME = ""  # the name a lone tensor travels under
RAW = Raw()


def as_named(x: Tensors) -> tuple[dict[str, torch.Tensor], bool]:
    """Validate the caller's input: (dict name -> detached tensor, whether it was a lone tensor)."""
    if isinstance(x, torch.Tensor):
        named, single = {SINGLE_NAME: x}, True
    elif isinstance(x, Mapping):
        named, single = dict(x), False
    else:
        raise InvalidInput(f"expected a tensor or a dict of named tensors, got {type(x).__name__}")
    for name, t in named.items():
        if not isinstance(name, str):
            raise InvalidInput(f"tensor names must be strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise InvalidInput(f"value of {name!r} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise InvalidInput(f"tensor {name!r} is {t.layout}/{t.device.type}; only dense tensors with data can be encoded")
        if t.dtype not in wire.CODE_OF_DTYPE:
            raise InvalidInput(f"tensor {name!r} has dtype {t.dtype}; supported: {', '.join(map(str, wire.CODE_OF_DTYPE))}")
    return {name: t.detach() for name, t in named.items()}, single


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not all_finite(t):
        raise InvalidInput(
            f"tensor {name!r} contains NaN or Inf; fix the update (e.g. clip or skip the step), or pass"
            " allow_nonfinite=True with a lossless codec (raw, zstd) to send it as is"
        )


class Codec(ABC):
    """A configured codec: `encode(x) -> bytes`, `decode(bytes) -> x`, plus optional client state.

    Public attributes: `spec`, the canonical spec written into every payload, `lossless`, whether
    decode(encode(x)) is bit-exact for every input (integer and bool tensors are always sent raw), and
    `model`, the learned model a learned codec encodes with (None for the classic codecs): the spec
    names no model, so a transport that carries the spec also carries `model.fingerprint`.
    """

    spec: str
    lossless: bool
    model = None
    prepass = None  # a whole-update stage (gradcodec.codecs.dp) that encode runs first; see attach_prepass

    def __init__(self, byte_stage: ByteStage | None = None, seed: int | None = None, allow_nonfinite: bool = False):
        self.byte_stage = byte_stage
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.allow_nonfinite = allow_nonfinite

    def _check_options(self) -> None:
        if self.allow_nonfinite and not self.lossless:
            raise InvalidInput(f"allow_nonfinite=True needs a lossless codec (raw, zstd); {self.spec!r} is lossy")

    # ------------------------------------------------------------------ whole-update pre-pass (dp)
    def attach_prepass(self, stage: Stage) -> None:
        """Run `stage.prepare(named) -> named` on the whole update at the start of every encode.

        It runs before encode_named, hence before error feedback adds its residual (the residual is
        then post-processing of the stage's output, as DP requires). The stage is client-side only:
        `spec` (what rebuilds this codec, e.g. for a federation's handshake) names it first, while
        payloads record `payload_spec`, without it, since decoding needs nothing from it.
        """
        self.prepass = stage
        self.spec = canonical_spec([stage]) + "|" + self.spec
        self.lossless = False

    @property
    def payload_spec(self) -> str:
        """The canonical spec written into payloads: `spec` without a client-side pre-pass stage."""
        return self.spec if self.prepass is None else self.spec.split("|", 1)[1]

    # ------------------------------------------------------------------ subclass interface
    @abstractmethod
    def encode_named(self, named: dict[str, torch.Tensor], residuals: dict[str, torch.Tensor] | None) -> wire.Message:
        """Sections for `named`. With `residuals`, encode x + residual and update residual in place."""

    @abstractmethod
    def decode_named(self, msg: wire.Message, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors of `msg`, in the message's order; shapes as declared, dtypes may differ."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Client-side state kept between encodes; empty for stateless codecs."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise InvalidInput(f"codec {self.spec!r} keeps no state but was given keys {sorted(state)[:3]}")

    # ------------------------------------------------------------------ public verbs
    def encode(self, x: Tensors, *, residuals: dict[str, torch.Tensor] | None = None, by_reference: bool = False) -> bytes:
        """Encode one tensor or a dict of named tensors into self-describing bytes.

        by_reference: leave the names, dtypes and shapes out and name them by an 8-byte fingerprint
            (gradcodec.Layout.of(x)); only a decoder given that layout can decode the payload. For
            transports where both ends already hold the tensors' layout (a federated round).
        `residuals` is the error-feedback state that gradcodec.ErrorFeedback passes; leave it out.
        """
        named, single = as_named(x)
        if self.prepass is not None:
            named = self.prepass.prepare(named)  # before encode_named adds any error-feedback residual
        msg = self.encode_named(named, residuals)
        msg.single = single
        return wire.pack(msg, compress=self.byte_stage.compress if self.byte_stage else None, by_reference=by_reference)

    def decode(self, blob: bytes, device: str | torch.device | None = None, max_output_bytes: int | None = None,
               layout: Tensors | wire.Layout | None = None) -> Tensors:
        """Decode bytes that this codec (same canonical spec) produced; see gradcodec.decode."""
        msg = unpack(blob, max_output_bytes, layout)
        if msg.codec != self.payload_spec:
            raise InvalidInput(
                f"payload was encoded with {msg.codec!r} but this codec is {self.payload_spec!r}; use gradcodec.decode(blob)"
            )
        return self.decode_message(msg, device)

    def decode_message(self, msg: wire.Message, device: str | torch.device | None = None) -> Tensors:
        device = torch.device(device or "cpu")
        if len({e.name for e in msg.tensors}) != len(msg.tensors):
            raise CorruptPayload("the payload's tensor table repeats a name")
        decoded = self.decode_named(msg, device)
        out = {}
        for entry in msg.tensors:
            t = decoded[entry.name]
            if tuple(t.shape) != entry.shape:
                raise CorruptPayload(f"tensor {entry.name!r} decoded to shape {tuple(t.shape)}, header says {entry.shape}")
            out[entry.name] = t.to(dtype=entry.dtype, device=device)
        if msg.single:
            if len(out) != 1:
                raise CorruptPayload(f"payload is marked single-tensor but holds {len(out)} tensors")
            return next(iter(out.values()))
        return out


def as_layout(layout: Tensors | wire.Layout | None) -> wire.Layout | None:
    """The wire Layout of a `layout=` argument: a Layout, or the tensors (one, or a dict) it describes."""
    if layout is None or isinstance(layout, wire.Layout):
        return layout
    named, single = as_named(layout)
    return wire.Layout.of(named)


def unpack(blob: bytes, max_output_bytes: int | None = None, layout: Tensors | wire.Layout | None = None) -> wire.Message:
    """wire.unpack with the byte stage its spec names; any unexpected failure becomes CorruptPayload."""
    layout = as_layout(layout)
    try:
        return wire.unpack(blob, max_output_bytes, decompress=_decompress, layout=layout)
    except GradcodecError:
        raise
    except (ValueError, TypeError, OverflowError, RuntimeError) as e:
        raise CorruptPayload(f"malformed payload: {e}") from e


def _decompress(spec: str, data: memoryview, size: int, places: list[wire.SectionPlace]) -> bytes:
    """Undo the byte stage that ends `spec` (zstd, ans, ...): exactly `size` bytes or CorruptPayload."""
    try:
        stage = byte_stage_of(spec)
    except GradcodecError as e:
        raise CorruptPayload(f"payload names an invalid codec spec {spec!r}: {e}") from None
    if stage is None:
        raise CorruptPayload(f"payload region is marked compressed but its spec {spec!r} ends in no byte stage")
    return stage.decompress(data, size, places)


class PipelineCodec(Codec):
    """A chain of per-tensor stages (see gradcodec.codecs.base); each tensor is encoded on its own."""

    def __init__(self, root: Stage, byte_stage: ByteStage | None = None, seed: int | None = None, allow_nonfinite: bool = False):
        super().__init__(byte_stage, seed, allow_nonfinite)
        prepass = root if hasattr(root, "prepare") else None
        root = root.inner if prepass is not None else root
        self.root = root
        self.stages = []
        stage = root
        while stage is not None:
            self.stages.append(stage)
            stage = getattr(stage, "inner", None)
        self.lossless = all(s.lossless for s in self.stages)
        self.spec = canonical_spec(self.stages + ([byte_stage] if byte_stage else []))
        misplaced = [s.name for s in self.stages if hasattr(s, "prepare")]
        if misplaced:
            raise InvalidInput(f"{misplaced[0]!r} acts on the whole update and must be the first stage of the spec, before any transform")
        if prepass is not None:
            self.attach_prepass(prepass)
        self._check_options()

    def _stage_for(self, dtype: torch.dtype) -> Stage:
        # integer and bool tensors (step counters, masks) always travel raw: no codec loses them
        return self.root if dtype.is_floating_point else RAW

    def encode_named(self, named, residuals):
        entries = []
        for name, x in named.items():
            stage = self._stage_for(x.dtype)
            if not self.allow_nonfinite and not stage.checks_finite:
                check_finite(name, x)
            ctx = EncodeContext(name, self.generator)
            x = x.contiguous()
            if residuals is None or stage is RAW:
                sections = stage.encode(x, ctx)
            else:
                sections = stage.encode_feedback(x, residuals[name], ctx)
            entries.append(wire.TensorEntry(name, x.dtype, tuple(x.shape), sections))
        return wire.Message(self.payload_spec, entries)

    def decode_named(self, msg, device):
        if msg.shared:
            raise CorruptPayload(f"codec {self.spec!r} uses no shared sections but the payload has {len(msg.shared)}")
        out = {}
        for entry in msg.tensors:
            stage = self._stage_for(entry.dtype)
            expected = stage.n_sections(entry.shape)
            if len(entry.sections) != expected:
                raise CorruptPayload(
                    f"tensor {entry.name!r}: payload has {len(entry.sections)} sections, codec {self.spec!r} expects {expected}"
                )
            out[entry.name] = stage.decode([s.to(device) for s in entry.sections], entry.shape)
        return out

    def state_dict(self):
        return {f"{i}.{k}": v for i, s in enumerate(self.stages) for k, v in s.state_dict().items()}

    def load_state_dict(self, state):
        per_stage: dict[int, dict] = {}
        for key, value in state.items():
            idx, _, rest = key.partition(".")
            if not idx.isdigit() or int(idx) >= len(self.stages):
                raise InvalidInput(f"state key {key!r} does not belong to codec {self.spec!r}")
            per_stage.setdefault(int(idx), {})[rest] = value
        for i, stage in enumerate(self.stages):
            stage.load_state_dict(per_stage.get(i, {}))
