"""Every default bench codec on real LLaMA LoRA adapter shapes: ratio, encode/decode time as a multiple of
a copy of the same bytes, and peak extra memory of encode and of decode.

    python benchmarks/llama_scale_codecs.py --workloads lora7b,lora8b --repeats 3 \\
        --json docs/results/llama-scale-codecs.json

Rows come from `gradcodec.bench.runner.bench_codec` (the same measurement as `gradcodec bench`); this
script adds the decode peak, measured like the encode one (`runner.peak_extra_bytes`: the process's
resident-set high-water mark after /proc/self/clear_refs, so it counts pages touched, not Python
objects as tracemalloc would).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from gradcodec import api
from gradcodec.bench import report, runner, workloads


def measure(workload: str, specs: list[str], repeats: int, seed: int) -> list[dict]:
    x = workloads.make_workload(workload, 0, seed=seed)
    copy = runner.copy_timing(x, repeats)
    rows = []
    for spec in specs:
        row = runner.bench_codec(spec, x, workload, repeats, copy, seed=seed)
        blob = api.get_codec(spec, seed=seed).encode(x)
        decode_peak = runner.peak_extra_bytes(lambda: api.get_codec(spec, seed=seed).decode(blob), torch.device("cpu"))
        d = row.as_json()
        d["decode_peak_bytes"] = decode_peak
        d["encode_x_copy"] = row.encode.median / copy.median
        d["decode_x_copy"] = row.decode.median / copy.median
        rows.append(d)
        print(f"{workload:7} {spec:28} ratio {row.ratio:7.1f}  enc {d['encode_x_copy']:8.1f}x copy  "
              f"dec {d['decode_x_copy']:8.1f}x copy  enc mem {row.encode_peak_bytes / row.input_bytes:5.2f}x  "
              f"dec mem {decode_peak / row.input_bytes:5.2f}x  cos {row.cosine:.4f}", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="lora7b,lora8b")
    p.add_argument("--codecs", default="default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    t0 = time.perf_counter()
    rows = []
    for workload in args.workloads.split(","):
        rows += measure(workload.strip(), runner.expand_codecs(args.codecs), args.repeats, args.seed)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    out = {"command": command, "machine": report.machine(), "wall_s": time.perf_counter() - t0, "rows": rows}
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json} in {out['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
