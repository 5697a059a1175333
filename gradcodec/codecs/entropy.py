"""Entropy coding of the payload with an adaptive order-0 model and ANS ("...|ans").

    payload region ──▶ contexts ──▶ w-bit symbols ──▶ adaptive counts ──▶ ANS (constriction's stack coder)
                                    (w = 8, 4 or 2)    (nothing sent)

The byte stage sees the concatenated sections (codes, scales, indices) as one byte string. Each byte
is split into 8 / w symbols of w bits, lowest bits first, and coded with asymmetric numeral systems
(Duda 2013) as implemented by the `constriction` package (Bamler 2022). The model is adaptive and
travels as nothing: every symbol's probability is its count so far plus a small prior, and the counts are
updated after each chunk of symbols (the chunks grow from FIRST_CHUNK to MAX_CHUNK symbols, so the
model learns fast on small payloads and costs little Python overhead on large ones). Encoder and
decoder derive the same counts from the symbols already coded, so no histogram is sent: on the 3-10 kB
payloads of a >= 100x LoRA update a 256-entry histogram would cost more than the coding gains.

The region is coded as one context, or, when the wire passes the section table to both ends, as one
context per kind of section (see context_slices). For each context the encoder picks the model from
the context's byte histogram (estimated size: static entropy plus the (K - 1)/2 * log2(n) bits an
adaptive model of K symbols pays to learn; a flat model at 8 bits a byte when that is cheaper), and
the whole stream falls back to storing the bytes when coding does not make them smaller. Layout:

    byte 0          format: 0 = stored (the region follows as is), 1 = coded
    bytes 1-2       number of contexts, uint16 little-endian (the decoder checks it against its own)
    1 byte each     the context's model: 0 = flat, 8 / 4 / 2 = adaptive w-bit symbols
    rest            the ANS coder's compressed words, uint32 little-endian; contexts in order

What it gains is what order-0 coding of the bytes can gain, no more: quantized Gaussian codes are
close to independent, and their order-0 entropy (~7.8 bits per int8 code, ~3.6 bits per int4 code
with block-absmax scaling) is the bound for any coder that sees only bytes. docs/results/entropy.md
compares it with zstd on the same payloads.

Decoding reads exactly `size` bytes' worth of symbols (memory proportional to `size`), checks that the
coder ends empty, and turns anything malformed into CorruptPayload.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from ..errors import CorruptPayload, InvalidInput
from ..registry import register

STORED, CODED = 0, 1  # format byte
UNIFORM = 0  # a context's model byte: 0 = flat (8 bits a byte), else the adaptive model's symbol width
WIDTHS = (8, 4, 2)
UNIT = 4  # count a seen symbol adds; every symbol starts at 1, a prior of 1/UNIT symbol
FIRST_CHUNK = 32  # symbols coded with the first (flat) model
MAX_CHUNK = 1 << 14  # chunk length once the model has settled
HALF_LIFE = 1 << 16  # counts are halved when their sum passes this, so the model follows the region


def _constriction():
    try:
        import constriction
    except ImportError:
        raise InvalidInput("the 'ans' byte stage needs the constriction package: pip install 'gradcodec[entropy]'") from None
    return constriction


def chunk_bounds(n: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of the chunks the n symbols are coded in; the model changes between chunks."""
    start, length = 0, FIRST_CHUNK
    while start < n:
        stop = min(n, start + length)
        yield start, stop
        start, length = stop, min(2 * length, MAX_CHUNK)


def to_symbols(region: np.ndarray, width: int) -> np.ndarray:
    """The w-bit symbols of a uint8 array, lowest bits of each byte first (int32, as constriction wants)."""
    if width == 8:
        return region.astype(np.int32)
    shifts = np.arange(0, 8, width, dtype=np.uint8)
    return ((region[:, None] >> shifts) & ((1 << width) - 1)).astype(np.int32).reshape(-1)


