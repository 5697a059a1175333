"""THE byte layout of a gradcodec payload. Nothing else in gradcodec reads or writes bytes.

A payload carries a codec spec, a table of the original tensors (name, dtype, shape), and a list of
*sections*: flat typed arrays that the codec produced (codes, scales, indices, seeds, ...). Each
tensor owns the sections listed with it; a codec that encodes all tensors jointly (the learned
codec) puts its sections in the shared list. The layout is documented byte by byte in
docs/wire-format.md and pinned by golden vectors in tests/test_wire_golden.py.

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
CHECKSUM = struct.Struct("<I")
ALIGN = 8

FLAG_SINGLE = 1  # the input was one tensor, not a dict
FLAG_ZSTD = 2  # the payload region is one zstd frame
KNOWN_FLAGS = FLAG_SINGLE | FLAG_ZSTD

MAX_SPEC_BYTES = 4096
MAX_NDIM = 32
MAX_SECTIONS = 65535
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


def _pad(n: int) -> int:
    return -n % ALIGN


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise CorruptPayload("gradcodec payloads are little-endian and this host is big-endian; not supported")


# --------------------------------------------------------------------------------------------- write


def _section_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu().reshape(-1)
    if t.dtype not in CODE_OF_DTYPE:
        raise TypeError(f"internal: section dtype {t.dtype} has no wire code")
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def pack(msg: Message, compress=None) -> bytes:
    """Serialise `msg`.

    `compress(buffers, total)`, if given, turns the payload region (the concatenation of `buffers`,
    `total` bytes) into one zstd frame.
    """
    _require_little_endian()
    spec = msg.codec.encode("utf-8")
    if len(spec) > MAX_SPEC_BYTES:
        raise ValueError(f"codec spec longer than {MAX_SPEC_BYTES} bytes")
    if len(msg.fingerprint) > 255:
        raise ValueError("model fingerprint longer than 255 bytes")
    head = bytearray()
    head += struct.pack("<H", len(spec)) + spec
    head += struct.pack("<B", len(msg.fingerprint)) + msg.fingerprint
    raw_len_at = len(head)
    head += b"\0" * 8  # raw payload length, filled below
    head += struct.pack("<I", len(msg.tensors))
    chunks: list[memoryview] = []
    raw_len = 0

    def add_sections(sections: list[torch.Tensor]) -> None:
        nonlocal raw_len
        if len(sections) > MAX_SECTIONS:
            raise ValueError(f"more than {MAX_SECTIONS} sections")
        head.extend(struct.pack("<H", len(sections)))
        for s in sections:
            data = _section_bytes(s)
            head.extend(struct.pack("<BQ", CODE_OF_DTYPE[s.dtype], s.numel()))
            chunks.append(data)
            raw_len += len(data)
            if _pad(len(data)):
                chunks.append(memoryview(b"\0" * _pad(len(data))))
                raw_len += _pad(len(data))

    for entry in msg.tensors:
        name = entry.name.encode("utf-8")
        if len(name) > 0xFFFF:
            raise ValueError(f"tensor name longer than 65535 bytes: {entry.name[:40]}...")
        if len(entry.shape) > MAX_NDIM:
            raise ValueError(f"tensor {entry.name!r} has more than {MAX_NDIM} dimensions")
        head += struct.pack("<H", len(name)) + name
        head += struct.pack("<BB", CODE_OF_DTYPE[entry.dtype], len(entry.shape))
        head += struct.pack(f"<{len(entry.shape)}Q", *entry.shape)
        add_sections(entry.sections)
    add_sections(msg.shared)
    head[raw_len_at : raw_len_at + 8] = struct.pack("<Q", raw_len)
    head += b"\0" * _pad(PRELUDE.size + len(head))

    flags = FLAG_SINGLE if msg.single else 0
    if compress is not None:
        stored = [memoryview(compress(chunks, raw_len))]
        flags |= FLAG_ZSTD
    else:
        stored = chunks
    stored_len = sum(len(c) for c in stored)
    front = PRELUDE.pack(MAGIC, VERSION, flags, len(head), stored_len) + bytes(head)
    crc = zlib.crc32(front)
    for c in stored:
        crc = zlib.crc32(c, crc)
    # one join: the sections are copied once, straight into the returned bytes
    return b"".join([front, *stored, CHECKSUM.pack(crc)])


# ---------------------------------------------------------------------------------------------- read


class _Reader:
    """Bounds-checked little-endian reads from the header region."""

    def __init__(self, buf: memoryview, start: int, end: int):
        self.buf, self.pos, self.end = buf, start, end

    def take(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        if self.pos + size > self.end:
            raise CorruptPayload(f"header truncated while reading {what} at byte {self.pos}")
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return vals

    def take_bytes(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise CorruptPayload(f"header truncated while reading {what} ({n} bytes at byte {self.pos})")
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def dtype(self, what: str) -> torch.dtype:
        (code,) = self.take("<B", what)
        if code not in DTYPE_CODES:
            raise CorruptPayload(f"unknown dtype code {code} in {what}")
        return DTYPE_CODES[code]

    def sections(self, what: str) -> list[SectionInfo]:
        (n,) = self.take("<H", f"section count of {what}")
        out = []
        for i in range(n):
            dtype = self.dtype(f"section {i} of {what}")
            (count,) = self.take("<Q", f"length of section {i} of {what}")
            out.append(SectionInfo(dtype, count))
        return out


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
    (spec_len,) = r.take("<H", "codec spec length")
    if spec_len > MAX_SPEC_BYTES:
        raise CorruptPayload(f"codec spec of {spec_len} bytes exceeds {MAX_SPEC_BYTES}")
    try:
        codec = r.take_bytes(spec_len, "codec spec").decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptPayload(f"codec spec is not valid UTF-8: {e}") from None
    (fp_len,) = r.take("<B", "fingerprint length")
    fingerprint = r.take_bytes(fp_len, "fingerprint")
    (raw_len,) = r.take("<Q", "payload length")
    (n_tensors,) = r.take("<I", "tensor count")
    # each tensor needs at least 6 header bytes: refuse counts the header cannot hold before looping
    if n_tensors * 6 > payload_offset - r.pos:
        raise CorruptPayload(f"tensor count {n_tensors} cannot fit in a {head_len}-byte header")
    tensors = []
    for i in range(n_tensors):
        (name_len,) = r.take("<H", f"name length of tensor {i}")
        try:
            name = r.take_bytes(name_len, f"name of tensor {i}").decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorruptPayload(f"name of tensor {i} is not valid UTF-8: {e}") from None
        dtype = r.dtype(f"tensor {name!r}")
        (ndim,) = r.take("<B", f"ndim of tensor {name!r}")
        if ndim > MAX_NDIM:
            raise CorruptPayload(f"tensor {name!r} declares {ndim} dimensions (max {MAX_NDIM})")
        shape = r.take(f"<{ndim}Q", f"shape of tensor {name!r}")
        if any(d >= 1 << 62 for d in shape):
            raise CorruptPayload(f"tensor {name!r} declares an impossible shape {shape}")
        tensors.append((name, dtype, tuple(shape), r.sections(f"tensor {name!r}")))
    shared = r.sections("shared sections")
    pad = payload_offset - r.pos
    if pad < 0 or pad >= ALIGN or any(buf[r.pos : payload_offset]):
        raise CorruptPayload(f"header has {pad} unexplained bytes after the section table")
    return Header(version, flags, codec, fingerprint, raw_len, stored_len, total, tensors, shared, payload_offset)


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
    declared = sum(s.nbytes + _pad(s.nbytes) for s in all_sections)
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

    pos = 0

    def read(infos: list[SectionInfo]) -> list[torch.Tensor]:
        nonlocal pos
        out = []
        for s in infos:
            n = s.nbytes
            t = torch.frombuffer(region, dtype=torch.uint8, count=n, offset=pos) if n else torch.empty(0, dtype=torch.uint8)
            out.append(t.view(s.dtype))
            if any(region[pos + n : pos + n + _pad(n)]):
                raise CorruptPayload(f"non-zero padding after a section at payload byte {pos + n}")
            pos += n + _pad(n)
        return out

    tensors = [TensorEntry(name, dt, shape, read(infos)) for name, dt, shape, infos in h.tensors]
    shared = read(h.shared)
    return Message(h.codec, tensors, shared, h.single, h.fingerprint)
