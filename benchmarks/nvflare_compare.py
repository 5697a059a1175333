"""FLARE's own update quantizers against gradcodec codecs, on the same LoRA updates, in one run.

    flock /tmp/heavy.lock nice -n 19 python benchmarks/nvflare_compare.py --out docs/results/nvflare.json
    ... --jobs            # also the final eval loss of the FLARE simulator job with each method (slower)

Part 1 (codecs): real LoRA updates of the pre-trained tiny base (2 clients x 3 rounds of in-process
FedAvg, the recipe of `integrations/nvflare/lora_job.py`) go through FLARE's `ModelQuantizer` /
`ModelDequantizer` (fp16 and AdaQuant: the bitsandbytes types need CUDA) and through gradcodec specs.
Bytes are what each method ships for one update: for FLARE its own count (quantized values + quantization
state arrays), for gradcodec the payload. Errors are over the whole update (gradcodec.metrics); speeds
are fp32 update bytes per second, min over repeats.
Part 2 (--jobs): the FLARE job of lora_job.py, run in FLARE's simulator with each method on the uplink
(FLARE's filters quantize the WEIGHTS the client sends, as in FLARE's LLM examples; gradcodec's encode
the update), and the eval loss of the final global adapter.
"""
import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer

import gradcodec
from gradcodec.integrations.fedlora.model import load_tokenizer
from gradcodec.integrations.fedlora.train import local_train
from gradcodec.integrations.nvflare.lora_job import build_job, client_examples, eval_loss, lora_model, run_job
from gradcodec.integrations.peft import fedavg, load_lora_state, lora_state
from gradcodec.metrics import distortion

FLARE_TYPES = ["float16", "adaquant"]
GRADCODEC_SPECS = ["fp16", "int8", "int4", "int4:block=256|zstd",
                   "topk:ratio=0.1|int8|zstd", "sign"]
JOB_METHODS = [None, "flare:float16", "flare:adaquant", "int8", "int4", "int4:block=256|zstd", "topk:ratio=0.1|int8|zstd"]
FLARE_QUANTIZERS = "nvflare.app_opt.pt.quantization."  # not in FLARE's default class allow-list


def lora_updates(rounds: int = 3, clients: int = 2, steps: int = 4) -> list[dict[str, torch.Tensor]]:
    """Each client's update (trained minus received adapter) in each round of an uncompressed FedAvg."""
    model, tokenizer = lora_model(pretrained=True), load_tokenizer("tiny")
    global_state, updates = lora_state(model), []
    for r in range(rounds):
        states = []
        for c in range(clients):
            load_lora_state(model, global_state)
            local_train(model, client_examples(f"site-{c + 1}", clients, 64), tokenizer, steps=steps, lr=2e-3,
                        batch_size=8, seed=r)
            states.append(lora_state(model))
            updates.append({k: states[-1][k] - global_state[k] for k in global_state})
        global_state = fedavg(states, [1.0] * clients)
    return updates


def _timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _flare_roundtrip(kind: str, update: dict[str, torch.Tensor], repeats: int):
    quantizer, dequantizer, ctx = ModelQuantizer(kind), ModelDequantizer(), FLContext()
    quantizer.logger.setLevel("WARNING")
    dequantizer.logger.setLevel("WARNING")
    as_numpy = lambda: {k: v.numpy().copy() for k, v in update.items()}  # noqa: E731 - the quantizer edits in place
    (params, state, dtypes), t_enc = _timed(lambda: quantizer.quantization(as_numpy(), ctx), repeats)
    sent = sum(np.asarray(v).nbytes for v in params.values())
    sent += sum(s.nbytes for per in state.values() for s in per.values() if isinstance(s, (np.ndarray, torch.Tensor)))
    copy = lambda: ({k: np.array(v, copy=True) for k, v in params.items()}, state)  # noqa: E731
    decoded, t_dec = _timed(lambda: dequantizer.dequantization(*copy(), kind, dtypes, ctx), repeats)
    return sent, {k: torch.as_tensor(np.asarray(v)).float() for k, v in decoded.items()}, t_enc, t_dec


def _gradcodec_roundtrip(spec: str, update: dict[str, torch.Tensor], repeats: int):
    codec = gradcodec.get_codec(spec, seed=0)
    blob, t_enc = _timed(lambda: codec.encode(update), repeats)
    decoded, t_dec = _timed(lambda: gradcodec.decode(blob), repeats)
    return len(blob), decoded, t_enc, t_dec


