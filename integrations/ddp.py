"""A DistributedDataParallel communication hook that sends gradcodec payloads instead of fp32 buckets.

    model = DDP(model)
    state = GradcodecHookState("int8")             # any spec; error feedback on by default for lossy ones
    model.register_comm_hook(state, gradcodec_hook)
    ...
    state.bytes_per_step()                         # what this rank put on the wire, per step

Data path of one gradient bucket on each rank (every rank runs the same steps):

    bucket gradients ─▶ named tensors {"0": g0, "1": g1, ...} (each in its parameter's shape)
      ─▶ ErrorFeedback(codec).encode(by_reference=True) ─▶ payload bytes
      ─▶ all_gather(length) ─▶ all_gather(payload padded to the longest, uint8 on the bucket's device)
      ─▶ decode every rank's payload, rank 0 first ─▶ sum / world size ─▶ the bucket's new contents

Compressed payloads do not add up, so they are all-gathered rather than all-reduced. Each rank decodes
every payload, its own included, and sums them in rank order: all ranks compute the same average bit for
bit, so the replicas stay identical. With a lossless spec ("raw", "zstd") the result is bit-identical to
DDP's own all-reduce average for two ranks (g0/2 + g1/2 either way).

Payloads name their tensor layout by fingerprint (the ranks share it: DDP builds the same buckets
everywhere), so they carry no names or shapes. Error-feedback residuals (and PowerSGD's warm start) live
in the state, one codec object per bucket index; DDP rebuilds its buckets once after the first
iteration, and a bucket whose layout changed starts from a fresh codec.

Failures never hang the job: a rank that cannot encode (NaN/Inf gradients, for one) sends an empty
payload, and a payload that does not decode fails the step on every rank alike, with a
`GradcodecError` naming the rank that sent it. Nothing is averaged from a payload that failed.

Wire cost per step and rank (see `bytes_per_step`): all-gathering W payloads of the longest length L has
each rank send (W - 1)·L bytes over a ring, against 2(W - 1)/W·N for the all-reduce of an N-byte bucket:
the same for two ranks, and the compressed all-gather's advantage shrinks as W grows.
"""

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

import gradcodec
from gradcodec.errors import GradcodecError

__all__ = ["GradcodecHookState", "gradcodec_hook", "average_payloads"]

_LOG = logging.getLogger(__name__)


class GradcodecHookState:
    """What `gradcodec_hook` keeps between steps: the codec per bucket and the byte counts.

    spec: any gradcodec spec, e.g. "int8", "powersgd:rank=4", "topk:ratio=0.01|int8|zstd".
    error_feedback: keep a residual per bucket (ignored for lossless specs, which lose nothing).
    process_group: the group DDP reduces over (default: the world).
    seed: makes stochastic codecs reproducible; each rank derives its own stream from it.
    models: learned-codec model files or loaded models that payloads may name by fingerprint.
    """

    def __init__(self, spec: str = "int8", *, error_feedback: bool = True, process_group: dist.ProcessGroup | None = None,
                 seed: int | None = None, models: Sequence[Any] = ()):
        self.spec = spec
        self.lossless = gradcodec.get_codec(spec).lossless  # also validates the spec before training starts
        self.error_feedback = error_feedback and not self.lossless
        self.process_group = process_group
        self.seed = seed
        self.models = list(models)
        self._codecs: dict[int, tuple[bytes, Any]] = {}  # bucket index -> (layout fingerprint, codec)
        self.steps = 0
        self.payload_bytes = 0  # this rank's own payloads
        self.wire_bytes = 0  # what this rank contributes to the all-gathers (padding and lengths included)
        self.uncompressed_bytes = 0  # the buckets as DDP would all-reduce them

    def codec_for(self, index: int, layout: gradcodec.Layout) -> Any:
        """The codec of bucket `index`, new if the bucket's layout is not the one it was built for."""
        fingerprint = layout.fingerprint
        known = self._codecs.get(index)
        if known is None or known[0] != fingerprint:
            seed = None if self.seed is None else (self.seed * 1_000_003 + _rank(self.process_group)) * 4099 + index
            codec = gradcodec.get_codec(self.spec, error_feedback=self.error_feedback, seed=seed)
            self._codecs[index] = (fingerprint, codec)
        return self._codecs[index][1]

    def bytes_per_step(self) -> dict[str, float]:
        """Mean bytes per step of this rank: its payloads, its share of the all-gathers, the fp32 buckets."""
        steps = max(self.steps, 1)
        return {"payload": self.payload_bytes / steps, "wire": self.wire_bytes / steps,
                "uncompressed": self.uncompressed_bytes / steps}


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _bucket_tensors(bucket: dist.GradBucket) -> dict[str, torch.Tensor]:
    """The bucket's flat buffer as one view per parameter, in the parameter's shape, named by position."""
    buffer, named, offset = bucket.buffer(), {}, 0
    for i, p in enumerate(bucket.parameters()):
        named[str(i)] = buffer[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
    return named


def average_payloads(payloads: Sequence[bytes], layout: gradcodec.Layout, out: torch.Tensor,
                     models: Sequence[Any] = ()) -> torch.Tensor:
    """Decode every rank's payload (rank order) into the mean of their tensors, written flat into `out`.

    Raises GradcodecError naming the first rank whose payload is empty (it could not encode) or does not
    decode to `layout`; `out` is then left unchanged.
    """
    total = torch.zeros(out.numel(), dtype=torch.float32, device=out.device)
    limit = out.numel() * 8 + (1 << 20)  # decoded tensors are this bucket, never more
    for rank, blob in enumerate(payloads):
        if not blob:
            raise GradcodecError(f"rank {rank} could not encode its gradients this step (see that rank's log); "
                                 "the step is abandoned on every rank")
        try:
            decoded = gradcodec.decode(blob, out.device, layout=layout, models=list(models), max_output_bytes=limit)
        except GradcodecError as e:
            raise type(e)(f"gradient payload from rank {rank} does not decode: {e}") from e
        total += torch.cat([t.reshape(-1).float() for t in decoded.values()])
    out.copy_(total.div_(len(payloads)))
    return out


def gradcodec_hook(state: GradcodecHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: encode the bucket, all-gather the payloads, return their decoded mean."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    named = _bucket_tensors(bucket)
    layout = gradcodec.Layout.of(named)
    try:
        payload = state.codec_for(bucket.index(), layout).encode(named, by_reference=True)
    except GradcodecError as e:
        # Every rank must still join the all-gathers, or the others wait forever: send an empty payload,
        # which fails the step everywhere, and say why here.
        _LOG.error("rank %d: bucket %d not encoded: %s", _rank(group), bucket.index(), e)
        payload = b""

    device = buffer.device
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(n) for n in lengths]
    longest = max(max(sizes), 1)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        mine[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    gathered = [torch.empty_like(mine) for _ in range(world)]

    state.payload_bytes += len(payload)
    state.wire_bytes += longest + length.element_size()
    state.uncompressed_bytes += buffer.numel() * buffer.element_size()
    if bucket.is_last():
        state.steps += 1

    work = dist.all_gather(gathered, mine, group=group, async_op=True)
    work.wait()
    blobs = [bytes(g[:n].cpu().numpy()) for g, n in zip(gathered, sizes)]
    average_payloads(blobs, layout, buffer, state.models)
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(buffer)
    return done
