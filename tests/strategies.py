"""Test inputs shared by the codec test modules: dtypes, hypothesis settings and tensor strategies."""
import torch
from hypothesis import settings
from hypothesis import strategies as st

from gradcodec.codecs.base import EncodeContext

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FAST = settings(max_examples=40, deadline=None)
STAT = settings(max_examples=12, deadline=None, derandomize=True)  # statistical: fixed examples, never flaky


@st.composite
def tensors(draw, max_numel=700, dtypes=DTYPES):
    """Tensors of 0..3 dims (0-d and empty included), odd sizes, maybe non-contiguous, with ties and zeros."""
    ndim = draw(st.integers(0, 3))
    side = max(1, int(max_numel ** (1 / ndim))) if ndim else 1
    shape = [draw(st.integers(0, side)) for _ in range(ndim)]
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "heavy", "sparse", "ties"]))
    strided = draw(st.booleans())
    full = shape + [2] if strided else shape
    base = torch.randn(full, generator=g)
    if kind == "heavy":
        base = (base / (torch.rand(full, generator=g) + 1e-2)).clamp(-1e3, 1e3)
    elif kind == "sparse":
        base = base * (torch.rand(full, generator=g) < 0.2)
    elif kind == "ties":
        base = torch.randint(-3, 4, full, generator=g).float()
    base = base.to(dtype)
    return base[..., 0] if strided else base  # stride 2: non-contiguous


def ctx(seed=0, name="w"):
    """An encode context with a seeded generator."""
    return EncodeContext(name, torch.Generator().manual_seed(seed))
