"""THE byte layout of a gradcodec payload. Nothing else in gradcodec reads or writes bytes.

A payload carries a codec spec, a table of the original tensors (name, dtype, shape) — or, in the
by-reference form, only an 8-byte fingerprint of that table, for peers that already hold it —, and a list of
*sections*: flat typed arrays that the codec produced (codes, scales, indices, seeds, ...). Each
tensor owns the sections listed with it; a codec that encodes all tensors jointly (the learned
codec) puts its sections in the shared list. The layout is documented byte by byte in
docs/wire-format.md and pinned by golden vectors in tests/test_wire.py.

Decoding is defensive: every length is checked against the bytes present, and the output size
against a limit derived from the payload length, before anything is allocated.
"""
from __future__ import annotations

import hashlib
import math
import struct
import sys
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .errors import CorruptPayload, LayoutMismatch, PayloadTooLarge, UnsupportedVersion

MAGIC = b"GCDC"
VERSION = 2  # the newest version this module reads; it writes 1 unless a payload needs 2
LAYOUT_REF_VERSION = 2  # the first version with FLAG_LAYOUT_REF
PRELUDE = struct.Struct("<4sHHIQ")  # magic, version, flags, header length, stored payload length
ALIGN = 8  # the header ends, and the payload region starts, 8-byte aligned
CHECKSUM = struct.Struct("<I")

FLAG_SINGLE = 1  # the input was one tensor, not a dict
FLAG_ZSTD = 2  # the payload region went through the byte stage that ends the spec (zstd, ans)
FLAG_LAYOUT_REF = 4  # the tensor table names its layout by fingerprint instead of listing it (version 2)
KNOWN_FLAGS = FLAG_SINGLE | FLAG_ZSTD | FLAG_LAYOUT_REF
LAYOUT_FINGERPRINT_BYTES = 8

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


@dataclass(frozen=True)
class Layout:
    """The names, dtypes and shapes of a set of tensors, in order: what a by-reference payload leaves out.

    Both ends build it from tensors they already hold (`Layout.of`); `fingerprint` is the first 8
    bytes of the SHA-256 of the table a self-describing payload would carry, so two layouts match
    exactly when every name, dtype and shape, and their order, match.
    """

    entries: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]

    @classmethod
    def of(cls, tensors: "torch.Tensor | dict[str, torch.Tensor] | Layout") -> "Layout":
        """The layout of one tensor (named "", as a lone tensor travels) or of a dict of named tensors."""
        if isinstance(tensors, Layout):
            return tensors
        if isinstance(tensors, torch.Tensor):
            tensors = {"": tensors}
        if not hasattr(tensors, "items"):
            raise TypeError(f"a layout is made from a tensor or a dict of named tensors, not {type(tensors).__name__}")
        return cls(tuple((name, t.dtype, tuple(t.shape)) for name, t in tensors.items()))

    @property
    def fingerprint(self) -> bytes:
        table, previous = bytearray(_varint(len(self.entries))), b""
        for name, dtype, shape in self.entries:
            table += _layout_entry(previous, name, dtype, shape)
            previous = name.encode("utf-8")
        return hashlib.sha256(bytes(table)).digest()[:LAYOUT_FINGERPRINT_BYTES]


class SectionPlace(NamedTuple):
    """Where a section lies in the payload region, as both ends know it from the section table: what a
    byte stage may use to model each kind of section on its own (gradcodec.codecs.entropy)."""

    offset: int
    nbytes: int
    itemsize: int
    slot: int  # the section's index within its tensor's list; shared sections: SHARED_SLOT + index


SHARED_SLOT = 1000


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
    layout_fingerprint: bytes = b""  # by-reference payloads: the fingerprint of the layout they name

    @property
    def by_reference(self) -> bool:
        return bool(self.flags & FLAG_LAYOUT_REF)

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


