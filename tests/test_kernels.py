"""The Triton kernels (kernels/quant.py, kernels/pack.py) against the reference (kernels/reference.py).

Every op is called through the dispatch point gradcodec.kernels with GRADCODEC_KERNELS=triton, on
CPU tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA
device) or, where Triton compiles for a GPU, on CUDA tensors; the reference is called directly on
CPU copies of the same inputs. Results must agree
  * bit for bit for codes, absmax scales, residuals, dequantised values, packed bits and sign bits
    (fp32 compared as bit patterns, so -0.0 and inf count; a NaN matches any NaN, as NaN payloads
    and signs differ between CPUs and GPUs);
  * to SIGN_SCALE_RTOL for the sign quantiser's scales, a sum of |x| whose order the kernel cannot
    reproduce.
test_cuda_codegen_is_exact compiles the kernels for sm_90 (no GPU needed) and checks the PTX for the
properties that carry the interpreter's bit-exactness over to CUDA: IEEE division, no FMA
contraction, no flush of subnormals. The `gpu` tests run the comparisons on CUDA tensors with the
default backend selection.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from gradcodec import kernels
from gradcodec.kernels import reference
from gradcodec.kernels.quant import uniform_hash

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Where the kernels can run: the interpreter takes CPU tensors, compiled Triton needs CUDA ones.
DEVICE = "cpu" if INTERPRETED else "cuda"
needs_kernel_device = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(), reason="neither TRITON_INTERPRET=1 nor a CUDA device"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BLOCKS = [8, 64, 256, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEEDS = [None, 12345]  # None: round to nearest; an int: stochastic rounding
# Sign scales: the kernel sums |x| of a block in another order than torch; both errors are a few ulp
# (about 1e-7 relative seen). 1e-5 still catches a wrong element count in the partial last block of
# a 4096-block (4096/4095 - 1 = 2.4e-4).
SIGN_SCALE_RTOL = 1e-5


def ieee_events_ok(test):
    """The interpreter computes in numpy, which warns on the overflows and NaNs that edge cases provoke."""
    for message in ["overflow encountered", "invalid value encountered"]:
        test = pytest.mark.filterwarnings(f"ignore:{message}:RuntimeWarning")(test)
    return test


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("GRADCODEC_KERNELS", "triton")


def sizes(block: int) -> list[int]:
    return sorted({1, 7, block - 1, block, block + 1, 3 * block + 5})


def gradient_like(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal values whose magnitude changes every 16 elements over about 4 orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.exp(torch.randn(n // 16 + 1, generator=g) * 2).repeat_interleave(16)[:n]
    return (torch.randn(n, generator=g) * magnitude).to(dtype)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    actual = actual.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{what}: got {actual.dtype}{tuple(actual.shape)}, expected {expected.dtype}{tuple(expected.shape)}")
    if expected.dtype == torch.float32:
        both_nan = actual.isnan() & expected.isnan()
        diff = ((actual.view(torch.int32) != expected.view(torch.int32)) & ~both_nan).nonzero().flatten()
    else:
        diff = (actual != expected).nonzero().flatten()
    assert diff.numel() == 0, (
        f"{what}: {diff.numel()} of {expected.numel()} differ, first at {diff[0].item()}: "
        f"{actual[diff[0]].item()} != {expected[diff[0]].item()}")


def check_quantize(x: torch.Tensor, bits: int, block: int, seed, device: str = DEVICE) -> None:
    """quantize_blockwise, its feedback form and dequantize_blockwise on x (a CPU tensor) against the reference."""
    n = x.numel()
    what = f"bits={bits} block={block} n={n} {x.dtype} seed={seed}"
    xd = x.to(device)
    assert kernels.select_backend(xd) == "triton"
    codes, scales = kernels.quantize_blockwise(xd, bits, block, seed)
    ref_codes, ref_scales = reference.quantize_blockwise(x, bits, block, seed)
    assert_bits_equal(codes, ref_codes, f"codes {what}")
    assert_bits_equal(scales, ref_scales, f"scales {what}")

    residual = gradient_like(n, torch.float32, seed=n + 1) * 0.01
    res_dev = residual.to(device, copy=True)  # the reference updates `residual` in place
    codes, scales = kernels.quantize_blockwise_feedback(xd, res_dev, bits, block, seed)
    ref_codes, ref_scales = reference.quantize_blockwise_feedback(x, residual, bits, block, seed)
    assert_bits_equal(codes, ref_codes, f"feedback codes {what}")
    assert_bits_equal(scales, ref_scales, f"feedback scales {what}")
    assert_bits_equal(res_dev, residual, f"feedback residual {what}")

    out = kernels.dequantize_blockwise(ref_codes.to(device), ref_scales.to(device), bits, block, n)
    assert_bits_equal(out, reference.dequantize_blockwise(ref_codes, ref_scales, bits, block, n), f"dequantize {what}")


def check_sign(x: torch.Tensor, block: int, device: str = DEVICE) -> None:
    n = x.numel()
    what = f"block={block} n={n} {x.dtype}"
    bits, scales = kernels.sign_quantize(x.to(device), block)
    ref_bits, ref_scales = reference.sign_quantize(x, block)
    assert_bits_equal(bits, ref_bits, f"sign bits {what}")
    torch.testing.assert_close(scales.cpu(), ref_scales, rtol=SIGN_SCALE_RTOL, atol=0, equal_nan=True, msg=what)
    out = kernels.sign_dequantize(ref_bits.to(device), ref_scales.to(device), block, n)
    assert_bits_equal(out, reference.sign_dequantize(ref_bits, ref_scales, block, n), f"sign_dequantize {what}")


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Blocks of 8 (fp32 values, exactly representable in `dtype` or rounded to it) of edge cases."""
    info = torch.finfo(dtype)
    big, tiny, sub = info.max, info.tiny, info.smallest_normal * 2.0**-3
    rows = [
        [0.0] * 8,                                            # all zero: scale from TINY
        [-0.0, 0.0, -0.0, 0.0, -0.0, -0.0, 0.0, 0.0],
        [0.3] * 8,                                            # all equal
        [-5.0] * 8,
        [big, -big, big, 1.0, -1.0, 0.0, big / 3, -big / 7],  # the largest finite values
        [1e30, -1e30, 3e29, 1e-12, -1e-12, 1e-20, 2.0, -7.0] if dtype != torch.float16 else [65504.0] * 8,
        [tiny, -tiny, tiny * 3, 0.0, -tiny * 2, tiny, tiny, -tiny],
        [sub, -sub, sub * 2, sub * 5, -sub * 7, sub, 0.0, -sub],  # subnormal in `dtype`
        [1e-38, -1e-38, 1e-40, -1e-40, 1.4e-45, -1.4e-45, 0.0, 1e-39],  # fp32 tiny and subnormal
        [127.0, 0.5, 1.5, -0.5, -1.5, 2.5, -2.5, 63.5],      # exact .5 ties at scale 1
        [7.0, 0.5, -0.5, 3.5, -3.5, 6.5, -6.5, 1.0],         # the same for int4
        [1.0, 1e-6, -1e-6, 2e-7, -3e-7, 1e-8, 0.0, -1.0],
        # e * inv just below -0.5, rounded to -0.5: floor(fl(e * inv) + 0.5) = 0, while an FMA
        # (e * inv + 0.5 rounded once) gives -1; in fp32, for QMAX 127, then for QMAX 7
        [1000.0, -3.9370079040527344, 1.0, -1.0, 0.0, 2.0, -2.0, 0.5],
        [10.0, -0.7142857313156128, 1.0, -1.0, 0.0, 2.0, -2.0, 0.5],
    ]
    return torch.tensor([v for row in rows for v in row], dtype=torch.float32).to(dtype)


