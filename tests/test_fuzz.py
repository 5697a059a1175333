"""decode of any byte string returns a valid result or raises GradcodecError; never anything else.

Valid payloads of every registered per-tensor codec are mutated (bit flips, overwritten and inserted
bytes, truncations, spliced regions); half of the mutants get a freshly computed checksum so that
they reach the header and section parsers instead of stopping at the CRC.
"""
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradcodec
from gradcodec import registry, wire
from gradcodec.errors import GradcodecError

from .test_wire import reseal

MUTATIONS = 12_000


def _specs() -> list[str]:
    names = [n for n in gradcodec.list_codecs()  # dp writes no payload of its own (tests/test_dp.py)
             if registry.lookup(n).kind in ("transform", "quantizer") and not hasattr(registry.lookup(n), "prepare")]
    return names + [f"{n}|zstd" for n in names] + ["int8:stochastic=true", "fp16|zstd:level=1", "int8|ans", "int4|ans",
                                                   "topk:ratio=0.3|int8|ans", "sign|ans"]


def _payloads() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    inputs = [
        {"lora_A": torch.randn(4, 24, generator=g), "lora_B": torch.randn(24, 4, generator=g).to(torch.bfloat16)},
        torch.randn(130, generator=g).to(torch.float16),
        {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)},
    ]
    return [gradcodec.encode(x, spec) for spec in _specs() for x in inputs]


PAYLOADS = _payloads()


def _mutate(blob: bytes, rng: random.Random) -> bytes:
    b = bytearray(blob)
    op = rng.randrange(6)
    if op == 0:
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 2:
        del b[rng.randrange(len(b)) :]
    elif op == 3:
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op == 4:
        i, j = sorted(rng.randrange(len(b) + 1) for _ in range(2))
        del b[i:j]
    else:
        i, j = sorted(rng.randrange(len(b) + 1) for _ in range(2))
        k = rng.randrange(len(b) + 1)
        b[k:k] = b[i:j]
    if len(b) >= 4 and rng.random() < 0.5:
        b = bytearray(reseal(b))
    return bytes(b)


def _check_decodes_or_refuses(blob: bytes) -> str:
    try:
        out = gradcodec.decode(blob)
    except GradcodecError:
        return "refused"
    limit = wire.output_limit(len(blob), None)
    tensors = [out] if isinstance(out, torch.Tensor) else list(out.values())
    assert all(isinstance(t, torch.Tensor) for t in tensors)
    assert sum(t.numel() * t.element_size() for t in tensors) <= limit
    return "decoded"


def test_mutated_payloads_decode_or_raise_gradcodec_errors():
    rng = random.Random(1234)
    outcomes = {"refused": 0, "decoded": 0}
    for i in range(MUTATIONS):
        outcomes[_check_decodes_or_refuses(_mutate(PAYLOADS[i % len(PAYLOADS)], rng))] += 1
    # both branches must be exercised, or the fuzzer is not reaching the parsers
    assert outcomes["refused"] > MUTATIONS // 4 and outcomes["decoded"] > 100, outcomes


@pytest.mark.parametrize("index", range(0, len(PAYLOADS), 3))
def test_every_truncation_of_a_payload_is_refused(index):
    blob = PAYLOADS[index]
    for cut in range(len(blob)):
        with pytest.raises(GradcodecError):
            gradcodec.decode(blob[:cut])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_are_refused(data):
    with pytest.raises(GradcodecError):
        gradcodec.decode(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(PAYLOADS) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_resealed_byte_edits_decode_or_raise(index, edits):
    b = bytearray(PAYLOADS[index])
    for pos, value in edits:
        b[pos % (len(b) - 4)] = value
    _check_decodes_or_refuses(reseal(b))


def test_inspect_refuses_mutants_with_gradcodec_errors_only():
    rng = random.Random(99)
    for i in range(2000):
        try:
            gradcodec.inspect(_mutate(PAYLOADS[i % len(PAYLOADS)], rng))
        except GradcodecError:
            pass


def test_mutated_by_reference_payloads_decode_or_raise_gradcodec_errors():
    """The by-reference header (layout fingerprint + section lists) under the same mutations, decoded
    with the layout the intact payload names."""
    g = torch.Generator().manual_seed(1)
    x = {"q.lora_A": torch.randn(4, 24, generator=g), "q.lora_B": torch.randn(24, 4, generator=g)}
    blobs = [gradcodec.encode(x, spec, by_reference=True) for spec in ("raw", "int8", "topk:ratio=0.2|int4|zstd", "sign")]
    rng = random.Random(7)
    outcomes = {"refused": 0, "decoded": 0}
    for i in range(3000):
        blob = _mutate(blobs[i % len(blobs)], rng)
        try:
            out = gradcodec.decode(blob, layout=x)
        except GradcodecError:
            outcomes["refused"] += 1
            continue
        assert [tuple(t.shape) for t in out.values()] == [(4, 24), (24, 4)]
        outcomes["decoded"] += 1
    assert outcomes["refused"] > 750 and outcomes["decoded"] > 20, outcomes
