"""zstd over the whole payload: the lossless last stage of any pipeline ("...|zstd").

The wire layer applies it to the concatenated sections, so every stage before it benefits, and
decoding checks the frame against the length the header declares before trusting it.
"""
from __future__ import annotations

from collections.abc import Sequence

import zstandard

from ..errors import CorruptPayload
from ..registry import register
from .base import require


@register("zstd")
class Zstd:
    """Lossless zstd compression of the payload; `level` 1..22 trades encode time for size."""

    kind = "bytes"
    lossless = True

    def __init__(self, level: int = 3):
        require(1 <= level <= 22, f"zstd level must be in 1..22, got {level}")
        self.level = level
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)

    def wire_params(self) -> dict:
        return {}  # the level only matters when compressing

    def compress(self, buffers: Sequence[bytes | memoryview], total: int) -> bytes:
        """One zstd frame of the concatenated `buffers` (`total` bytes), without joining them first."""
        stream = self._compressor.compressobj(size=total)
        return b"".join([*(stream.compress(b) for b in buffers), stream.flush()])


def zstd_decompress(data: bytes | memoryview, size: int) -> bytes:
    """Decompress one zstd frame that must expand to exactly `size` bytes.

    The frame's own content-size field is not trusted: output is read in bounded chunks and
    decompression stops as soon as it would pass `size`.
    """
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(bytes(data), read_across_frames=False) as reader:
            while len(out) <= size:
                chunk = reader.read(min(size + 1 - len(out), 1 << 20))
                if not chunk:
                    break
                out += chunk
            trailing = reader.read(1) if len(out) == size else b""
    except zstandard.ZstdError as e:
        raise CorruptPayload(f"zstd payload does not decompress: {e}") from None
    if len(out) != size or trailing:
        raise CorruptPayload(f"zstd payload expands to {'more than ' if trailing else ''}{len(out)} bytes, the header declares {size}")
    return bytes(out)