# ---- blockwise absmax quantisation ---------------------------------------------------------------

@needs_kernel_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_matches_reference(bits, block, dtype):
    for n in sizes(block):
        x = gradient_like(n, dtype, seed=n)
        for seed in SEEDS:
            check_quantize(x, bits, block, seed)


@needs_kernel_device
@ieee_events_ok
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [8, 64])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_special_values(bits, block, dtype):
    x = special_values(dtype)
    for seed in SEEDS:
        check_quantize(x, bits, block, seed)
        check_quantize(x[3:], bits, block, seed)  # the same values across block boundaries


@pytest.mark.parametrize("block", BLOCKS)
def test_reference_results_do_not_depend_on_the_chunk_size(monkeypatch, block):
    """The reference works chunk by chunk (whole blocks) for cache locality; the chunk size is invisible."""
    n = 5 * block + 3
    x = gradient_like(n, torch.float32)
    residual = gradient_like(n, torch.float32, seed=1) * 0.01

    def outputs():
        out = []
        for bits in [8, 4]:
            for seed in SEEDS:
                codes, scales = reference.quantize_blockwise(x, bits, block, seed)
                res = residual.clone()
                out += [codes, scales, *reference.quantize_blockwise_feedback(x, res, bits, block, seed), res]
                out.append(reference.dequantize_blockwise(codes, scales, bits, block, n))
        bits, scales = reference.sign_quantize(x, block)
        return out + [bits, scales, reference.sign_dequantize(bits, scales, block, n)]

    whole = outputs()  # n < CHUNK_ELEMENTS for every block here: one chunk
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * block)  # chunks of two blocks, the last one partial
    for i, (chunked, expected) in enumerate(zip(outputs(), whole)):
        assert_bits_equal(chunked, expected, f"output {i}")


