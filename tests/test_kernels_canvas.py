"""The LoRA canvas kernels (kernels/canvas.py) against the reference (kernels/reference.py).

As tests/test_kernels.py: every op is called through gradcodec.kernels with GRADCODEC_KERNELS=triton, on
CPU tensors in Triton's interpreter or on CUDA tensors where Triton compiles for a GPU; the reference
runs on CPU copies. Agreement:
  * canvas_pack given scales, canvas_unpack and canvas_feedback: bit for bit (fp32 as bit patterns);
  * computed scales (a sum of squares in another order): SCALE_RTOL; the canvas is then bit-exact
    against the reference run with the kernel's scales;
  * block_encode codes: equal except at most CODE_MISMATCH of them by one (a dot product and tanh in
    another order land on the other side of a rounding boundary); block_decode: DECODE_RTOL.
test_cuda_codegen_is_exact compiles the canvas kernels for sm_90 and checks their PTX as test_kernels does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gradcodec import kernels
from gradcodec.kernels import reference
from gradcodec.learned.canvas import CanvasLayout

from .test_kernels import DEVICE, assert_bits_equal, gradient_like, ieee_events_ok, needs_cuda, needs_kernel_device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALE_RTOL = 1e-6
CODE_MISMATCH = 0.01
DECODE_RTOL = 1e-5

# (name, shapes, height): GQA padding, folding, non-power-of-two and mixed ranks, a lone factor
LAYOUTS = {
    "gqa": ({"q.lora_A": (4, 32), "q.lora_B": (32, 4), "k.lora_A": (4, 32), "k.lora_B": (16, 4)}, None),
    "fold": ({"up.lora_A": (8, 24), "up.lora_B": (70, 8), "down.lora_A": (8, 70), "down.lora_B": (24, 8)}, 24),
    "ranks": ({"a": (3, 40), "b": (40, 3), "c": (1, 40), "d": (40, 16), "e": (5, 17)}, None),
    "one": ({"w": (33, 2)}, None),
}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("GRADCODEC_KERNELS", "triton")


def layout_and_tensors(name: str, dtype=torch.float32, seed=0):
    shapes, height = LAYOUTS[name]
    layout = CanvasLayout.for_shapes(shapes, height)
    xs = [gradient_like(int(torch.tensor(s).prod()), dtype, seed=seed + i).view(s) for i, s in enumerate(shapes.values())]
    return layout, xs


def residuals_for(xs, seed=99):
    return [gradient_like(x.numel(), torch.float32, seed=seed + i).view(x.shape) * 0.1 for i, x in enumerate(xs)]


def to_device(ts):
    return [t.to(DEVICE) for t in ts] if ts is not None else None


def check_pack(layout: CanvasLayout, xs, residuals=None, out_shape=None):
    out_shape = out_shape or (layout.height + 3, layout.width + 5)  # a canvas larger than the layout, as the AE pads it
    table = layout.table(DEVICE)
    assert kernels.select_backend(table) == "triton"
    canvas, scales = kernels.canvas_pack(table, to_device(xs), layout.height, out_shape, residuals=to_device(residuals))
    _, ref_scales = reference.canvas_pack(layout.table(), xs, layout.height, out_shape, residuals=residuals)
    torch.testing.assert_close(scales.cpu(), ref_scales, rtol=SCALE_RTOL, atol=0)
    ref_canvas, _ = reference.canvas_pack(layout.table(), xs, layout.height, out_shape, residuals=residuals,
                                          scales=scales.cpu())
    assert_bits_equal(canvas.view(-1), ref_canvas.view(-1), "canvas with the kernel's scales")
    given, _ = kernels.canvas_pack(table, to_device(xs), layout.height, out_shape, residuals=to_device(residuals),
                                   scales=ref_scales.to(DEVICE))
    expected, _ = reference.canvas_pack(layout.table(), xs, layout.height, out_shape, residuals=residuals, scales=ref_scales)
    assert_bits_equal(given.view(-1), expected.view(-1), "canvas with given scales")
    return canvas.cpu(), scales.cpu()


# ---- pack / unpack / feedback -------------------------------------------------------------------

@needs_kernel_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_canvas_pack_matches_reference(name, dtype):
    layout, xs = layout_and_tensors(name, dtype)
    check_pack(layout, xs)
    check_pack(layout, xs, residuals_for(xs))


@needs_kernel_device
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_canvas_unpack_and_feedback_match_reference_bit_for_bit(name):
    layout, xs = layout_and_tensors(name)
    canvas, scales = check_pack(layout, xs, out_shape=layout.shape)
    canvas = canvas * 1.01 + 0.001  # as if an AE had reconstructed it, padding included
    outs = [torch.empty(f.shape, device=DEVICE) for f in layout.factors]
    kernels.canvas_unpack(layout.table(DEVICE), canvas.to(DEVICE), scales.to(DEVICE), layout.height, outs)
    ref = reference.canvas_unpack(layout.table(), canvas, scales, layout.height, [torch.empty(f.shape) for f in layout.factors])
    for o, r in zip(outs, ref):
        assert_bits_equal(o.reshape(-1), r.reshape(-1), "unpack")
    res = residuals_for(xs)
    res_dev = to_device([r.clone() for r in res])
    kernels.canvas_feedback(layout.table(DEVICE), canvas.to(DEVICE), scales.to(DEVICE), layout.height, to_device(xs), res_dev)
    reference.canvas_feedback(layout.table(), canvas, scales, layout.height, xs, res)
    for o, r in zip(res_dev, res):
        assert_bits_equal(o.reshape(-1), r.reshape(-1), "feedback residual")


@needs_kernel_device
@ieee_events_ok
def test_canvas_pack_edge_values():
    """An all-zero factor (scale 0, values passed through), huge and tiny magnitudes, NaN (its scale is NaN)."""
    layout, xs = layout_and_tensors("gqa")
    xs[0].zero_()
    xs[1][0, 0] = 3e18
    xs[2].mul_(1e-30)
    canvas, scales = check_pack(layout, xs)
    assert scales[0] == 0 and not canvas[:, :4].any()
    xs[3][2, 1] = float("nan")
    scales = kernels.canvas_pack(layout.table(DEVICE), to_device(xs), layout.height, layout.shape)[1]
    assert scales[3].isnan() and scales[:3].isfinite().all()


@needs_kernel_device
def test_canvas_ops_refuse_mismatched_inputs():
    layout, xs = layout_and_tensors("gqa")
    table = layout.table(DEVICE)
    with pytest.raises(ValueError, match="must all be float32"):
        kernels.canvas_pack(table, to_device([xs[0].half()] + xs[1:]), layout.height, layout.shape)
    with pytest.raises(ValueError, match="factors"):
        kernels.canvas_pack(table, to_device(xs[:2]), layout.height, layout.shape)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.canvas_pack(table, to_device([xs[0].t().contiguous().t()] + xs[1:]), layout.height, layout.shape)


# ---- the light AE --------------------------------------------------------------------------------

def block_weights(layout: CanvasLayout, out_shape, block_rows, block_cols, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    bands, groups, tile = out_shape[0] // block_rows, out_shape[1] // block_cols, block_rows * block_cols
    return (torch.randn(bands, groups, tile, k, generator=g) * (2 / tile**0.5), torch.randn(bands, groups, k, generator=g) * 0.1,
            torch.randn(bands, groups, k, tile, generator=g), torch.randn(bands, groups, tile, generator=g) * 0.1)


@needs_kernel_device
@pytest.mark.parametrize("qmax", [127, 7])
@pytest.mark.parametrize("name,block_rows,block_cols,k", [("gqa", 32, 4, 3), ("gqa", 8, 1, 2), ("fold", 24, 8, 5),
                                                           ("fold", 16, 2, 1), ("one", 33, 2, 4)])
def test_block_encode_and_decode_match_reference(name, block_rows, block_cols, k, qmax):
    layout, xs = layout_and_tensors(name)
    out_shape = (-(-layout.height // block_rows) * block_rows, layout.width)
    w_enc, b_enc, w_dec, b_dec = block_weights(layout, out_shape, block_rows, block_cols, k)
    for res in (None, residuals_for(xs)):
        codes, scales = kernels.block_encode(layout.table(DEVICE), to_device(xs), layout.height, out_shape, w_enc.to(DEVICE),
                                             b_enc.to(DEVICE), block_rows, block_cols, to_device(res), qmax)
        ref_codes, ref_scales = reference.block_encode(layout.table(), xs, layout.height, out_shape, w_enc, b_enc,
                                                       block_rows, block_cols, res, qmax)
        torch.testing.assert_close(scales.cpu(), ref_scales, rtol=SCALE_RTOL, atol=0)
        diff = (codes.cpu().int() - ref_codes.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= CODE_MISMATCH, f"{int((diff > 0).sum())} codes differ"
        assert codes.abs().max() <= qmax
    outs = [torch.empty(f.shape, device=DEVICE) for f in layout.factors]
    kernels.block_decode(layout.table(DEVICE), ref_codes.to(DEVICE), ref_scales.to(DEVICE), layout.height,
                         w_dec.to(DEVICE), b_dec.to(DEVICE), block_rows, block_cols, outs, qmax)
    ref = reference.block_decode(layout.table(), ref_codes, ref_scales, layout.height, w_dec, b_dec, block_rows,
                                 block_cols, [torch.empty(f.shape) for f in layout.factors], qmax)
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o.cpu(), r, rtol=DECODE_RTOL, atol=DECODE_RTOL * float(r.abs().max()))


# ---- CUDA code generation (no GPU needed) --------------------------------------------------------

_CODEGEN_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gradcodec.kernels import canvas, pack

def opcodes(fn, sig, consts):
    src = ASTSource(fn=fn, signature=dict(sig, **{k: "constexpr" for k in consts}), constexprs=consts)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, **pack.EXACT_FP)).asm["ptx"]
    return sorted(set(re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z][a-z0-9_.]*)[\s;]", ptx, re.M)))

out = {}
common = {"info_ptr": "*i64", "src_table": "*i64", "res_table": "*i64"}
for dtype in ("*fp32", "*bf16"):
    for has_res in (False, True):
        for has_scales in (False, True):
            sig = dict(common, sample=dtype, canvas_ptr="*fp32", scales_ptr="*fp32", height="i64", width="i64")
            consts = dict(HAS_RES=has_res, HAS_SCALES=has_scales, TILE_ROWS=256, RANK_PAD=8)
            out[f"pack {dtype} res={has_res} scales={has_scales}"] = opcodes(canvas._canvas_pack_kernel, sig, consts)
for feedback in (False, True):
    sig = {"info_ptr": "*i64", "canvas_ptr": "*fp32", "scales_ptr": "*fp32", "out_table": "*i64", "src_table": "*i64",
           "res_table": "*i64", "sample": "*fp16", "height": "i64", "width": "i64"}
    out[f"unpack feedback={feedback}"] = opcodes(canvas._canvas_unpack_kernel, sig, dict(FEEDBACK=feedback, TILE_ROWS=256, RANK_PAD=8))
geometry = dict(QMAX=127, K=16, K_PAD=16, BLOCK_ROWS=128, BLOCK_COLS=8, CHUNK_ROWS=128)
sig = dict(common, sample="*fp32", weight_ptr="*fp32", bias_ptr="*fp32", codes_ptr="*i8", scales_ptr="*fp32",
           height="i64", groups_total="i64", bands="i64")
out["block_encode"] = opcodes(canvas._block_encode_kernel, sig, dict(geometry, HAS_RES=True, TILE_ROWS=256, RANK_PAD=8))
sig = {"info_ptr": "*i64", "codes_ptr": "*i8", "scales_ptr": "*fp32", "weight_ptr": "*fp32", "bias_ptr": "*fp32",
       "out_table": "*i64", "height": "i64", "groups_total": "i64", "bands": "i64"}
out["block_decode"] = opcodes(canvas._block_decode_kernel, sig, geometry)
json.dump(out, sys.stdout)
"""