def _layout_entry(previous: bytes, name_str: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """One tensor's row of the table: its name front-coded against the previous one, dtype, shape."""
    name = name_str.encode("utf-8")
    if len(name) > MAX_NAME_BYTES:
        raise ValueError(f"tensor name longer than {MAX_NAME_BYTES} bytes: {name_str[:40]}...")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensor {name_str!r} has more than {MAX_NDIM} dimensions")
    shared = _shared_prefix(previous, name)
    return (_varint(shared) + _varint(len(name) - shared) + name[shared:]
            + bytes([CODE_OF_DTYPE[dtype], len(shape)]) + b"".join(map(_varint, shape)))


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


def pack(msg: Message, compress=None, by_reference: bool = False) -> bytes:
    """Serialise `msg`.

    by_reference: write the tensor table as the 8-byte fingerprint of `Layout.of` the message's
    tensors (version 2) instead of their names, dtypes and shapes; the decoder must hold that layout.
    `compress(buffers, total, places)`, if given, turns the payload region (the concatenation of
    `buffers`, `total` bytes, whose sections lie at `places`) into the byte stage's output (one zstd frame, an ANS stream), returned as pieces
    to be concatenated.
    """
    _require_little_endian()
    spec = msg.codec.encode("utf-8")
    if len(spec) > MAX_SPEC_BYTES:
        raise ValueError(f"codec spec longer than {MAX_SPEC_BYTES} bytes")
    if len(msg.fingerprint) > MAX_FINGERPRINT:
        raise ValueError(f"model fingerprint longer than {MAX_FINGERPRINT} bytes")
    chunks: list[memoryview] = []
    places: list[SectionPlace] = []
    raw_len = 0

    def section_list(sections: list[torch.Tensor], shared: bool = False) -> bytes:
        nonlocal raw_len
        out = bytearray(_varint(len(sections)))
        for slot, t in enumerate(sections):
            pad = _pad(raw_len, t.element_size())
            if pad:
                chunks.append(memoryview(b"\0" * pad))
            data = _section_bytes(t)
            places.append(SectionPlace(raw_len + pad, len(data), t.element_size(), SHARED_SLOT + slot if shared else slot))
            chunks.append(data)
            raw_len += pad + len(data)
            out += bytes([CODE_OF_DTYPE[t.dtype]]) + _varint(t.numel())
        return bytes(out)

    if by_reference:
        layout = Layout(tuple((e.name, e.dtype, tuple(e.shape)) for e in msg.tensors))
        table = bytearray(layout.fingerprint + _varint(len(msg.tensors)))
        for entry in msg.tensors:
            table += section_list(entry.sections)
    else:
        table = bytearray(_varint(len(msg.tensors)))
        previous = b""
        for entry in msg.tensors:
            table += _layout_entry(previous, entry.name, entry.dtype, tuple(entry.shape)) + section_list(entry.sections)
            previous = entry.name.encode("utf-8")
    table += section_list(msg.shared, shared=True)

    head = _varint(len(spec)) + spec + _varint(len(msg.fingerprint)) + msg.fingerprint + _varint(raw_len) + table
    head += b"\0" * _pad(PRELUDE.size + len(head))
    flags = (FLAG_SINGLE if msg.single else 0) | (FLAG_LAYOUT_REF if by_reference else 0)
    if compress is not None:
        stored = [memoryview(piece) for piece in compress(chunks, raw_len, places)]
        flags |= FLAG_ZSTD
    else:
        stored = chunks
    stored_len = sum(len(c) for c in stored)
    version = LAYOUT_REF_VERSION if by_reference else 1  # old readers keep reading what needs nothing new
    front = PRELUDE.pack(MAGIC, version, flags, len(head), stored_len) + head
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


def read_header(blob: bytes | bytearray | memoryview, verify_checksum: bool = True, layout: Layout | None = None) -> Header:
    """Parse and validate the prelude and header of `blob` without reading the sections.

    layout: the tensor layout a by-reference payload names (ignored for self-describing ones); a
    by-reference payload without it, or with another layout, raises LayoutMismatch.
    """
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
    if flags & FLAG_LAYOUT_REF and version < LAYOUT_REF_VERSION:
        raise CorruptPayload(f"by-reference flag set in a version {version} payload")
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
    if flags & FLAG_LAYOUT_REF:
        named = r.take_bytes(LAYOUT_FINGERPRINT_BYTES, "layout fingerprint")
        if layout is None:
            raise LayoutMismatch(
                f"payload names its tensor layout by reference (fingerprint {named.hex()}) instead of carrying it;"
                " pass layout= (the tensors, or gradcodec.Layout.of them, whose names, dtypes and shapes it encodes)"
            )
        if layout.fingerprint != named:
            raise LayoutMismatch(
                f"payload was encoded for tensor layout {named.hex()}, but the layout given is {layout.fingerprint.hex()}"
                f" ({len(layout.entries)} tensors, first {layout.entries[0][0] if layout.entries else None!r}): names, dtypes,"
                " shapes or their order differ"
            )
        n_tensors = r.varint("tensor count", limit=r.left // 1)
        if n_tensors != len(layout.entries):
            raise CorruptPayload(f"payload lists {n_tensors} tensors but its layout {named.hex()} has {len(layout.entries)}")
        tensors = [(name, dtype, shape, r.sections(f"tensor {name!r}")) for name, dtype, shape in layout.entries]
        shared_sections = r.sections("shared sections")
        return _finish_header(buf, r, payload_offset, version, flags, codec, fingerprint, raw_len, stored_len, total,
                              tensors, shared_sections, named)
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
    return _finish_header(buf, r, payload_offset, version, flags, codec, fingerprint, raw_len, stored_len, total,
                          tensors, shared_sections)


def _finish_header(buf, r: _Reader, payload_offset: int, version: int, flags: int, codec: str, fingerprint: bytes,
                   raw_len: int, stored_len: int, total: int, tensors, shared_sections, layout_fingerprint: bytes = b"") -> Header:
    pad = payload_offset - r.pos
    if pad >= ALIGN or any(buf[r.pos : payload_offset]):
        raise CorruptPayload(f"header has {pad} unexplained bytes after the section table")
    return Header(version, flags, codec, fingerprint, raw_len, stored_len, total, tensors, shared_sections, payload_offset,
                  layout_fingerprint)


def output_limit(payload_len: int, max_output_bytes: int | None) -> int:
    """The most bytes decode may allocate for a payload of `payload_len` bytes."""
    if max_output_bytes is not None:
        return max_output_bytes
    return max(MIN_OUTPUT_LIMIT, payload_len * DEFAULT_MAX_EXPANSION)


def unpack(blob: bytes | bytearray | memoryview, max_output_bytes: int | None = None, decompress=None,
           layout: Layout | None = None) -> Message:
    """Parse `blob` into a Message, checking every size before allocating.

    layout: what a by-reference payload names (see read_header).

    `decompress(spec, data, size, places)` undoes the byte stage that ends the payload's codec spec
    (`places`: the SectionPlace of every section, as `pack` gave them to the compressor): it must
    return exactly `size` bytes or raise CorruptPayload; it is needed only for payloads whose
    compressed flag is set.
    """
    h = read_header(blob, layout=layout)
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
        slots = [i for t in h.tensors for i in range(len(t[3]))] + [SHARED_SLOT + i for i in range(len(h.shared))]
        places = [SectionPlace(o, s.nbytes, _itemsize(s.dtype), slot) for o, s, slot in zip(offsets, all_sections, slots)]
        region = bytearray(decompress(h.codec, stored, h.raw_payload_len, places))
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
