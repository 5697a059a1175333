"""THE byte layout of a gradcodec payload. Nothing else in gradcodec reads or writes bytes.

A payload carries a codec spec, a table of the original tensors (name, dtype, shape), and a list of
*sections*: flat typed arrays that the codec produced (codes, scales, indices, seeds, ...). Each
tensor owns the sections listed with it; a codec that encodes all tensors jointly (the learned
codec) puts its sections in the shared list. The layout is documented byte by byte in
docs/wire-format.md and pinned by golden vectors in tests/test_wire.py.

Decoding is defensive: every length is checked against the bytes present, and the output size
against a limit derived from the payload length, before anything is allocated.
"""
from __future__ import annotations

import math
import struct
import sys
import zlib
from dataclasses import dataclass, field

import torch

from .errors import CorruptPayload, PayloadTooLarge, UnsupportedVersion

MAGIC = b"GCDC"
VERSION = 1
PRELUDE = struct.Struct("<4sHHIQ")  # magic, version, flags, header length, stored payload length
ALIGN = 8  # the header ends, and the payload region starts, 8-byte aligned
CHECKSUM = struct.Struct("<I")

FLAG_SINGLE = 1  # the input was one tensor, not a dict
FLAG_ZSTD = 2  # the payload region is one zstd frame
KNOWN_FLAGS = FLAG_SINGLE | FLAG_ZSTD

MAX_SPEC_BYTES = 4096
MAX_NAME_BYTES = 65535
MAX_FINGERPRINT = 255
MAX_NDIM = 32
NAME_EXPANSION = 64  # decoded name bytes per header byte, at most (real LoRA names: about 6)
# A section or output larger than this many times the payload is refused unless the caller raises
# the limit. Sparse and low-rank codecs legitimately expand by 10^2..10^4; random-k only sends values.
DEFAULT_MAX_EXPANSION = 1 << 16
MIN_OUTPUT_LIMIT = 1 << 20

# One table for every dtype that may appear on the wire: code <-> torch dtype.
DTYPE_CODES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.float64,
    5: torch.uint8,
    6: torch.int8,
    7: torch.int16,
    8: torch.int32,
    9: torch.int64,
    10: torch.bool,
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


