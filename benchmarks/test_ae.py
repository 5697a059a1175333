"""The cgfed encoder and decoder end to end (adapter tensors <-> bytes) per AE architecture, against
the PyTorch reference path and a plain copy of the same bytes.

`encode` is what a client runs (canvas pack + normalise, AE encoder, latent quantisation, wire
packing), `decode` what the server runs. The copy is torch.cat of the adapter's factors (encode) or
one buffer split back into them (decode). `reference` forces GRADCODEC_KERNELS=reference (the CPU
path); `dispatched` is the default selection (Triton kernels on CUDA). AEs have random weights (speed
does not depend on training), at 1/64: the conv AE with widths 8..64, the light (block) AE with
per-factor tiles for tiny and 64x1 tiles for LLaMA-7B (docs/codecs.md), and the shared AE (weights
shared across layers, 512-value tiles). The conv AE on a 7B canvas takes seconds per call on a CPU:
set GRADCODEC_BENCH_SLOW=1 to include it there.
"""
import os

import pytest
import torch

import gradcodec
from gradcodec.integrations.fedlora.model import lora_shapes
from gradcodec.learned.canvas import CanvasLayout
from gradcodec.learned.model import AEConfig, build_decoder, build_encoder
from gradcodec.learned.modelfile import LearnedModel

from .conftest import measure, split_into

ADAPTERS = {"tiny-r8": ("tiny", 8), "llama7b-r8": ("llama-7b", 8)}


def setup(name: str, arch: str, device: str):
    preset, rank = ADAPTERS[name]
    shapes = lora_shapes(preset, rank)
    layout = CanvasLayout.for_shapes(shapes)
    if arch == "conv":
        config = AEConfig.conv(layout, 1 / 64, width=8, max_channels=64)
    elif arch == "shared":
        config = AEConfig.shared(layout, 1 / 64)
    else:
        config = AEConfig.block(layout, 1 / 64, *((None, None) if preset == "tiny" else (64, 1)))
    torch.manual_seed(0)
    model = LearnedModel.trained(config, build_encoder(config), build_decoder(config))
    g = torch.Generator().manual_seed(0)
    update = {k: (torch.randn(s, generator=g) * 1e-3).to(device) for k, s in shapes.items()}
    return model, update, layout.numel * 4


@pytest.mark.parametrize("verb", ["encode", "decode"])
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_copy(benchmark, device, name, verb):
    _, update, nbytes = setup(name, "block", device)
    flat = torch.cat([v.view(-1) for v in update.values()])
    # decode returns new tensors, so the copy writes into new ones too (fresh pages, as decode's)
    fn = (lambda: torch.cat([v.view(-1) for v in update.values()])) if verb == "encode" else (
        lambda: split_into(flat, [torch.empty_like(v) for v in update.values()]))
    measure(benchmark, fn, op=f"cgfed {verb} {name}", label="copy", device=device, input_bytes=nbytes, rounds=3)


@pytest.mark.parametrize("backend", ["reference", "dispatched"])
@pytest.mark.parametrize("arch", ["block", "conv", "shared"])
@pytest.mark.parametrize("verb", ["encode", "decode"])
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_cgfed(benchmark, monkeypatch, device, name, verb, arch, backend):
    if backend == "dispatched" and (device == "cpu" or arch == "shared"):
        pytest.skip("on CPU the dispatched path is the reference; the shared AE is plain PyTorch on every device")
    if arch == "conv" and name.startswith("llama") and device == "cpu" and not os.environ.get("GRADCODEC_BENCH_SLOW"):
        pytest.skip("the conv AE on a 7B canvas takes seconds per call on a CPU; set GRADCODEC_BENCH_SLOW=1")
    if backend == "reference":
        monkeypatch.setenv("GRADCODEC_KERNELS", "reference")
    model, update, nbytes = setup(name, arch, device)
    codec = gradcodec.get_codec("cgfed", model=model)
    blob = codec.encode(update)
    fn = (lambda: codec.encode(update)) if verb == "encode" else (lambda: codec.decode(blob, device=device))
    measure(benchmark, fn, op=f"cgfed {verb} {name}", label=f"{arch} {backend}", device=device, input_bytes=nbytes,
            rounds=3)
