"""Measure one codec on one workload: size, distortion, and encode/decode speed.

Speeds are reported as GB/s of *input* (the uncompressed update), and next to the speed of a plain
copy (`clone`, which reads and writes the input once) measured in the same run on the same device,
so figures from noisy or different machines can be compared as fractions of the copy bandwidth.
"""
from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .. import api, metrics
from ..codec import Tensors


@dataclass
class Timing:
    """Seconds per repeat; median and relative spread ((max - min) / median)."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        return (max(self.seconds) - min(self.seconds)) / self.median if self.median else 0.0


@dataclass
class Row:
    codec: str  # the canonical spec, as the payload records it
    spec: str  # the spec as requested; it tells apart settings that only change encoding (stochastic=true)
    workload: str
    elements: int
    payload_bytes: int
    ratio: float
    bits_per_element: float
    rel_l2: float
    cosine: float
    snr_db: float
    max_abs: float
    encode: Timing
    decode: Timing
    input_bytes: int
    copy: Timing
    encode_peak_bytes: int | None = None  # extra memory at the peak of one encode, payload included
    peer: str | None = None  # for a peer's row (gradcodec.bench.peers): its library, version and call

    def gbps(self, t: Timing) -> float:
        return self.input_bytes / t.median / 1e9

    def copy_fraction(self, t: Timing) -> float:
        return self.copy.median / t.median

    def as_json(self) -> dict:
        d = asdict(self)
        for key in ("encode", "decode", "copy"):
            t = getattr(self, key)
            d[key] = {"seconds": t.seconds, "median_s": t.median, "spread": t.spread}
            if key != "copy":
                d[key]["gbps"] = self.gbps(t)
                d[key]["fraction_of_copy"] = self.copy_fraction(t)
        d["copy"]["gbps"] = self.input_bytes / self.copy.median / 1e9
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(x: Tensors) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    return next(iter(x.values())).device if x else torch.device("cpu")


def time_call(fn, repeats: int, device: torch.device, warmup: int = 1) -> tuple[Timing, object]:
    """Run fn warmup + repeats times; return the timing of the repeats and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    _sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return Timing(seconds), out


def copy_timing(x: Tensors, repeats: int) -> Timing:
    """Time of one clone of the input (read + write of every byte): the bandwidth yardstick."""
    device = _device_of(x)
    if isinstance(x, torch.Tensor):
        return time_call(lambda: x.clone(), repeats, device)[0]
    return time_call(lambda: {k: v.clone() for k, v in x.items()}, repeats, device)[0]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak memory fn allocates beyond what was in use when it started (None where not measurable).

    CUDA: the caching allocator's peak. CPU (Linux): the resident-set high-water mark, reset through
    /proc/self/clear_refs after returning freed heap memory to the OS, so reused pages do not hide
    allocations.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS")
        fn()
        return (_rss_kib("VmHWM") - base) * 1024
    except OSError:
        return None


def _measure(spec: str, canonical: str, encode, decode, size, fresh_encode, x: Tensors, workload: str,
             repeats: int, copy: Timing, peer: str | None = None) -> Row:
    """Time encode and decode, then measure size, distortion and encode memory, as one Row."""
    device = _device_of(x)
    enc, payload = time_call(encode, repeats, device)
    dec, x_hat = time_call(lambda: decode(payload), repeats, device)
    d = metrics.distortion(x, x_hat)
    n, nbytes, payload_bytes = metrics.numel(x), metrics.nbytes(x), size(payload)
    del x_hat
    peak = peak_extra_bytes(fresh_encode, device)
    return Row(
        codec=canonical,
        spec=spec,
        workload=workload,
        elements=n,
        payload_bytes=payload_bytes,
        ratio=nbytes / payload_bytes,
        bits_per_element=8 * payload_bytes / n,
        rel_l2=d["rel_l2"],
        cosine=d["cosine"],
        snr_db=d["snr_db"],
        max_abs=d["max_abs"],
        encode=enc,
        decode=dec,
        input_bytes=nbytes,
        copy=copy,
        encode_peak_bytes=peak,
        peer=peer,
    )


def bench_codec(spec: str, x: Tensors, workload: str, repeats: int, copy: Timing, seed: int = 0) -> Row:
    """Encode and decode `x` with a fresh codec `spec`; measure size, distortion, speed."""
    device = _device_of(x)
    codec = api.get_codec(spec, seed=seed)
    return _measure(spec, codec.spec, lambda: codec.encode(x), lambda blob: codec.decode(blob, device=device), len,
                    lambda: api.get_codec(spec, seed=seed).encode(x), x, workload, repeats, copy)


def bench_peer(peer, x: Tensors, workload: str, repeats: int, copy: Timing) -> Row:
    """The same measurements for a peer method (gradcodec.bench.peers.Peer)."""
    def encode():
        return peer.encode_all(x)

    return _measure(peer.name, peer.description, encode, lambda p: peer.decode_all(p, x), peer.size_all, encode,
                    x, workload, repeats, copy, peer=peer.description)


# Named codec lists for --codecs. "default" is one representative setting per family; "sweep"
# walks each family across rates for rate-distortion curves.
CODEC_SETS = {
    "default": [
        "raw",
        "fp16",
        "bf16",
        "int8",
        "int4",
        "int4:stochastic=true",
        "qsgd",
        "sign",
        "topk:ratio=0.01|fp16",
        "randk:ratio=0.01|fp16",
        "powersgd:rank=4|fp16",
        "int8|zstd",
    ],
    "sweep": [
        "bf16",
        "int8",
        "int4",
        "qsgd:levels=4",
        "qsgd:levels=1",
        "sign",
        "sign:block=1024",
        "topk:ratio=0.1|fp16",
        "topk:ratio=0.01|fp16",
        "topk:ratio=0.001|fp16",
        "topk:ratio=0.1|int8",
        "topk:ratio=0.01|int8",
        "randk:ratio=0.1|fp16",
        "randk:ratio=0.01|fp16",
        "powersgd:rank=16|fp16",
        "powersgd:rank=4|fp16",
        "powersgd:rank=1|fp16",
    ],
    # blockwise absmax at every width, both roundings, beside sign: the rate-distortion curve from 1 to 8 bits
    "widths": ["sign"] + [f"int{b}{s}" for b in range(1, 9) for s in ("", ":stochastic=true")],
}


def expand_codecs(text: str) -> list[str]:
    """Comma-free list syntax: names of codec sets and specs separated by ';' or ','.

    Specs contain commas inside their parameters ("topk:ratio=0.1,k=0"), so a ',' only separates
    specs where the next item starts a new stage name rather than a key=value.
    """
    items: list[str] = []
    for part in text.replace(";", "\n").splitlines():
        for piece in part.split(","):
            piece = piece.strip()
            if not piece:
                continue
            if items and "=" in piece.split("|")[0] and ":" not in piece.split("|")[0]:
                items[-1] += "," + piece  # a parameter continuing the previous spec
            else:
                items.append(piece)
    out: list[str] = []
    for item in items:
        out += CODEC_SETS.get(item, [item])
    return out
