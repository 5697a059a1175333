"""Rate-distortion of int1..int8 (both roundings) beside sign, and the byte budget against uniform widths.

    python benchmarks/quant_widths.py --json docs/results/quant-widths.json

Part 1: each spec of the bench's "widths" set, one encode and decode per workload (16M-element
Gaussian, the lora7b dict): bits per value, ratio, relative L2 error, cosine. No timing (see
`gradcodec bench --codecs widths` for speeds).
Part 2: for each uniform width b, `budget:bytes=<len of the int<b> payload>` on the same dict: relative
error at equal bytes, and the widths it chose. Workloads: lora7b as the bench makes it (A ~ N(0, 0.02²),
B ~ N(0, 1e-6)), and a heterogeneous LoRA-like update (each tensor scaled by exp(N(0, 1)), Student-t
entries with 3 degrees of freedom), standing in for real round updates, whose tensors differ in scale.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import time

import torch

import gradcodec
from gradcodec import metrics
from gradcodec.bench.runner import CODEC_SETS
from gradcodec.bench.workloads import make_workload


def hetero_lora(seed: int = 0) -> dict[str, torch.Tensor]:
    """lora7b's shapes, each tensor scaled by exp(N(0, 1)), Student-t(3) entries."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in make_workload("lora7b", 0, seed=seed).items():
        scale = float(torch.exp(torch.randn((), generator=g)))
        chi2 = torch.distributions.Chi2(torch.tensor(3.0)).sample(t.shape)
        out[name] = t * scale / torch.sqrt(chi2 / 3)
    return out


def measure(spec: str, x) -> dict:
    blob = gradcodec.encode(x, spec, seed=0)
    d = metrics.distortion(x, gradcodec.decode(blob))
    n, nbytes = metrics.numel(x), metrics.nbytes(x)
    return {"spec": spec, "payload_bytes": len(blob), "bits_per_value": 8 * len(blob) / n,
            "ratio": nbytes / len(blob), "rel_l2": d["rel_l2"], "cosine": d["cosine"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=16 << 20)
    p.add_argument("--json")
    args = p.parse_args()
    started = time.time()
    widths = {"gaussian": make_workload("gaussian", args.size), "lora7b": make_workload("lora7b", 0)}
    rows = []
    for workload, x in widths.items():
        for spec in CODEC_SETS["widths"]:
            rows.append({"workload": workload, **measure(spec, x)})
            print(rows[-1], flush=True)

    budget_rows = []
    for workload, x in {"lora7b": widths["lora7b"], "lora7b-hetero": hetero_lora()}.items():
        for bits in range(1, 9):
            uniform = measure(f"int{bits}", x)
            codec = gradcodec.get_codec(f"budget:bytes={uniform['payload_bytes']}")
            blob = codec.encode(x)
            d = metrics.distortion(x, gradcodec.decode(blob))
            budget_rows.append({
                "workload": workload, "uniform": f"int{bits}", "bytes": uniform["payload_bytes"],
                "uniform_rel_l2": uniform["rel_l2"], "budget_bytes": len(blob), "budget_rel_l2": d["rel_l2"],
                "budget_cosine": d["cosine"], "widths": dict(sorted(collections.Counter(codec.last_spent.widths.values()).items())),
            })
            print(budget_rows[-1], flush=True)
    out = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} torch threads, 2-core CPU shared with other jobs",
           "seconds": time.time() - started, "widths": rows, "budget": budget_rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