def compare_codecs(updates: list[dict[str, torch.Tensor]], repeats: int) -> list[dict]:
    methods = [(f"FLARE {k}", lambda u, k=k: _flare_roundtrip(k, u, repeats)) for k in FLARE_TYPES]
    methods += [(f"gradcodec {s}", lambda u, s=s: _gradcodec_roundtrip(s, u, repeats)) for s in GRADCODEC_SPECS]
    rows = []
    for label, roundtrip in methods:
        sent = raw = 0
        errs, coss, t_enc, t_dec = [], [], 0.0, 0.0
        for update in updates:
            n, decoded, te, td = roundtrip(update)
            d = distortion(update, decoded)
            sent += n
            raw += sum(t.numel() * 4 for t in update.values())
            errs.append(d["rel_l2"])
            coss.append(d["cosine"])
            t_enc += te
            t_dec += td
        rows.append({"method": label, "bytes_per_update": sent / len(updates), "ratio": raw / sent,
                     "rel_l2": float(np.mean(errs)), "cosine": float(np.mean(coss)),
                     "encode_MBps": raw / t_enc / 1e6, "decode_MBps": raw / t_dec / 1e6})
    return rows


def job_losses(rounds: int, workspace: str, methods: list[str | None]) -> list[dict]:
    """Final eval loss of the FLARE simulator job with each uplink method (FLARE quantizer or gradcodec spec)."""
    from nvflare.job_config.defs import FilterType

    rows = []
    for method in methods:
        spec = method if method and not method.startswith("flare:") else None
        job = build_job(spec, rounds=rounds, pretrained=True)
        if method and method.startswith("flare:"):
            kind = method.split(":", 1)[1]
            job.to(ModelDequantizer(), "server", tasks=["train"], filter_type=FilterType.TASK_RESULT)
            for site in ("site-1", "site-2"):
                job.to(ModelQuantizer(kind), site, tasks=["train"], filter_type=FilterType.TASK_RESULT)
        job_workspace = os.path.join(workspace, (method or "none").replace(":", "_").replace("|", "_"))
        os.makedirs(os.path.join(job_workspace, "local"))
        with open(os.path.join(job_workspace, "local", "resources.json"), "w") as f:  # run_job adds gradcodec
            json.dump({"class_allow_list": list(DEFAULT_CLASS_ALLOW_LIST) + [FLARE_QUANTIZERS]}, f)
        t0 = time.perf_counter()
        adapter = run_job(job, job_workspace)
        rows.append({"method": method or "uncompressed", "eval_loss": eval_loss(adapter, pretrained=True),
                     "job_seconds": time.perf_counter() - t0})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jobs", action="store_true", help="also run the FLARE job with each method")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each FLARE job")
    parser.add_argument("--methods", default=",".join(m or "none" for m in JOB_METHODS),
                        help="comma-separated uplink methods of the jobs: none, flare:<type>, or a gradcodec spec")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    updates = lora_updates()
    rows = compare_codecs(updates, args.repeats)
    raw_bytes = sum(t.numel() * t.element_size() for t in updates[0].values())
    print(f"| method | bytes/update | ratio | rel. L2 error | cosine | encode MB/s | decode MB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bytes_per_update']:,.0f} | {r['ratio']:.1f}x | {r['rel_l2']:.4f} | {r['cosine']:.4f} "
              f"| {r['encode_MBps']:.0f} | {r['decode_MBps']:.0f} |")
    jobs, start = [], None
    if args.jobs:
        with tempfile.TemporaryDirectory() as ws:
            methods = [None if m == "none" else m for m in args.methods.split(",")]
            jobs = job_losses(args.rounds, ws, methods)
        sizes = {r["method"]: r["bytes_per_update"] for r in rows}
        for r in jobs:  # one update's bytes as part 1 measured them (a WEIGHTS quantizer ships the same size)
            label = f"FLARE {r['method'][6:]}" if r["method"].startswith("flare:") else f"gradcodec {r['method']}"
            r["bytes_per_update"] = sizes.get(label, raw_bytes if r["method"] == "uncompressed" else None)
        start = eval_loss(lora_state(lora_model(pretrained=True)), pretrained=True)
        print(f"eval loss of the base with the fresh adapter (before any round): {start:.4f}")
        print("| uplink | bytes/update | final eval loss | job s |")
        print("|---|---|---|---|")
        for r in jobs:
            size = "?" if r["bytes_per_update"] is None else f"{r['bytes_per_update']:,.0f}"
            print(f"| {r['method']} | {size} | {r['eval_loss']:.4f} | {r['job_seconds']:.0f} |")
    if args.out:
        import nvflare

        meta = {"command": f"python benchmarks/nvflare_compare.py --repeats {args.repeats}"
                           + (f" --jobs --rounds {args.rounds} --methods '{args.methods}'" if args.jobs else ""),
                "wall_s": round(time.perf_counter() - t_start),
                "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), shared with other jobs; 1 torch thread",
                "nvflare": nvflare.__version__, "torch": torch.__version__,
                "updates": f"{len(updates)} LoRA updates (rank 8, q/k/v/o, tiny preset pre-trained), "
                           f"{sum(t.numel() for t in updates[0].values())} values each"}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "codecs": rows, "jobs": jobs, "eval_loss_before_training": start}, f, indent=1)


if __name__ == "__main__":
    main()
