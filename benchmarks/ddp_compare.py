"""DDP with gradcodec's hook against torch's own compression hooks, in one 2-process gloo run.

    flock /tmp/heavy.lock nice -n 19 python benchmarks/ddp_compare.py --steps 300 --out docs/results/ddp.json

Every configuration trains the same MLP from the same initialisation on the same per-rank batches, one
after the other in one process group, so step times are side by side. Bytes are what each rank hands to
the collectives per step, counted by wrapping torch.distributed's all_reduce / all_gather (no hook: the
reducer all-reduces every fp32 gradient bucket, counted as their size). For two ranks a ring all-reduce
and a ring all-gather of those inputs each send exactly that many bytes per rank.
"""
import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from gradcodec.integrations.ddp import GradcodecHookState, gradcodec_hook

WORLD = 2
RANK = 4  # PowerSGD rank, torch's and gradcodec's
GRADCODEC_SPECS = ["fp16", "int8", "int4", f"powersgd:rank={RANK}", "topk:ratio=0.01|int8"]
DIM_IN, CLASSES, BATCH = 128, 10, 64


def _model(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM_IN, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, CLASSES))


def powersgd_in_bucket_order(state: powerSGD_hook.PowerSGDState,
                             bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """torch's `powerSGD_hook`, finished before the next bucket's hook starts.

    torch's hook issues its P and Q all-reduces from callbacks of the previous all-reduce's future. On
    gloo those callbacks run on a gloo thread when the data arrives, so with two or more buckets each
    rank interleaves them with the next bucket's all-reduce (issued by the backward pass) in its own
    order. Gloo pairs collectives by the order they are issued, and the job aborts ("Received data size
    doesn't match expected size"). Waiting here keeps one order on every rank; like gradcodec's hook,
    which waits for its all-gather, it gives up overlapping a bucket's communication with the backward
    pass of the rest. With one bucket nothing is lost: DDP waits for that bucket anyway.
    """
    future = powerSGD_hook.powerSGD_hook(state, bucket)
    future.wait()
    return future


def _teacher_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the labels a fixed random teacher gives them: a task the student can learn."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(DIM_IN, CLASSES, generator=torch.Generator().manual_seed(12345))
    x = torch.randn(n, DIM_IN, generator=g)
    return x, (torch.tanh(x) @ teacher).argmax(1)


class _ByteCounter:
    """Wraps torch.distributed's collectives (hooks look them up at call time) to add up input bytes."""

    def __init__(self):
        self.bytes = 0
        self._originals = {}
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor"):
            self._originals[name] = real = getattr(dist, name)
            setattr(dist, name, self._counting(name, real))

    def _counting(self, name, real):
        def wrapper(*args, **kwargs):
            tensor = args[1] if name in ("all_gather", "all_gather_into_tensor") else args[0]
            self.bytes += tensor.numel() * tensor.element_size()
            return real(*args, **kwargs)
        return wrapper


def _configs() -> list[tuple[str, str, object]]:
    return ([("no hook", "none", None), ("torch fp16_compress_hook", "fp16", None),
             (f"torch powerSGD_hook rank {RANK}", "powersgd", None)]
            + [(f"gradcodec {spec}", "gradcodec", spec) for spec in GRADCODEC_SPECS])


def _train(rank: int, kind: str, spec: str | None, steps: int, hidden: int, counter: _ByteCounter) -> dict:
    model = DDP(_model(hidden))
    if kind == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif kind == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=RANK, start_powerSGD_iter=2)
        model.register_comm_hook(state, powersgd_in_bucket_order)
    elif kind == "gradcodec":
        model.register_comm_hook(GradcodecHookState(spec, seed=1), gradcodec_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x_all, y_all = _teacher_data(rank, steps * BATCH)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    times, losses, sent = [], [], []
    for step in range(steps):
        x, y = x_all[step * BATCH:(step + 1) * BATCH], y_all[step * BATCH:(step + 1) * BATCH]
        before = counter.bytes
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        sent.append(counter.bytes - before if kind != "none" else grad_bytes)
        losses.append(loss.item())
    x_eval, y_eval = _teacher_data(999, 4096)
    with torch.no_grad():
        eval_loss = torch.nn.functional.cross_entropy(model.module(x_eval), y_eval).item()
    tail = max(steps // 10, 1)
    # step 0 is DDP's first (bucket rebuild); torch's PowerSGD all-reduces uncompressed before step 2
    return {"bytes_per_step": statistics.mean(sent[2:]), "step_ms_median": 1e3 * statistics.median(times[2:]),
            "final_train_loss": statistics.mean(losses[-tail:]), "eval_loss": eval_loss, "grad_bytes": grad_bytes,
            "buckets": model._get_ddp_logging_data().get("num_buckets_reduced")}


def _worker(rank: int, port: int, steps: int, hidden: int, repeats: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    counter = _ByteCounter()
    results: dict[str, list[dict]] = {}
    for _ in range(repeats):  # interleaved repeats: contention from other jobs hits every configuration alike
        for label, kind, spec in _configs():
            results.setdefault(label, []).append(_train(rank, kind, spec, steps, hidden, counter))
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration; step time is the min")
    parser.add_argument("--hidden", type=int, default=384,
                        help="MLP width: 384 gives one DDP bucket, 512 two (DDP's first bucket holds 1 MB)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(port, args.steps, args.hidden, args.repeats, out), nprocs=WORLD, join=True)
        per_rank = [torch.load(os.path.join(out, f"{r}.pt")) for r in range(WORLD)]
    rows = []
    for label, _, _ in _configs():
        runs = per_rank[0][label]
        rows.append({"config": label, "bytes_per_step": runs[0]["bytes_per_step"],
                     "step_ms": min(r["step_ms_median"] for r in runs),
                     "final_train_loss": runs[0]["final_train_loss"], "eval_loss": runs[0]["eval_loss"],
                     "eval_loss_rank1": per_rank[1][label][0]["eval_loss"], "buckets": runs[0]["buckets"]})
    base = rows[0]
    print(f"DDP buckets: {rows[0]['buckets']}")
    print(f"| config | bytes/step/rank | vs no hook | step ms (median, min of {args.repeats}) | final train loss | eval loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['bytes_per_step']:,.0f} | {base['bytes_per_step'] / r['bytes_per_step']:.1f}x "
              f"| {r['step_ms']:.2f} | {r['final_train_loss']:.4f} | {r['eval_loss']:.4f} |")
    if args.out:
        meta = {"command": f"python benchmarks/ddp_compare.py --steps {args.steps} --repeats {args.repeats} --hidden {args.hidden}",
                "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), shared with other jobs; gloo, 2 processes, 1 thread each",
                "torch": torch.__version__, "model": f"MLP {DIM_IN}-{args.hidden}-{args.hidden}-{CLASSES}",
                "ddp_buckets": rows[0]["buckets"],
                "batch_per_rank": BATCH, "steps": args.steps, "optimizer": "SGD lr 0.05 momentum 0.9"}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
