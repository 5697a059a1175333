"""`gradcodec bench --peers`: what a user would pick instead of gradcodec, measured in the same run.

Each peer is called as its own documentation shows, one tensor at a time, and its payload size is
the bytes a user would have to send: the tensors it returns plus its scalars (8 bytes each), not
counting framing or constants the library ships (bitsandbytes' 256-entry code table).

  bnb:int8        bitsandbytes quantize_blockwise (dynamic 8-bit code), blocksize 64 like gradcodec's int8
  bnb:nf4, bnb:fp4  bitsandbytes quantize_4bit, blocksize 64, fp32 absmax per block
  nvflare:adaquant  NVIDIA FLARE's AdaQuantizer (weight 0.01, bz2 when it helps); CPU-only there: on
                  CUDA it runs on a CPU copy, as FLARE's quantizer filter does
  torch:powersgd  the step powerSGD_hook performs on one matrix: P = M Q, orthogonalise P, Q = Mᵀ P,
                  both in fp32; 1-D tensors and matrices it would not compress travel uncompressed
  torch:fp16, torch:bf16  a plain cast

Libraries are imported when a peer is built: a peer whose library is absent is skipped.
"""
from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..codec import Tensors

NAMES = ("bnb:int8", "bnb:nf4", "bnb:fp4", "nvflare:adaquant", "torch:powersgd", "torch:fp16", "torch:bf16")


@dataclass
class Peer:
    """One peer method: per-tensor encode/decode and the payload's size in bytes."""

    name: str  # the row label, one of NAMES (powersgd with its rank)
    description: str  # library, version and call, for the JSON's codec field
    encode: Callable[[torch.Tensor], object]
    decode: Callable[[object], torch.Tensor]
    nbytes: Callable[[object], int]

    def encode_all(self, x: Tensors) -> dict:
        items = {"": x} if isinstance(x, torch.Tensor) else x
        return {k: (v.shape, v.dtype, self.encode(v)) for k, v in items.items()}

    def decode_all(self, payload: dict, like: Tensors) -> Tensors:
        out = {k: self.decode(p).reshape(shape).to(dtype) for k, (shape, dtype, p) in payload.items()}
        return out[""] if isinstance(like, torch.Tensor) else out

    def size_all(self, payload: dict) -> int:
        return sum(self.nbytes(p) for _, _, p in payload.values())


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _version(dist: str) -> str:
    return f"{dist} {importlib.metadata.version(dist)}"


def _bnb_int8() -> Peer:
    import bitsandbytes.functional as F

    return Peer(
        "bnb:int8", _version("bitsandbytes") + " quantize_blockwise(blocksize=64)",
        lambda x: F.quantize_blockwise(x.reshape(-1), blocksize=64),
        lambda p: F.dequantize_blockwise(p[0], quant_state=p[1]),
        lambda p: _bytes(p[0], p[1].absmax),
    )


def _bnb_4bit(kind: str) -> Peer:
    import bitsandbytes.functional as F

    return Peer(
        f"bnb:{kind}", _version("bitsandbytes") + f" quantize_4bit(blocksize=64, quant_type={kind!r})",
        # flat: bitsandbytes 0.50.2's CPU path round-trips a 2-D fp32 matrix with 2.6x the error of the
        # same values flattened (rel. L2 0.24 vs 0.09 for N(0, 1)), which would not be the method's own
        lambda x: F.quantize_4bit(x.reshape(-1), blocksize=64, quant_type=kind),
        lambda p: F.dequantize_4bit(p[0], p[1]),
        lambda p: _bytes(p[0], p[1].absmax),
    )


def _adaquant() -> Peer:
    from nvflare.app_opt.pt.quantization.ada_quant import AdaQuantizer

    def encode(x: torch.Tensor):
        q, state = AdaQuantizer().quantize(x.cpu())
        return q, state, x.device

    def size(p) -> int:
        q, state, _ = p
        arrays = [q, *(v for v in state.values() if hasattr(v, "nbytes"))]
        scalars = [v for v in state.values() if isinstance(v, (int, float))]
        return sum(int(a.nbytes) for a in arrays) + 8 * len(scalars)

    def decode(p) -> torch.Tensor:
        with warnings.catch_warnings():  # it wraps its bz2 output without a copy, which torch warns about
            warnings.simplefilter("ignore", UserWarning)
            return AdaQuantizer().dequantized(torch.as_tensor(p[0]), p[1]).to(p[2])

    return Peer("nvflare:adaquant", _version("nvflare") + " AdaQuantizer(weight=0.01, compression=True)", encode, decode, size)


def _powersgd(rank: int, seed: int) -> Peer:
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize, _should_compress

    def encode(x: torch.Tensor):
        m = x.reshape(x.shape[0], -1).float() if x.dim() > 1 else None
        if m is None or not _should_compress(*m.shape, rank, 2)[0]:  # the hook's default min_compression_rate
            return (x.clone(),)
        q = torch.randn(m.shape[1], rank, generator=torch.Generator().manual_seed(seed)).to(x.device)
        p = m @ q
        _orthogonalize(p[None])
        return p, m.t() @ p

    return Peer(
        f"torch:powersgd:rank={rank}", f"torch {torch.__version__} powerSGD_hook step (rank {rank}, fp32 factors)",
        encode,
        lambda f: f[0] if len(f) == 1 else f[0] @ f[1].t(),
        lambda f: _bytes(*f),
    )


def _cast(dtype: torch.dtype, name: str) -> Peer:
    return Peer(f"torch:{name}", f"torch {torch.__version__} .to({dtype})", lambda x: x.to(dtype), lambda y: y, _bytes)


def build(names: list[str], rank: int = 4, seed: int = 0) -> tuple[list[Peer], list[str]]:
    """The peers named (NAMES) whose library imports, and the names skipped because it does not."""
    makers = {
        "bnb:int8": _bnb_int8,
        "bnb:nf4": lambda: _bnb_4bit("nf4"),
        "bnb:fp4": lambda: _bnb_4bit("fp4"),
        "nvflare:adaquant": _adaquant,
        "torch:powersgd": lambda: _powersgd(rank, seed),
        "torch:fp16": lambda: _cast(torch.float16, "fp16"),
        "torch:bf16": lambda: _cast(torch.bfloat16, "bf16"),
    }
    peers, missing = [], []
    for name in names:
        if name not in makers:
            raise ValueError(f"unknown peer {name!r}; choose from {', '.join(NAMES)}")
        try:
            peers.append(makers[name]())
        except (ImportError, OSError, RuntimeError):  # absent, or present without its native library
            missing.append(name)
    return peers, missing


def parse(text: str) -> list[str]:
    """'all' or a comma-separated list of NAMES."""
    return list(NAMES) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]


def powersgd_rank(specs: list[str], default: int = 4) -> int:
    """The rank of the first powersgd spec among `specs` (the peer is measured at the same rank)."""
    for spec in specs:
        head = spec.split("|")[0]
        if head.startswith("powersgd"):
            for param in head.partition(":")[2].split(","):
                key, _, value = param.partition("=")
                if key.strip() == "rank":
                    return int(value)
            return default
    return default