@needs_kernel_device
@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_seeds(bits):
    block, n = 64, 1000
    x = gradient_like(n, torch.float32).to(DEVICE)
    for seed in [0, 1, 2**31 + 7, 2**32 - 1]:
        check_quantize(x.cpu(), bits, block, seed)
    codes = {seed: kernels.quantize_blockwise(x, bits, block, seed)[0].cpu() for seed in [1, 2, 2**32 - 1]}
    assert torch.equal(kernels.quantize_blockwise(x, bits, block, 1)[0].cpu(), codes[1])  # same seed, same codes
    assert not torch.equal(codes[1], codes[2])
    # The seed is taken mod 2**32, as reference.uniform_hash does.
    assert torch.equal(kernels.quantize_blockwise(x, bits, block, -1)[0].cpu(), codes[2**32 - 1])
    assert torch.equal(kernels.quantize_blockwise(x, bits, block, 2**32 + 1)[0].cpu(), codes[1])


@needs_kernel_device
@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_floors_a_negative_subnormal(bits):
    """e * inv a negative subnormal and u = 0 (element 0 of seed 0; element 770 of seed 384): floor
    gives -1. A flush-to-zero floor (Triton's default on CUDA) would give 0."""
    block = 64
    x = torch.zeros(13 * block)
    for seed, i in [(0, 0), (384, 770)]:
        assert reference.uniform_hash(seed, torch.tensor([i])).item() == 0.0
        x[i], x[i - i % block + 5] = -1e-12, 1e30  # e * inv = -1e-12 * 127 / 1e30, about -1.3e-40
        ref_codes, _ = reference.quantize_blockwise(x, bits, block, seed)
        assert (ref_codes[i].item() if bits == 8 else (ref_codes[i // 2].item() >> 4 * (i % 2) & 15) - 8) == -1
        check_quantize(x, bits, block, seed)


@triton.jit
def _hash_probe(out_ptr, base, seed, N: tl.constexpr):
    """out[i] = uniform_hash(seed, base + i) for i < N, as the quantise kernel computes it."""
    idx = tl.arange(0, N)
    tl.store(out_ptr + idx, uniform_hash(seed, base + idx.to(tl.int64)))


@needs_kernel_device
def test_uniform_hash_matches_reference_beyond_2_to_32():
    """The kernels' hash of int64 element indices, including indices past 2**31 and 2**32."""
    for base in [0, 2**31 - 8, 2**32 - 8, 3 * 2**32 + 12345, 2**62]:
        for seed in [0, 7, 2**32 - 1]:
            out = torch.empty(64, dtype=torch.float32, device=DEVICE)
            _hash_probe[(1,)](out, base, seed, N=64)
            expected = reference.uniform_hash(seed, torch.arange(base, base + 64, dtype=torch.int64))
            assert_bits_equal(out, expected, f"uniform_hash base={base} seed={seed}")


@needs_kernel_device
@ieee_events_ok
@pytest.mark.parametrize("block", [8, 64])
@pytest.mark.parametrize("bits", [8, 4])
def test_non_finite_input_gives_non_finite_scale(bits, block):
    """NaN or inf makes its block's scale non-finite; every other block is still exact.

    The codes (and the feedback residual) of a non-finite block are unspecified, in the reference
    as in the kernels, so they are not compared.
    """
    nblocks = 6
    x = gradient_like(nblocks * block, torch.float32)
    bad = {0: (0, math.nan), 1: (block - 1, math.nan), 3: (5, math.inf), 4: (2, -math.inf)}
    for b, (i, v) in bad.items():
        x[b * block + i] = v
    x[5 * block:] = math.nan
    bad_blocks = torch.tensor([b in bad or b == 5 for b in range(nblocks)])
    good_elems = (~bad_blocks).repeat_interleave(block)
    for seed in [None, 3]:
        codes, scales = kernels.quantize_blockwise(x.to(DEVICE), bits, block, seed)
        residual = torch.zeros(x.numel())
        res_dev = residual.to(DEVICE, copy=True)
        fb_codes, fb_scales = kernels.quantize_blockwise_feedback(x.to(DEVICE), res_dev, bits, block, seed)
        ref_codes, ref_scales = reference.quantize_blockwise_feedback(x, residual, bits, block, seed)
        good_codes = good_elems if bits == 8 else good_elems[::2]
        for c, s in [(codes, scales), (fb_codes, fb_scales)]:
            assert not torch.isfinite(s.cpu()[bad_blocks]).any()
            assert_bits_equal(s.cpu()[~bad_blocks], ref_scales[~bad_blocks], "finite blocks' scales")
            assert_bits_equal(c.cpu()[good_codes], ref_codes[good_codes], "finite blocks' codes")
        assert_bits_equal(res_dev.cpu()[good_elems], residual[good_elems], "finite blocks' residual")


@needs_kernel_device
def test_quantize_empty():
    x = torch.empty(0, device=DEVICE)
    for bits in [8, 4]:
        codes, scales = kernels.quantize_blockwise(x, bits, 64)
        ref_codes, ref_scales = reference.quantize_blockwise(x.cpu(), bits, 64)
        assert_bits_equal(codes, ref_codes, "codes")
        assert_bits_equal(scales, ref_scales, "scales")
        codes, scales = kernels.quantize_blockwise_feedback(x, torch.empty(0, device=DEVICE), bits, 64, seed=1)
        assert_bits_equal(codes, ref_codes, "feedback codes")
        assert_bits_equal(scales, ref_scales, "feedback scales")
        out = kernels.dequantize_blockwise(codes, scales, bits, 64, 0)
        assert_bits_equal(out, reference.dequantize_blockwise(ref_codes, ref_scales, bits, 64, 0), "dequantize")


@needs_kernel_device
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_every_code(bits, block):
    """Arbitrary codes, including ones the quantiser never writes (-128, nibble 0), and odd n."""
    g = torch.Generator().manual_seed(block + bits)
    for n in [block * 2 + 3, 3 * block]:
        nblocks = -(-n // block)
        codes = torch.randint(0, 256, (n if bits == 8 else (n + 1) // 2,), generator=g, dtype=torch.uint8)
        codes = codes.view(torch.int8) if bits == 8 else codes
        scales = gradient_like(nblocks, torch.float32, seed=n).abs()
        out = kernels.dequantize_blockwise(codes.to(DEVICE), scales.to(DEVICE), bits, block, n)
        assert_bits_equal(out, reference.dequantize_blockwise(codes, scales, bits, block, n), f"n={n}")


# ---- bit packing ---------------------------------------------------------------------------------

@needs_kernel_device
@pytest.mark.parametrize("width", [1, 2, 4, 8, 3, 5])  # 3 and 5 go to the reference
def test_pack_bits_matches_reference(width):
    g = torch.Generator().manual_seed(width)
    dtypes = [torch.uint8, torch.int32, torch.int64] + ([torch.bool] if width == 1 else [])
    for count in [0, 1, 7, 8, 9, 1000, 2048 * 8 // width + 3]:
        for dtype in dtypes:
            values = torch.randint(0, 2**width, (count,), generator=g).to(dtype)
            packed = kernels.pack_bits(values.to(DEVICE), width)
            assert_bits_equal(packed, reference.pack_bits(values, width), f"pack width={width} n={count} {dtype}")
            out = kernels.unpack_bits(packed, width, count)
            assert_bits_equal(out, reference.unpack_bits(packed.cpu(), width, count), f"unpack width={width} n={count}")
            assert torch.equal(out.cpu(), values.to(torch.int64))
        # a longer stream than the values need: the tail is ignored
        longer = torch.randint(0, 256, (reference.packed_bits_size(count, width) + 5,), generator=g, dtype=torch.uint8)
        out = kernels.unpack_bits(longer.to(DEVICE), width, count)
        assert_bits_equal(out, reference.unpack_bits(longer, width, count), f"unpack longer width={width} n={count}")


# ---- scaled sign quantisation --------------------------------------------------------------------

@needs_kernel_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS)
def test_sign_matches_reference(block, dtype):
    for n in sizes(block):
        check_sign(gradient_like(n, dtype, seed=n), block)


@needs_kernel_device
@ieee_events_ok
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [8, 64])
def test_sign_special_values(block, dtype):
    x = special_values(dtype)
    check_sign(x, block)
    check_sign(x[3:], block)
    nan = x.clone()
    nan[[2, 17]] = math.nan
    check_sign(nan, block)  # NaN scales, and NaN gets the bit 0 (NaN >= 0 is false)


@needs_kernel_device
def test_sign_empty():
    bits, scales = kernels.sign_quantize(torch.empty(0, device=DEVICE), 64)
    ref_bits, ref_scales = reference.sign_quantize(torch.empty(0), 64)
    assert_bits_equal(bits, ref_bits, "bits")
    assert_bits_equal(scales, ref_scales, "scales")
    assert_bits_equal(kernels.sign_dequantize(bits, scales, 64, 0), reference.sign_dequantize(ref_bits, ref_scales, 64, 0), "out")


# ---- CUDA code generation (no GPU needed) --------------------------------------------------------

# Compiles every kernel variant for sm_90 with the launch options the launchers use and prints the
# PTX opcodes of each. Runs in a subprocess: with TRITON_INTERPRET=1 set, @triton.jit gives
# interpreter objects that do not compile.
_CODEGEN_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gradcodec.kernels import pack, quant

def opcodes(fn, sig, consts, num_warps=4):
    signature = dict(sig, **{k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=signature, constexprs=consts)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, **pack.EXACT_FP)).asm["ptx"]
    return sorted(set(re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z][a-z0-9_.]*)[\s;]", ptx, re.M)))

out = {}
x_types = ["*fp32", "*fp16", "*bf16"]
for i, (bits, stochastic, feedback) in enumerate([(b, s, f) for b in range(1, 9) for s in (False, True) for f in (False, True)]):
    block = [8, 64, 256, 4096][i % 4]
    rows, warps = pack.block_tiling(block)
    sig = {"x_ptr": x_types[i % 3], "res_ptr": "*fp32", "codes_ptr": "*i8" if bits == 8 else "*u8",
           "scales_ptr": "*fp32", "n": "i64" if i % 2 else "i32", "ncodes": "i64" if i % 2 else "i32", "seed": "i32"}
    consts = dict(BLOCK=block, ROWS=rows, BITS=bits, QMAX=max(1, 2 ** (bits - 1) - 1),
                  OFFSET=0.5 if bits == 1 else 2.0 ** (bits - 1), STOCHASTIC=stochastic)
    if not feedback:
        consts["res_ptr"] = None
        del sig["res_ptr"]
    out[f"quantize bits={bits} stochastic={stochastic} feedback={feedback}"] = opcodes(quant._quantize_kernel, sig, consts, warps)
for bits in range(1, 9):
    sig = {"codes_ptr": "*i8" if bits == 8 else "*u8", "scales_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "ncodes": "i32"}
    consts = dict(BLOCK=64, ROWS=32, BITS=bits, OFFSET=0.5 if bits == 1 else 2.0 ** (bits - 1))
    out[f"dequantize bits={bits}"] = opcodes(quant._dequantize_kernel, sig, consts)
for width in pack.TRITON_WIDTHS:
    consts = dict(WIDTH=width, VALUES=pack.TILE)
    sig = {"values_ptr": "*i64", "packed_ptr": "*u8", "count": "i32", "nbytes": "i32"}
    out[f"pack_bits width={width}"] = opcodes(pack._pack_bits_kernel, sig, consts)
    sig = {"packed_ptr": "*u8", "out_ptr": "*i64", "count": "i32", "nbytes": "i32"}
    out[f"unpack_bits width={width}"] = opcodes(pack._unpack_bits_kernel, sig, consts)
for block in (64, 4096):
    rows, warps = pack.block_tiling(block)
    sig = {"x_ptr": "*bf16", "bits_ptr": "*u8", "scales_ptr": "*fp32", "n": "i32"}
    out[f"sign_quantize block={block}"] = opcodes(pack._sign_quantize_kernel, sig, dict(BLOCK=block, ROWS=rows), warps)
    sig = {"bits_ptr": "*u8", "scales_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"}
    out[f"sign_dequantize block={block}"] = opcodes(pack._sign_dequantize_kernel, sig, dict(BLOCK=block, ROWS=rows), warps)
json.dump(out, sys.stdout)
"""


def test_cuda_codegen_is_exact(tmp_path):
    """The PTX of every kernel: IEEE division, no FMA contraction, no flush-to-zero, no approximations.

    Under the interpreter numpy rounds every fp32 operation once, as torch does. On CUDA that
    holds only if `/` is div.rn (Triton's default is div.full), a*b+c is not fused (mul.rn/add.rn:
    ptxas never contracts .rn instructions) and nothing flushes subnormals (.ftz, e.g. libdevice's
    floor under Triton's default reflect-FTZ).
    """
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GRADCODEC_KERNELS")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _CODEGEN_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's CUDA toolchain (ptxas) is not installed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for variant, ops in json.loads(proc.stdout).items():
        bad = [op for op in ops if ".ftz" in op or "approx" in op or "div.full" in op
               or (op.startswith(("fma.", "mad.")) and ".f" in op)
               or (op.startswith(("add.", "sub.", "mul.")) and op.split(".")[-1].startswith("f") and ".rn." not in op)]
        assert not bad, f"{variant}: {bad}"
        # one bit rounded to nearest keeps the sign and scale = absmax: nothing to divide
        if variant.startswith(("quantize", "sign_quantize")) and not variant.startswith("quantize bits=1 stochastic=False"):
            assert "div.rn.f32" in ops, f"{variant}: no IEEE division in {ops}"


# ---- on a GPU: the default backend selection -----------------------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("block", [8, 4096])
def test_cuda_default_backend_matches_reference(monkeypatch, block):
    """CUDA tensors with GRADCODEC_KERNELS unset (auto -> triton) against the CPU reference."""
    monkeypatch.delenv("GRADCODEC_KERNELS")
    x = gradient_like(3 * block + 5, torch.bfloat16)
    assert kernels.select_backend(x.cuda()) == "triton"
    for bits in [8, 4]:
        for seed in SEEDS:
            check_quantize(x, bits, block, seed, device="cuda")
            check_quantize(special_values(torch.float32), bits, block, seed, device="cuda")
    check_sign(x, block, device="cuda")
    values = torch.randint(0, 16, (1001,))
    assert_bits_equal(kernels.pack_bits(values.cuda(), 4), reference.pack_bits(values, 4), "pack_bits")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_more_than_2_to_31_elements(monkeypatch, bits):
    """int64 offsets: the blocks around and past element 2**31 against the reference's chunk function.

    Needs about 15 GB of GPU memory: 2**31 fp16 inputs, their codes, then 2**31 fp32 outputs.
    """
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GB")
    monkeypatch.delenv("GRADCODEC_KERNELS")
    block, n = 64, 2**31 + 3 * 64 + 5
    start = (2**31 // block - 2) * block  # the last two blocks before 2**31, and the rest
    code_start = start if bits == 8 else start // 2
    x = torch.empty(n, dtype=torch.float16, device="cuda").normal_(generator=torch.Generator("cuda").manual_seed(0))
    tail = x[start:].cpu()
    for seed in [None, 9]:
        codes, scales = kernels.quantize_blockwise(x, bits, block, seed)
        q, ref_scales = reference._quantize_chunk(tail.float(), bits, block, seed, start)
        ref_codes = torch.empty(tail.numel() if bits == 8 else (tail.numel() + 1) // 2, dtype=codes.dtype)
        reference._store_codes(q, bits, ref_codes, 0, tail.numel())
        assert_bits_equal(scales[start // block:], ref_scales, f"scales past 2**31, seed={seed}")
        assert_bits_equal(codes[code_start:], ref_codes, f"codes past 2**31, seed={seed}")
    del x
    out = kernels.dequantize_blockwise(codes, scales, bits, block, n)[start:]
    expected = reference.dequantize_blockwise(ref_codes, ref_scales, bits, block, tail.numel())
    assert_bits_equal(out, expected, "dequantize past 2**31")
