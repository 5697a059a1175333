"""Kernel ops against their PyTorch reference and a plain copy: quantise, dequantise, fused
error-feedback quantise, bit packing, sign, top-k selection (the codec's and plain torch.topk).

On CPU the dispatched op is the reference itself; on CUDA the dispatched op is the Triton kernel,
measured next to the reference running on the same GPU tensors.
"""
import pytest
import torch

from gradcodec import kernels
from gradcodec.codecs.sparse import topk_indices
from gradcodec.kernels import reference

from .conftest import N, measure

BLOCK = 64


def _input(device: str) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("label", ["copy", "reference", "dispatched"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize(benchmark, device, bits, label):
    x = _input(device)
    fn = {"copy": x.clone, "reference": lambda: reference.quantize_blockwise(x, bits, BLOCK),
          "dispatched": lambda: kernels.quantize_blockwise(x, bits, BLOCK)}[label]
    if label == "dispatched" and device == "cpu":
        pytest.skip("on CPU the dispatched op is the reference")
    measure(benchmark, fn, op=f"quantize int{bits}", label=label, device=device, input_bytes=x.numel() * 4)


@pytest.mark.parametrize("label", ["copy", "reference", "dispatched"])
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize(benchmark, device, bits, label):
    x = _input(device)
    codes, scales = reference.quantize_blockwise(x, bits, BLOCK)
    # the copy of x moves the output's bytes; a never-written tensor would be read from the zero page
    fn = {"copy": x.clone, "reference": lambda: reference.dequantize_blockwise(codes, scales, bits, BLOCK, N),
          "dispatched": lambda: kernels.dequantize_blockwise(codes, scales, bits, BLOCK, N)}[label]
    if label == "dispatched" and device == "cpu":
        pytest.skip("on CPU the dispatched op is the reference")
    measure(benchmark, fn, op=f"dequantize int{bits}", label=label, device=device, input_bytes=N * 4)


@pytest.mark.parametrize("label", ["copy", "reference", "dispatched"])
def test_feedback_quantize(benchmark, device, label):
    x = _input(device)
    residual = torch.zeros_like(x)
    fn = {"copy": x.clone, "reference": lambda: reference.quantize_blockwise_feedback(x, residual, 8, BLOCK),
          "dispatched": lambda: kernels.quantize_blockwise_feedback(x, residual, 8, BLOCK)}[label]
    if label == "dispatched" and device == "cpu":
        pytest.skip("on CPU the dispatched op is the reference")
    measure(benchmark, fn, op="feedback quantize int8", label=label, device=device, input_bytes=N * 4)


@pytest.mark.parametrize("label", ["copy", "reference", "dispatched"])
def test_sign(benchmark, device, label):
    x = _input(device)
    fn = {"copy": x.clone, "reference": lambda: reference.sign_quantize(x, 256),
          "dispatched": lambda: kernels.sign_quantize(x, 256)}[label]
    if label == "dispatched" and device == "cpu":
        pytest.skip("on CPU the dispatched op is the reference")
    measure(benchmark, fn, op="sign quantize", label=label, device=device, input_bytes=N * 4)


@pytest.mark.parametrize("label", ["copy", "reference", "dispatched"])
@pytest.mark.parametrize("width", [1, 4])
def test_pack_bits(benchmark, device, width, label):
    n = N // 4
    values = torch.randint(0, 1 << width, (n,), dtype=torch.uint8).to(device)
    fn = {"copy": values.clone, "reference": lambda: reference.pack_bits(values, width),
          "dispatched": lambda: kernels.pack_bits(values, width)}[label]
    if label == "dispatched" and device == "cpu":
        pytest.skip("on CPU the dispatched op is the reference")
    measure(benchmark, fn, op=f"pack_bits width {width}", label=label, device=device, input_bytes=n)


@pytest.mark.parametrize("label", ["copy", "torch.topk", "topk_indices"])
def test_topk_selection(benchmark, device, label):
    """The top-k codec's selection (sampled threshold on CPU, torch.topk on CUDA) against plain torch.topk."""
    x = _input(device)
    k = N // 100
    fn = {"copy": x.clone, "torch.topk": lambda: torch.topk(x.abs(), k, sorted=False).indices.sort().values,
          "topk_indices": lambda: topk_indices(x, k)}[label]
    measure(benchmark, fn, op="top-k 1% selection", label=label, device=device, input_bytes=N * 4)
