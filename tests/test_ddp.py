"""The DDP communication hook: two gloo processes on CPU, against DDP's own all-reduce."""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcodec
from gradcodec.errors import CorruptPayload, GradcodecError
from gradcodec.integrations.ddp import GradcodecHookState, average_payloads, gradcodec_hook

WORLD = 2
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # bucket_cap_mb below splits these into several buckets
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 1))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(32, 16, generator=g)
    return x, x[:, :4].sum(1, keepdim=True).sin()


def _train(rank: int, spec: str | None, corrupt: bool) -> dict:
    model = DDP(_model(), bucket_cap_mb=0.005)
    state = None
    if spec is not None:
        state = (_CorruptingState if corrupt and rank == 1 else GradcodecHookState)(spec, seed=3)
        model.register_comm_hook(state, gradcodec_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads, error = [], [], None
    for step in range(STEPS):
        x, y = _batch(rank, step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        try:
            loss.backward()
        except Exception as e:  # noqa: BLE001 - recorded for the test to inspect
            error = f"{type(e).__name__}: {e}"
            break
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        losses.append(loss.item())
        opt.step()
    return {"losses": losses, "grads": grads, "params": [p.detach().clone() for p in model.parameters()],
            "error": error, "buckets": len(state._codecs) if state else 0, "bytes": state.bytes_per_step() if state else None}


def _worker(rank: int, port: int, runs: list[tuple[str, str | None, bool]], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {name: _train(rank, spec, corrupt) for name, spec, corrupt in runs}
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


class _CorruptingState(GradcodecHookState):
    """A rank whose payloads arrive with one bit flipped."""

    def codec_for(self, index, layout):
        codec = super().codec_for(index, layout)

        class Flipping:
            def encode(self, x, **kwargs):
                return _flip(codec.encode(x, **kwargs))
        return Flipping()


def _flip(blob: bytes) -> bytes:
    b = bytearray(blob)
    b[len(b) // 2] ^= 0x40
    return bytes(b)


# One spawn for every run (starting two interpreters costs more than the training); the corrupt run
# goes last since it ends with a failed backward.
RUNS = [("none", None, False), ("raw", "raw", False), ("int4", "int4", False), ("corrupt", "int8", True)]


@pytest.fixture(scope="module")
def runs() -> dict[str, list[dict]]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(_free_port(), RUNS, out), nprocs=WORLD, join=True)
        per_rank = [torch.load(os.path.join(out, f"{r}.pt")) for r in range(WORLD)]
    return {name: [per_rank[r][name] for r in range(WORLD)] for name, _, _ in RUNS}


@pytest.mark.slow  # one 2-process spawn shared by these three (~30 s on a busy 2-core machine)
def test_lossless_spec_gives_ddps_own_gradients_bit_for_bit(runs):
    ours, no_hook = runs["raw"], runs["none"]
    assert ours[0]["buckets"] > 1  # the model really spans several buckets
    for rank in range(WORLD):
        assert ours[rank]["error"] is None
        for g_ours, g_ref in zip(ours[rank]["grads"], no_hook[rank]["grads"]):
            assert torch.equal(g_ours, g_ref)
        assert ours[rank]["losses"] == no_hook[rank]["losses"]


@pytest.mark.slow  # one 2-process spawn shared by these three (~30 s on a busy 2-core machine)
def test_lossy_spec_with_error_feedback_trains_and_keeps_replicas_identical(runs):
    ours, no_hook = runs["int4"], runs["none"]
    assert ours[0]["error"] is None
    for a, b in zip(ours[0]["params"], ours[1]["params"]):
        assert torch.equal(a, b)
    assert ours[0]["losses"][-1] < ours[0]["losses"][0]
    # int4 with a 64-element block keeps each averaged gradient close to the exact one
    first = ours[0]["grads"][0]
    exact = no_hook[0]["grads"][0]
    assert float((first - exact).norm() / exact.norm()) < 0.2
    sent = ours[0]["bytes"]
    assert sent["payload"] < sent["uncompressed"] / 4


@pytest.mark.slow  # one 2-process spawn shared by these three (~30 s on a busy 2-core machine)
def test_a_payload_that_does_not_decode_fails_the_step_on_every_rank_naming_the_sender(runs):
    ours = runs["corrupt"]
    for rank in range(WORLD):
        assert ours[rank]["error"].startswith("CorruptPayload: gradient payload from rank 1 does not decode")
        assert ours[rank]["losses"] == []


def test_average_payloads_is_the_mean_of_the_decoded_tensors():
    a = {"0": torch.randn(3, 4), "1": torch.randn(5)}
    b = {"0": torch.randn(3, 4), "1": torch.randn(5)}
    layout = gradcodec.Layout.of(a)
    blobs = [gradcodec.encode(x, "raw", by_reference=True) for x in (a, b)]
    out = torch.empty(17)
    average_payloads(blobs, layout, out)
    expected = torch.cat([((a[k] + b[k]) / 2).reshape(-1) for k in ("0", "1")])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def test_average_payloads_names_the_rank_whose_payload_is_corrupt_and_leaves_the_bucket_alone():
    x = {"0": torch.randn(8)}
    layout = gradcodec.Layout.of(x)
    good = gradcodec.encode(x, "int8", by_reference=True)
    out = torch.full((8,), 7.0)
    with pytest.raises(CorruptPayload, match="rank 2"):
        average_payloads([good, good, _flip(good)], layout, out)
    with pytest.raises(GradcodecError, match="rank 1 could not encode"):
        average_payloads([good, b""], layout, out)
    assert torch.equal(out, torch.full((8,), 7.0))


def test_a_bucket_whose_layout_changes_gets_a_fresh_codec():
    state = GradcodecHookState("int8")
    first = state.codec_for(0, gradcodec.Layout.of({"0": torch.zeros(4)}))
    assert state.codec_for(0, gradcodec.Layout.of({"0": torch.zeros(4)})) is first
    assert state.codec_for(0, gradcodec.Layout.of({"0": torch.zeros(5)})) is not first
