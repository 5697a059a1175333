"""The learned codec's canvas ops against their PyTorch reference and a plain copy of the same bytes:
pack + normalise (adapter tensors -> AE input canvas) and unpack (canvas -> adapter tensors), on a
tiny-preset and a LLaMA-7B-shaped rank-8 q/k/v/o adapter.

The copy moves the adapter's bytes once (torch.cat of its factors into one buffer, or one buffer split
back into them), the least any packing costs. On CPU the dispatched op is the reference itself; on
CUDA it is the Triton kernel (kernels/canvas.py), measured next to the reference on the same tensors.
"""
import pytest
import torch

from gradcodec import kernels
from gradcodec.integrations.fedlora.model import lora_shapes
from gradcodec.kernels import reference
from gradcodec.learned.canvas import CanvasLayout

from .conftest import measure, split_into

ADAPTERS = {"tiny-r8": ("tiny", 8), "llama7b-r8": ("llama-7b", 8)}
LABELS = ["copy", "reference", "dispatched"]


def adapter(name: str, device: str):
    preset, rank = ADAPTERS[name]
    shapes = lora_shapes(preset, rank)
    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(s, generator=g) * 1e-3).to(device) for s in shapes.values()]
    return CanvasLayout.for_shapes(shapes), xs


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_canvas_pack(benchmark, device, name, label):
    if label == "dispatched" and device == "cpu":
        pytest.skip("on CPU the dispatched op is the reference")
    layout, xs = adapter(name, device)
    table = layout.table(device)
    op = {"reference": reference.canvas_pack, "dispatched": kernels.canvas_pack}.get(label)
    fn = (lambda: torch.cat([x.view(-1) for x in xs])) if label == "copy" else (
        lambda: op(table, xs, layout.height, layout.shape))
    measure(benchmark, fn, op=f"canvas pack {name}", label=label, device=device, input_bytes=layout.numel * 4)


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_canvas_unpack(benchmark, device, name, label):
    if label == "dispatched" and device == "cpu":
        pytest.skip("on CPU the dispatched op is the reference")
    layout, xs = adapter(name, device)
    table = layout.table(device)
    canvas, scales = reference.canvas_pack(table, xs, layout.height, layout.shape)
    outs = [torch.empty_like(x) for x in xs]
    flat = torch.cat([x.view(-1) for x in xs])
    op = {"reference": reference.canvas_unpack, "dispatched": kernels.canvas_unpack}.get(label)
    fn = (lambda: split_into(flat, outs)) if label == "copy" else (
        lambda: op(table, canvas, scales, layout.height, outs))
    measure(benchmark, fn, op=f"canvas unpack {name}", label=label, device=device, input_bytes=layout.numel * 4)
