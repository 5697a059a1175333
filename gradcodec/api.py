"""The public verbs: encode, decode, get_codec, list_codecs, inspect."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import registry, wire
from .codec import Codec, PipelineCodec, Tensors, as_layout, unpack
from .errors import CorruptPayload, GradcodecError, InvalidInput
from .feedback import ErrorFeedback
from .wire import Layout


def get_codec(
    spec: str = "int8",
    *,
    error_feedback: bool = False,
    seed: int | None = None,
    allow_nonfinite: bool = False,
    **params: Any,
) -> Codec | ErrorFeedback:
    """A configured, possibly stateful codec object with `.encode(x)` and `.decode(blob)`.

    spec: a codec name or pipeline, e.g. "int8", "int4:block=128", "topk:ratio=0.01|int8|zstd".
    error_feedback: keep a client-side residual so that what one encode loses is sent later.
    seed: seeds the codec's random stream (stochastic rounding, random-k) for reproducible runs.
    allow_nonfinite: let NaN/Inf through (lossless codecs only); by default they raise InvalidInput.
    params: parameters of one stage of the spec, e.g. get_codec("int8", block=128).
    """
    options = {"seed": seed, "allow_nonfinite": allow_nonfinite}
    kind, root, byte_stage = registry.build(spec, params, resources=options)
    codec = root if kind == "codec" else PipelineCodec(root, byte_stage, **options)
    return ErrorFeedback(codec) if error_feedback else codec


def encode(x: Tensors, codec: str = "int8", *, by_reference: bool = False, **params: Any) -> bytes:
    """Encode a tensor or a dict of named tensors with a one-off codec; see get_codec.

    by_reference: name the tensors' layout (names, dtypes, shapes) by an 8-byte fingerprint instead of
        carrying it; decode then needs `layout=` (the same tensors, or gradcodec.Layout.of them). The
        default, self-describing form decodes from the bytes alone.
    """
    return get_codec(codec, **params).encode(x, by_reference=by_reference)


def decode(
    blob: bytes,
    device: str | torch.device | None = None,
    *,
    models: Sequence[Any] | None = None,
    max_output_bytes: int | None = None,
    layout: Tensors | Layout | None = None,
) -> Tensors:
    """Decode any gradcodec payload: the bytes say which codec made them.

    device: where the tensors are returned (default CPU).
    models: model files (or loaded models) for learned codecs; the one whose fingerprint matches the
        payload is used.
    max_output_bytes: refuse payloads that would decode to more than this many bytes (default
        65536 x the payload's size, at least 1 MiB); raise it for trusted, extremely sparse payloads.
    layout: for a payload encoded with by_reference=True, the tensors it encodes (values unused) or
        their gradcodec.Layout; a missing or different layout raises LayoutMismatch.
    Raises a GradcodecError subclass for anything that is not a valid payload.
    """
    msg = unpack(blob, max_output_bytes, layout)
    try:
        kind, root, _ = registry.build(msg.codec, resources={"models": models})
    except InvalidInput as e:
        raise CorruptPayload(f"payload names an invalid codec spec {msg.codec!r}: {e}") from None
    codec = root if kind == "codec" else PipelineCodec(root)
    return codec.decode_message(msg, device)


def list_codecs() -> list[str]:
    """Names of all registered codec stages (combine them into pipelines with '|')."""
    return registry.list_codecs()


@dataclass
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    payload_bytes: int  # bytes of this tensor's own sections (before zstd, if any)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class PayloadInfo:
    """What a payload holds, read from its header without decoding the tensors."""

    codec: str
    version: int
    fingerprint: str
    single: bool
    compressed: bool
    by_reference: bool  # the tensor layout travelled as a fingerprint (`layout` below), not as a table
    layout: str  # hex fingerprint of the tensors' layout (names, dtypes, shapes)
    tensors: list[TensorInfo]
    payload_bytes: int  # total length of the byte string
    original_bytes: int  # bytes of the tensors it decodes to

    @property
    def ratio(self) -> float:
        """Compression ratio: original bytes / payload bytes."""
        return self.original_bytes / self.payload_bytes

    @property
    def bits_per_element(self) -> float:
        n = sum(math.prod(t.shape) for t in self.tensors)
        return 8 * self.payload_bytes / n if n else float("nan")


def inspect(blob: bytes, layout: Tensors | Layout | None = None) -> PayloadInfo:
    """Describe a payload (codec, version, tensors, sizes, ratio) without decoding it.

    layout: needed for a by-reference payload (see decode), whose tensors the bytes do not list.
    """
    layout = as_layout(layout)
    try:
        h = wire.read_header(blob, layout=layout)
    except GradcodecError:
        raise
    except (ValueError, TypeError) as e:
        raise CorruptPayload(f"malformed payload: {e}") from e
    tensors = [TensorInfo(name, dt, shape, sum(s.nbytes for s in infos)) for name, dt, shape, infos in h.tensors]
    return PayloadInfo(
        codec=h.codec,
        version=h.version,
        fingerprint=h.fingerprint.hex(),
        single=h.single,
        compressed=h.compressed,
        by_reference=h.by_reference,
        layout=(h.layout_fingerprint or Layout(tuple((n, dt, sh) for n, dt, sh, _ in h.tensors)).fingerprint).hex(),
        tensors=tensors,
        payload_bytes=h.total_len,
        original_bytes=sum(t.nbytes for t in tensors),
    )
