"""Every default bench codec on real LLaMA LoRA adapter shapes: ratio, encode/decode time as a multiple of
a copy of the same bytes, and peak extra memory of encode and of decode.

    python benchmarks/llama_scale_codecs.py --workloads lora7b,lora8b --repeats 5 \\
        --json docs/results/llama-scale-codecs.json

Timing is interleaved, for machines shared with other jobs: each repeat times, back to back, one copy
of the adapter (`clone` of every tensor: one read and one write of each byte), one encode and one
decode, so the three see the same load; the table's multiples are min(encode) / min(copy) over the
repeats (medians are kept in the JSON). Memory: `runner.peak_extra_bytes` (the process's resident-set
high-water mark after /proc/self/clear_refs and malloc_trim: pages touched, payload and output
included, not Python objects as tracemalloc would count). Ratio and distortion come from the last
decode. `--cgfed-shared` adds cgfed with the shared AE (`AEConfig.shared`, default bands, 1/64) built
with random weights: its sizes and times are those of a trained one, its cosine means nothing.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from gradcodec import api, metrics
from gradcodec.bench import report, runner, workloads


def _copy(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in x.items()}


def cgfed_shared_codec(x: dict[str, torch.Tensor], seed: int = 0):
    """cgfed with a shared AE of random weights for the adapter `x` (timing and sizes only)."""
    from gradcodec.learned.canvas import CanvasLayout
    from gradcodec.learned.model import AEConfig, build_decoder, build_encoder
    from gradcodec.learned.modelfile import LearnedModel

    cfg = AEConfig.shared(CanvasLayout.for_shapes({k: tuple(v.shape) for k, v in x.items()}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LearnedModel.trained(cfg, build_encoder(cfg), build_decoder(cfg))
    return api.get_codec("cgfed", model=model)


def measure_one(spec: str, codec, x: dict[str, torch.Tensor], workload: str, repeats: int) -> dict:
    """Interleaved copy / encode / decode timings, sizes, distortion and peak memory of one codec."""
    blob = codec.encode(x)  # warm-up
    x_hat = codec.decode(blob)
    del x_hat
    secs: dict[str, list[float]] = {"copy": [], "encode": [], "decode": []}
    for _ in range(repeats):
        for key, fn in (("copy", lambda: _copy(x)), ("encode", lambda: codec.encode(x)),
                        ("decode", lambda: codec.decode(blob))):
            start = time.perf_counter()
            out = fn()
            secs[key].append(time.perf_counter() - start)
            del out
    x_hat = codec.decode(blob)
    d = metrics.distortion(x, x_hat)
    del x_hat
    n, nbytes = metrics.numel(x), metrics.nbytes(x)
    enc_peak = runner.peak_extra_bytes(lambda: codec.encode(x), torch.device("cpu"))
    dec_peak = runner.peak_extra_bytes(lambda: codec.decode(blob), torch.device("cpu"))
    best = {k: min(v) for k, v in secs.items()}
    med = {k: sorted(v)[len(v) // 2] for k, v in secs.items()}
    return {
        "workload": workload, "spec": spec, "codec": codec.spec, "elements": n, "input_bytes": nbytes,
        "payload_bytes": len(blob), "ratio": nbytes / len(blob), "bits_per_element": 8 * len(blob) / n,
        "cosine": d["cosine"], "rel_l2": d["rel_l2"], "snr_db": d["snr_db"],
        "seconds": secs, "min_s": best, "median_s": med,
        "encode_x_copy": best["encode"] / best["copy"], "decode_x_copy": best["decode"] / best["copy"],
        "encode_x_copy_median": med["encode"] / med["copy"], "decode_x_copy_median": med["decode"] / med["copy"],
        "encode_peak_bytes": enc_peak, "decode_peak_bytes": dec_peak,
    }


def measure(workload: str, specs: list[str], repeats: int, seed: int, cgfed_shared: bool) -> list[dict]:
    x = workloads.make_workload(workload, 0, seed=seed)
    todo = [(spec, lambda spec=spec: api.get_codec(spec, seed=seed)) for spec in specs]
    if cgfed_shared:
        todo.append(("cgfed (shared AE, 1/64, random weights)", lambda: cgfed_shared_codec(x, seed)))
    rows = []
    for spec, make in todo:
        started = time.perf_counter()
        row = measure_one(spec, make(), x, workload, repeats)
        row["wall_s"] = time.perf_counter() - started
        rows.append(row)
        mib = 1 << 20
        print(f"{workload:7} {spec:40} ratio {row['ratio']:7.1f}  enc {row['encode_x_copy']:7.1f}x copy  "
              f"dec {row['decode_x_copy']:7.1f}x copy (copy {row['min_s']['copy'] * 1e3:.1f} ms)  "
              f"enc mem {row['encode_peak_bytes'] / mib:7.1f} MiB  dec mem {row['decode_peak_bytes'] / mib:7.1f} MiB  "
              f"cos {row['cosine']:.4f}  [{row['wall_s']:.0f} s]", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="lora7b,lora8b")
    p.add_argument("--codecs", default="default")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the table keeps the minimum")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--cgfed-shared", action="store_true", help="add cgfed with a random-weight shared AE")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = []
    for workload in args.workloads.split(","):
        rows += measure(workload.strip(), runner.expand_codecs(args.codecs), args.repeats, args.seed,
                        args.cgfed_shared)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    out = {"command": command, "machine": report.machine(), "threads": torch.get_num_threads(),
           "repeats": args.repeats, "wall_s": time.perf_counter() - t0, "rows": rows}
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json} in {out['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