def from_symbols(symbols: np.ndarray, width: int) -> np.ndarray:
    """Inverse of to_symbols."""
    if width == 8:
        return symbols.astype(np.uint8)
    shifts = np.arange(0, 8, width, dtype=np.int32)
    return (symbols.reshape(-1, 8 // width) << shifts).sum(axis=1).astype(np.uint8)


def estimated_bits(byte_counts: np.ndarray, width: int) -> float:
    """Size estimate of the adaptive w-bit model from the byte histogram alone (no second pass)."""
    values = np.arange(256)
    k = 1 << width
    counts = np.zeros(k)
    for shift in range(0, 8, width):
        counts += np.bincount((values >> shift) & (k - 1), weights=byte_counts, minlength=k)
    n = counts.sum()
    seen = counts[counts > 0]
    return float(-(seen * np.log2(seen / n)).sum() + (k - 1) / 2 * math.log2(max(n, 2)))


def updated_counts(counts: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """The model after a chunk: each symbol seen adds UNIT to its count (the prior is 1, i.e. 1/UNIT of a
    symbol), and all counts are halved, rounding up, when their sum passes HALF_LIFE symbols, so the model
    follows a region whose statistics change (codes, then scales). Integers, so both ends agree exactly."""
    counts = counts + UNIT * np.bincount(chunk, minlength=len(counts))
    return (counts + 1) >> 1 if counts.sum() > UNIT * HALF_LIFE else counts


def adaptive_counts(symbols: np.ndarray, model: int, bounds: list[tuple[int, int]]) -> Iterator[np.ndarray]:
    """The counts each chunk is coded with (flat for the UNIFORM model)."""
    counts = np.ones(1 << (model or 8), dtype=np.int64)
    for start, stop in bounds:
        yield counts
        if model:
            counts = updated_counts(counts, symbols[start:stop])


def context_slices(size: int, sections: Sequence[tuple[int, int, int, int]] | None) -> list[list[slice]]:
    """The region's bytes grouped into contexts, each a list of slices, in order of first appearance.

    Without `sections` the whole region is one context. With them, each (offset, nbytes, itemsize,
    slot) section contributes byte lane j (j < itemsize) of its elements to context (slot, itemsize, j):
    codes, scales and index bits get models of their own, and the exponent byte of an fp32 scale is
    not mixed with its noisy mantissa bytes. Bytes outside every section (alignment padding) are zero
    and are not coded.
    """
    if sections is None:
        return [[slice(0, size)]] if size else []
    groups: dict[tuple[int, int, int], list[slice]] = {}
    for offset, nbytes, itemsize, slot in sections:
        if not (0 <= offset and offset + nbytes <= size and itemsize > 0 and nbytes % itemsize == 0):
            raise CorruptPayload(f"ans: section at {offset} of {nbytes} bytes does not fit a {size}-byte region")
        for lane in range(itemsize if nbytes else 0):
            groups.setdefault((slot, itemsize, lane), []).append(slice(offset + lane, offset + nbytes, itemsize))
    return list(groups.values())


def _count(slices: list[slice]) -> int:
    return sum(len(range(s.start, s.stop, s.step or 1)) for s in slices)


@register("ans")
class Ans:
    """Lossless entropy coding of the payload: adaptive order-0 models over 8/4/2-bit symbols, ANS coder.

    Needs `pip install 'gradcodec[entropy]'` (the constriction package). Nothing about the model is a
    parameter: each context's symbol width is chosen per payload and recorded in the stream.
    `sections` (offset, nbytes, itemsize, slot within its tensor), when the wire passes them to both
    ends, give each kind of section its own model (see context_slices).
    """

    kind = "bytes"
    lossless = True

    def wire_params(self) -> dict:
        return {}

    def compress(self, buffers: Sequence[bytes | memoryview], total: int,
                 sections: Sequence[tuple[int, int, int, int]] | None = None) -> list[bytes]:
        """The ANS stream of the concatenated `buffers` (`total` bytes), as pieces to be concatenated."""
        region = np.frombuffer(b"".join(buffers), dtype=np.uint8) if total else np.zeros(0, np.uint8)
        contexts = context_slices(total, sections)
        streams, models = [], []
        for slices in contexts:
            data = np.concatenate([region[s] for s in slices])
            byte_counts = np.bincount(data, minlength=256).astype(np.float64)
            costs = {UNIFORM: 8.0 * len(data)} | {w: estimated_bits(byte_counts, w) for w in WIDTHS}
            model = min(costs, key=costs.get)
            streams.append(to_symbols(data, model or 8))
            models.append(model)
        words = self._encode(streams, models)
        head = bytes([CODED]) + len(contexts).to_bytes(2, "little") + bytes(models)
        if len(head) + 4 * len(words) >= 1 + total:
            return [bytes([STORED]), region.tobytes()]
        return [head, words.astype("<u4").tobytes()]

    def _encode(self, streams: list[np.ndarray], models: list[int]) -> np.ndarray:
        cs = _constriction()
        coder = cs.stream.stack.AnsCoder()
        # ANS is a stack: push the contexts, and the chunks within each, last to first, so that the
        # decoder pops them first to last, each chunk with the model the chunks before it left.
        for symbols, model in zip(reversed(streams), reversed(models)):
            bounds = list(chunk_bounds(len(symbols)))
            tables = list(adaptive_counts(symbols, model, bounds))
            for (start, stop), counts in zip(reversed(bounds), reversed(tables)):
                coder.encode_reverse(symbols[start:stop], cs.stream.model.Categorical(counts.astype(np.float64), perfect=False))
        return coder.get_compressed()

    def decompress(self, data: bytes | memoryview, size: int,
                   sections: Sequence[tuple[int, int, int, int]] | None = None) -> bytes:
        """Decode an ANS stream that must expand to exactly `size` bytes; CorruptPayload otherwise."""
        data = memoryview(data).cast("B")
        if len(data) == 0:
            raise CorruptPayload("ans payload is empty: it lacks its format byte")
        if data[0] == STORED:
            if len(data) - 1 != size:
                raise CorruptPayload(f"ans payload stores {len(data) - 1} bytes, the header declares {size}")
            return bytes(data[1:])
        if data[0] != CODED:
            raise CorruptPayload(f"ans payload has format byte {data[0]}; known: {STORED} (stored), {CODED} (coded)")
        contexts = context_slices(size, sections)
        if len(data) < 3 or int.from_bytes(data[1:3], "little") != len(contexts):
            raise CorruptPayload(f"ans payload was coded with other section contexts than the {len(contexts)} this region has")
        models = list(data[3 : 3 + len(contexts)])
        if len(models) != len(contexts) or any(m not in (UNIFORM, *WIDTHS) for m in models):
            raise CorruptPayload(f"ans payload names unknown symbol models {models}")
        words = data[3 + len(contexts) :]
        if len(words) % 4:
            raise CorruptPayload(f"ans payload holds {len(words)} bytes of coder words, not a multiple of 4")
        return self._decode(np.frombuffer(words, dtype="<u4").astype(np.uint32), contexts, models, size)

    def _decode(self, words: np.ndarray, contexts: list[list[slice]], models: list[int], size: int) -> bytes:
        cs = _constriction()
        out = np.zeros(size, dtype=np.uint8)
        try:
            coder = cs.stream.stack.AnsCoder(words)
            for slices, model in zip(contexts, models):
                width = model or 8
                counts = np.ones(1 << width, dtype=np.int64)
                pieces = []
                for start, stop in chunk_bounds(_count(slices) * (8 // width)):
                    chunk = coder.decode(cs.stream.model.Categorical(counts.astype(np.float64), perfect=False), stop - start)
                    if model:
                        counts = updated_counts(counts, chunk)
                    pieces.append(from_symbols(chunk, width))
                data, pos = np.concatenate(pieces), 0
                for s in slices:
                    n = len(range(s.start, s.stop, s.step or 1))
                    out[s] = data[pos : pos + n]
                    pos += n
            ended = coder.is_empty()
        except (ValueError, RuntimeError, OverflowError) as e:
            raise CorruptPayload(f"ans payload does not decode: {e}") from None
        if not ended:
            raise CorruptPayload(f"ans payload holds more coded data than its {size} declared bytes")
        return out.tobytes()
