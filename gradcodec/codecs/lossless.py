"""zstd over the whole payload: the lossless last stage of any pipeline ("...|zstd").

The wire layer applies it to the concatenated sections, so every stage before it benefits, and
decoding checks the frame against the length the header declares before trusting it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import zstandard

from ..errors import CorruptPayload
from ..registry import register
from .base import require

STEP = 1 << 20  # bytes of input per compress call


class ByteStage(Protocol):
    """What the wire layer needs of a byte stage (kind "bytes"): any parameter `decompress` depends
    on must be in `wire_params`, since decoding rebuilds the stage from the payload's spec."""

    name: str
    kind: str

    def wire_params(self) -> dict: ...

    def compress(self, buffers: Sequence[bytes | memoryview], total: int, sections: Sequence | None = None) -> list[bytes]:
        """The byte stage's output for the region `buffers` (`total` bytes); `sections`: the
        wire.SectionPlace of each section in it, which the decoder is given too."""

    def decompress(self, data: bytes | memoryview, size: int, sections: Sequence | None = None) -> bytes:
        """Exactly `size` bytes, or CorruptPayload; `sections` as given to compress."""


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

    def compress(self, buffers: Sequence[bytes | memoryview], total: int, sections: Sequence | None = None) -> list[bytes]:
        """One zstd frame of the concatenated `buffers` (`total` bytes), as pieces to be concatenated.

        The input goes in slices of STEP bytes and the pieces are left unjoined: the caller copies
        them once into the payload, so the frame is never held twice (compressing a whole section
        in one call, or joining the pieces, would hold a second copy).
        """
        stream = self._compressor.compressobj(size=total)
        pieces = []
        for b in buffers:
            view = memoryview(b)
            pieces += [stream.compress(view[start : start + STEP]) for start in range(0, len(view), STEP)]
        pieces.append(stream.flush())
        return pieces

    def decompress(self, data: bytes | memoryview, size: int, sections: Sequence | None = None) -> bytes:
        """Decompress one zstd frame that must expand to exactly `size` bytes (`sections` unused).

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
