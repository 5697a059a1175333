"""zstd over the whole payload: the lossless last stage of any pipeline ("...|zstd").

The wire layer applies it to the concatenated sections, so every stage before it benefits, and
decoding checks the frame against the length the header declares before trusting it.
"""
from __future__ import annotations

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

    def compress(self, data: bytes) -> bytes:
        return self._compressor.compress(data)


def zstd_decompress(data: bytes | memoryview, size: int) -> bytes:
    """Decompress one zstd frame that must expand to exactly `size` bytes."""
    try:
        out = zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=size)
    except zstandard.ZstdError as e:
        raise CorruptPayload(f"zstd payload does not decompress: {e}") from None
    if len(out) != size:
        raise CorruptPayload(f"zstd payload expands to {len(out)} bytes, the header declares {size}")
    return out
