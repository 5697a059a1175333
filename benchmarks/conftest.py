"""Shared set-up of the pytest-benchmark suites: devices, sizes, and ratios to a copy baseline.

Every group (one op on one device) contains a `copy` entry: a clone of the same input bytes, timed in
the same run. The terminal summary prints each entry's median time as a multiple of that copy and as
GB/s of input, so figures compare across machines and noisy runs.

    pytest benchmarks/ --benchmark-only                      # CPU, and CUDA when present
    GRADCODEC_BENCH_N=4M pytest benchmarks/ --benchmark-only # smaller inputs
"""
from __future__ import annotations

import os

import pytest
import torch

from gradcodec.bench.workloads import parse_size

N = parse_size(os.environ.get("GRADCODEC_BENCH_N", "16M"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def split_into(flat: torch.Tensor, outs: list[torch.Tensor]) -> None:
    """Copy `flat` into `outs` in order: the copy baseline of ops that write a list of tensors."""
    for out, part in zip(outs, torch.split(flat, [o.numel() for o in outs])):
        out.view(-1).copy_(part)


def measure(benchmark, fn, *, op: str, label: str, device: str, input_bytes: int, rounds: int = 5):
    """Time fn under `op [device]`, labelled `label` ('copy' is the group's baseline)."""
    benchmark.group = f"{op} [{device}]"
    benchmark.extra_info.update(label=label, input_bytes=input_bytes)

    def call():
        out = fn()
        _sync(device)
        return out

    return benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group, []).append(bench)
    terminalreporter.section("ratios to a copy of the same bytes (same run)")
    for group, benches in sorted(groups.items()):
        copy = next((b for b in benches if b.extra_info.get("label") == "copy"), None)
        if copy is None:
            continue
        base = copy.stats.median
        terminalreporter.write_line(group)
        for b in sorted(benches, key=lambda b: b.stats.median):
            med = b.stats.median
            gbps = b.extra_info.get("input_bytes", 0) / med / 1e9
            terminalreporter.write_line(
                f"  {b.extra_info.get('label', b.name):<28} {med * 1e3:9.2f} ms  {gbps:7.2f} GB/s  "
                f"{med / base:6.2f}x copy time  ({base / med:5.2f} of copy bandwidth)"
            )