def test_cuda_codegen_is_exact(tmp_path):
    """The canvas kernels compile for sm_90 and their PTX keeps IEEE semantics: div.rn / sqrt.rn, no
    FMA contraction, no flush-to-zero. (The light AE's exp is libdevice's; it is within DECODE_RTOL anyway.)"""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GRADCODEC_KERNELS")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _CODEGEN_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's CUDA toolchain (ptxas) is not installed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for variant, ops in json.loads(proc.stdout).items():
        bad = [op for op in ops if ".ftz" in op or "div.full" in op or (op.startswith(("fma.", "mad.")) and ".f" in op)
               or (op.startswith(("add.", "sub.", "mul.")) and op.split(".")[-1].startswith("f") and ".rn." not in op)]
        if not variant.startswith("block"):
            bad += [op for op in ops if "approx" in op]
        assert not bad, f"{variant}: {bad}"
        if variant.startswith("pack") and "scales=False" in variant:
            assert "div.rn.f32" in ops and "sqrt.rn.f32" in ops, f"{variant}: {ops}"


# ---- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_cuda_default_backend_matches_reference(monkeypatch):
    monkeypatch.delenv("GRADCODEC_KERNELS")
    from gradcodec.integrations.fedlora.model import lora_shapes

    layout = CanvasLayout.for_shapes(lora_shapes("tiny", 8))
    xs = [gradient_like(int(torch.tensor(f.shape).prod()), torch.bfloat16, seed=i).view(f.shape) for i, f in enumerate(layout.factors)]
    table = layout.table("cuda")
    assert kernels.select_backend(table) == "triton"
    canvas, scales = kernels.canvas_pack(table, [x.cuda() for x in xs], layout.height, layout.shape)
    ref, ref_scales = reference.canvas_pack(layout.table(), xs, layout.height, layout.shape, scales=scales.cpu())
    torch.testing.assert_close(scales.cpu(), reference.canvas_pack(layout.table(), xs, layout.height, layout.shape)[1],
                               rtol=SCALE_RTOL, atol=0)
    assert_bits_equal(canvas.view(-1), ref.view(-1), "canvas on CUDA")
