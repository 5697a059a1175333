"""The one dispatch point for gradcodec's kernel ops.

Every op exists as a pure-PyTorch reference (kernels/reference.py: the spec and the CPU path) and,
for the hot ones, as a Triton kernel (kernels/quant.py, kernels/pack.py, kernels/canvas.py); the
blockwise quantisers also have a CPU fast path (kernels/cpu.py: the reference's chunks on a worker
pool, bit-identical). `select_backend` decides per call from the first tensor argument: Triton for
CUDA tensors when Triton imports, otherwise the CPU path where the op has one and the reference
elsewhere. The environment variable GRADCODEC_KERNELS forces a choice:

  GRADCODEC_KERNELS=auto       (default) as above
  GRADCODEC_KERNELS=reference  always the PyTorch reference (no worker pool)
  GRADCODEC_KERNELS=triton     always Triton, also for CPU tensors (with TRITON_INTERPRET=1: how the
                               test suite checks the kernels on machines without a GPU); raises
                               if Triton cannot be imported

Callers never choose an implementation themselves; they call the functions exported here.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

from . import cpu, reference

# op name -> module (under gradcodec.kernels) that holds its Triton implementation
TRITON_MODULES = {
    "quantize_blockwise": "quant",
    "dequantize_blockwise": "quant",
    "quantize_blockwise_feedback": "quant",
    "pack_bits": "pack",
    "unpack_bits": "pack",
    "sign_quantize": "pack",
    "sign_dequantize": "pack",
    "canvas_pack": "canvas",
    "canvas_unpack": "canvas",
    "canvas_feedback": "canvas",
    "block_encode": "canvas",
    "block_decode": "canvas",
}
CPU_OPS = ("quantize_blockwise", "dequantize_blockwise", "quantize_blockwise_feedback")  # in kernels/cpu.py
BACKENDS = ("auto", "reference", "triton")


class KernelBackendError(RuntimeError):
    """GRADCODEC_KERNELS names a backend that is unknown or cannot be loaded here."""


def requested_backend() -> str:
    choice = os.environ.get("GRADCODEC_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise KernelBackendError(f"GRADCODEC_KERNELS={choice!r}; expected one of {', '.join(BACKENDS)}")
    return choice


@functools.cache
def _triton_module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(t: torch.Tensor) -> str:
    """'triton', 'cpu' or 'reference': the implementation an op called on tensor `t` runs ('cpu': kernels/cpu.py
    for the ops it has, the reference for the others)."""
    choice = requested_backend()
    if choice == "triton":
        if not _triton_available():
            raise KernelBackendError("GRADCODEC_KERNELS=triton but triton cannot be imported; pip install triton")
        return "triton"
    if choice == "auto" and t.is_cuda and _triton_available():
        return "triton"
    return "cpu" if choice == "auto" and not t.is_cuda else "reference"


def _dispatched(name: str):
    ref = getattr(reference, name)

    @functools.wraps(ref)
    def op(t: torch.Tensor, *args, **kwargs):
        backend = select_backend(t)
        if backend == "triton":
            return getattr(_triton_module(TRITON_MODULES[name]), name)(t, *args, **kwargs)
        if backend == "cpu" and name in CPU_OPS:
            return getattr(cpu, name)(t, *args, **kwargs)
        return ref(t, *args, **kwargs)

    return op


quantize_blockwise = _dispatched("quantize_blockwise")
dequantize_blockwise = _dispatched("dequantize_blockwise")
quantize_blockwise_feedback = _dispatched("quantize_blockwise_feedback")
pack_bits = _dispatched("pack_bits")
unpack_bits = _dispatched("unpack_bits")
sign_quantize = _dispatched("sign_quantize")
sign_dequantize = _dispatched("sign_dequantize")
# the learned codec's LoRA canvas ops (kernels/canvas.py); they dispatch on the layout table's device
canvas_pack = _dispatched("canvas_pack")
canvas_unpack = _dispatched("canvas_unpack")
canvas_feedback = _dispatched("canvas_feedback")
block_encode = _dispatched("block_encode")
block_decode = _dispatched("block_decode")

QMAX = reference.QMAX
WIDTHS = reference.WIDTHS
code_count = reference.code_count
uniform_hash = reference.uniform_hash
packed_bits_size = reference.packed_bits_size