@dataclass
class TensorEntry:
    """One original tensor: what decode must return, and the sections that encode it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    sections: list[torch.Tensor] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass
class Message:
    """Everything a payload holds, in decoded form."""

    codec: str
    tensors: list[TensorEntry]
    shared: list[torch.Tensor] = field(default_factory=list)
    single: bool = False
    fingerprint: bytes = b""


@dataclass
class SectionInfo:
    dtype: torch.dtype
    count: int

    @property
    def nbytes(self) -> int:
        return self.count * _itemsize(self.dtype)


@dataclass
class Header:
    """The parsed header of a payload: enough to describe it without touching the sections."""

    version: int
    flags: int
    codec: str
    fingerprint: bytes
    raw_payload_len: int
    stored_payload_len: int
    total_len: int
    tensors: list[tuple[str, torch.dtype, tuple[int, ...], list[SectionInfo]]]
    shared: list[SectionInfo]
    payload_offset: int

    @property
    def single(self) -> bool:
        return bool(self.flags & FLAG_SINGLE)

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_ZSTD)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _pad(n: int, align: int = ALIGN) -> int:
    return -n % align


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise CorruptPayload("gradcodec payloads are little-endian and this host is big-endian; not supported")


def _varint(n: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, low groups first, high bit set on all but the last byte."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _shared_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def section_layout(infos: list[SectionInfo]) -> tuple[list[int], int]:
    """Offsets of the sections in the payload region, each aligned to its element size, and its length."""
    offsets, pos = [], 0
    for s in infos:
        pos += _pad(pos, _itemsize(s.dtype))
        offsets.append(pos)
        pos += s.nbytes
    return offsets, pos


# --------------------------------------------------------------------------------------------- write


def _section_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu().reshape(-1)
    if t.dtype not in CODE_OF_DTYPE:
        raise TypeError(f"internal: section dtype {t.dtype} has no wire code")
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def pack(msg: Message, compress=None) -> bytes:
    """Serialise `msg`.

    `compress(buffers, total)`, if given, turns the payload region (the concatenation of `buffers`,
    `total` bytes) into one zstd frame, returned as pieces to be concatenated.
    """
    _require_little_endian()
    spec = msg.codec.encode("utf-8")
    if len(spec) > MAX_SPEC_BYTES:
        raise ValueError(f"codec spec longer than {MAX_SPEC_BYTES} bytes")
    if len(msg.fingerprint) > MAX_FINGERPRINT:
        raise ValueError(f"model fingerprint longer than {MAX_FINGERPRINT} bytes")
    chunks: list[memoryview] = []
    raw_len = 0

    def section_list(sections: list[torch.Tensor]) -> bytes:
        nonlocal raw_len
        out = bytearray(_varint(len(sections)))
        for t in sections:
            pad = _pad(raw_len, t.element_size())
            if pad:
                chunks.append(memoryview(b"\0" * pad))
            data = _section_bytes(t)
            chunks.append(data)
            raw_len += pad + len(data)
            out += bytes([CODE_OF_DTYPE[t.dtype]]) + _varint(t.numel())
        return bytes(out)

    table = bytearray(_varint(len(msg.tensors)))
    previous = b""
    for entry in msg.tensors:
        name = entry.name.encode("utf-8")
        if len(name) > MAX_NAME_BYTES:
            raise ValueError(f"tensor name longer than {MAX_NAME_BYTES} bytes: {entry.name[:40]}...")
        if len(entry.shape) > MAX_NDIM:
            raise ValueError(f"tensor {entry.name!r} has more than {MAX_NDIM} dimensions")
        shared = _shared_prefix(previous, name)
        table += _varint(shared) + _varint(len(name) - shared) + name[shared:]
        table += bytes([CODE_OF_DTYPE[entry.dtype], len(entry.shape)]) + b"".join(map(_varint, entry.shape))
        table += section_list(entry.sections)
        previous = name
    table += section_list(msg.shared)

    head = _varint(len(spec)) + spec + _varint(len(msg.fingerprint)) + msg.fingerprint + _varint(raw_len) + table
    head += b"\0" * _pad(PRELUDE.size + len(head))
    flags = FLAG_SINGLE if msg.single else 0
    if compress is not None:
        stored = [memoryview(piece) for piece in compress(chunks, raw_len)]
        flags |= FLAG_ZSTD
    else:
        stored = chunks
    stored_len = sum(len(c) for c in stored)
    front = PRELUDE.pack(MAGIC, VERSION, flags, len(head), stored_len) + head
    crc = zlib.crc32(front)
    for c in stored:
        crc = zlib.crc32(c, crc)
    # one join: the sections are copied once, straight into the returned bytes
    return b"".join([front, *stored, CHECKSUM.pack(crc)])


# ---------------------------------------------------------------------------------------------- read


class _Reader:
    """Bounds-checked reads from the header region."""

    def __init__(self, buf: memoryview, start: int, end: int):
        self.buf, self.pos, self.end = buf, start, end

    @property
    def left(self) -> int:
        return self.end - self.pos

    def byte(self, what: str) -> int:
        if self.pos >= self.end:
            raise CorruptPayload(f"header truncated while reading {what} at byte {self.pos}")
        self.pos += 1
        return self.buf[self.pos - 1]

    def varint(self, what: str, limit: int = 1 << 62) -> int:
        value = shift = 0
        while True:
            b = self.byte(what)
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 63:
                raise CorruptPayload(f"{what}: variable-length integer longer than 10 bytes")
        if value > limit:
            raise CorruptPayload(f"{what} is {value}, more than the allowed {limit}")
        return value

    def take_bytes(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise CorruptPayload(f"header truncated while reading {what} ({n} bytes at byte {self.pos})")
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def dtype(self, what: str) -> torch.dtype:
        code = self.byte(what)
        if code not in DTYPE_CODES:
            raise CorruptPayload(f"unknown dtype code {code} in {what}")
        return DTYPE_CODES[code]

    def sections(self, what: str) -> list[SectionInfo]:
        # each section takes at least 2 header bytes: a count the header cannot hold is refused first
        n = self.varint(f"section count of {what}", limit=self.left // 2)
        return [SectionInfo(self.dtype(f"section {i} of {what}"), self.varint(f"length of section {i} of {what}")) for i in range(n)]


def read_header(blob: bytes | bytearray | memoryview, verify_checksum: bool = True) -> Header:
    """Parse and validate the prelude and header of `blob` without reading the sections."""
    _require_little_endian()
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CorruptPayload(f"expected bytes, got {type(blob).__name__}")
    buf = memoryview(blob).cast("B")
    total = len(buf)
    if total < PRELUDE.size + CHECKSUM.size:
        raise CorruptPayload(f"payload of {total} bytes is shorter than the smallest valid payload")
    magic, version, flags, head_len, stored_len = PRELUDE.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CorruptPayload(f"not a gradcodec payload (magic {magic!r}, expected {MAGIC!r})")
    if version > VERSION or version == 0:
        raise UnsupportedVersion(
            f"payload has wire-format version {version}; this gradcodec reads version {VERSION}"
            + ("; upgrade gradcodec to decode it" if version > VERSION else "")
        )
    if flags & ~KNOWN_FLAGS:
        raise CorruptPayload(f"unknown flag bits {flags & ~KNOWN_FLAGS:#x} in payload prelude")
    payload_offset = PRELUDE.size + head_len
    expected_total = payload_offset + stored_len + CHECKSUM.size
    if head_len % ALIGN != (-PRELUDE.size) % ALIGN or expected_total != total:
        raise CorruptPayload(
            f"payload length {total} does not match its header (header {head_len} + payload {stored_len} bytes"
            f" + prelude and checksum = {expected_total}); the payload is truncated or was altered"
        )
    if verify_checksum:
        (stored_crc,) = CHECKSUM.unpack_from(buf, total - CHECKSUM.size)
        actual = zlib.crc32(buf[: total - CHECKSUM.size])
        if stored_crc != actual:
            raise CorruptPayload(f"checksum mismatch (stored {stored_crc:#010x}, computed {actual:#010x})")

    r = _Reader(buf, PRELUDE.size, payload_offset)
    try:
        codec = r.take_bytes(r.varint("codec spec length", MAX_SPEC_BYTES), "codec spec").decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptPayload(f"codec spec is not valid UTF-8: {e}") from None
    fingerprint = r.take_bytes(r.varint("fingerprint length", MAX_FINGERPRINT), "fingerprint")
    raw_len = r.varint("payload length")
    # each tensor takes at least 5 header bytes: a count the header cannot hold is refused first
    n_tensors = r.varint("tensor count", limit=r.left // 5)
    tensors = []
    previous = b""
    # front coding lets a few header bytes repeat a long name: cap the decoded names' total size
    name_budget = NAME_EXPANSION * head_len + MAX_NAME_BYTES
    for i in range(n_tensors):
        shared = r.varint(f"name prefix of tensor {i}", limit=len(previous))
        suffix = r.take_bytes(r.varint(f"name length of tensor {i}", MAX_NAME_BYTES - shared), f"name of tensor {i}")
        previous = previous[:shared] + suffix
        name_budget -= len(previous)
        if name_budget < 0:
            raise CorruptPayload(f"tensor names decode to more than {NAME_EXPANSION}x the header's size")
        try:
            name = previous.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorruptPayload(f"name of tensor {i} is not valid UTF-8: {e}") from None
        dtype = r.dtype(f"tensor {name!r}")
        ndim = r.byte(f"ndim of tensor {name!r}")
        if ndim > MAX_NDIM:
            raise CorruptPayload(f"tensor {name!r} declares {ndim} dimensions (max {MAX_NDIM})")
        shape = tuple(r.varint(f"dimension {d} of tensor {name!r}") for d in range(ndim))
        tensors.append((name, dtype, shape, r.sections(f"tensor {name!r}")))
    shared_sections = r.sections("shared sections")
    pad = payload_offset - r.pos
    if pad >= ALIGN or any(buf[r.pos : payload_offset]):
        raise CorruptPayload(f"header has {pad} unexplained bytes after the section table")
    return Header(version, flags, codec, fingerprint, raw_len, stored_len, total, tensors, shared_sections, payload_offset)


def output_limit(payload_len: int, max_output_bytes: int | None) -> int:
    """The most bytes decode may allocate for a payload of `payload_len` bytes."""
    if max_output_bytes is not None:
        return max_output_bytes
    return max(MIN_OUTPUT_LIMIT, payload_len * DEFAULT_MAX_EXPANSION)


def unpack(blob: bytes | bytearray | memoryview, max_output_bytes: int | None = None, decompress=None) -> Message:
    """Parse `blob` into a Message, checking every size before allocating.

    `decompress(data, size)` must return exactly `size` bytes or raise CorruptPayload; it is needed
    only for payloads whose zstd flag is set.
    """
    h = read_header(blob)
    buf = memoryview(blob).cast("B")
    limit = output_limit(h.total_len, max_output_bytes)

    all_sections = [s for t in h.tensors for s in t[3]] + h.shared
    offsets, declared = section_layout(all_sections)
    if declared != h.raw_payload_len:
        raise CorruptPayload(f"section table sums to {declared} bytes but the header declares {h.raw_payload_len}")
    out_bytes = sum(_itemsize(dt) * math.prod(shape) for _, dt, shape, _ in h.tensors)
    if out_bytes > limit:
        raise PayloadTooLarge(
            f"decoding would allocate {out_bytes} bytes for a {h.total_len}-byte payload (limit {limit});"
            " pass max_output_bytes to decode if this payload is trusted"
        )
    stored = buf[h.payload_offset : h.payload_offset + h.stored_payload_len]
    if h.raw_payload_len > limit:
        raise PayloadTooLarge(f"payload sections of {h.raw_payload_len} bytes exceed the limit {limit}")
    if h.compressed:
        if decompress is None:
            raise CorruptPayload("payload is zstd-compressed but no decompressor was given")
        region = bytearray(decompress(stored, h.raw_payload_len))
    else:
        if h.raw_payload_len != h.stored_payload_len:
            raise CorruptPayload(
                f"uncompressed payload of {h.stored_payload_len} bytes but the header declares {h.raw_payload_len}"
            )
        region = bytearray(stored)

    views, end = [], 0
    for info, offset in zip(all_sections, offsets):
        if any(region[end:offset]):
            raise CorruptPayload(f"non-zero padding before a section at payload byte {end}")
        raw = torch.frombuffer(region, dtype=torch.uint8, count=info.nbytes, offset=offset) if info.nbytes else torch.empty(0, dtype=torch.uint8)
        views.append(raw.view(info.dtype))
        end = offset + info.nbytes
    tensors, i = [], 0
    for name, dt, shape, infos in h.tensors:
        tensors.append(TensorEntry(name, dt, shape, views[i : i + len(infos)]))
        i += len(infos)
    shared = views[i:]
    return Message(h.codec, tensors, shared, h.single, h.fingerprint)
