"""Byte stages on the same codes: none, zstd (levels 3 and 19) and ans, payload bytes and stage speed.

    python benchmarks/entropy_compare.py --out docs/results/entropy.json

Workloads: (a) a LoRA-like update of 295 936 values (4 layers x 7 projections of the tiny preset,
hidden 128, intermediate 344, KV 64, rank 32, Gaussian factors) and (b) 16M Gaussian values. Every
stage of one spec sees the same sections (one seeded message, packed once per stage). "ans+sections"
is the ans stage given the section table (offset, bytes, item size, slot), which the wire does not
pass yet: its bytes are the ans payload with the stream swapped for the sectioned one.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import gradcodec
from gradcodec import wire
from gradcodec.codec import as_named
from gradcodec.codecs.entropy import Ans
from gradcodec.codecs.lossless import Zstd

SPECS = ["int8", "int4", "sign", "topk:ratio=0.01|int8", "topk:ratio=0.01|int4", "powersgd:rank=1|int8", "latent-int8"]


def lora_update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden, inter, kv, r = 128, 344, 64, 32
    shapes = {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden),
              "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}
    out = {}
    for layer in range(4):
        for proj, (fan_in, fan_out) in shapes.items():
            out[f"layers.{layer}.{proj}.lora_A"] = torch.randn(r, fan_in, generator=g) * 0.01
            out[f"layers.{layer}.{proj}.lora_B"] = torch.randn(fan_out, r, generator=g) * 0.001
    return out


def latents(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A cgfed-like latent: int8 codes of tanh-squashed Gaussian values, 1/64 of the update's size."""
    g = torch.Generator().manual_seed(seed)
    return {"latent": torch.round(127 * torch.tanh(torch.randn(max(1, n // 64), generator=g))).to(torch.int8)}


def sections_of(msg: wire.Message) -> tuple[list[tuple[int, int, int, int]], list[memoryview], int]:
    """(offset, nbytes, itemsize, slot) of every section, as the proposed wire change would pass them."""
    infos, slots, tensors = [], [], []
    for entry in msg.tensors:
        for slot, t in enumerate(entry.sections):
            infos.append(wire.SectionInfo(t.dtype, t.numel()))
            slots.append(slot)
            tensors.append(t)
    for i, t in enumerate(msg.shared):
        infos.append(wire.SectionInfo(t.dtype, t.numel()))
        slots.append(1000 + i)
        tensors.append(t)
    offsets, total = wire.section_layout(infos)
    region = bytearray(total)
    for off, t in zip(offsets, tensors):
        region[off : off + t.numel() * t.element_size()] = t.contiguous().view(torch.uint8).numpy().tobytes()
    table = [(off, info.nbytes, t.element_size(), slot) for off, info, t, slot in zip(offsets, infos, tensors, slots)]
    return table, [memoryview(region)], total


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(name: str, x: dict[str, torch.Tensor], repeats: int) -> list[dict]:
    rows = []
    for spec in SPECS:
        data, base = (latents(sum(t.numel() for t in x.values())), "raw") if spec == "latent-int8" else (x, spec)
        codec = gradcodec.get_codec(base, seed=0)
        named, single = as_named(data)
        msg = codec.encode_named(named, None)
        msg.single = single
        table, region, total = sections_of(msg)
        plain = wire.pack(msg)
        row = {"workload": name, "spec": spec, "raw_region": total, "none": len(plain)}
        reference = gradcodec.decode(plain)
        for label, stage in [("zstd3", Zstd(3)), ("zstd19", Zstd(19)), ("ans", Ans())]:
            msg.codec = f"{base}|{stage.name}" + (f":level={stage.level}" if label == "zstd19" else "")
            blob = wire.pack(msg, compress=stage.compress)
            decoded = gradcodec.decode(blob)
            assert all(torch.equal(reference[k], decoded[k]) for k in reference), (spec, label)
            stream = b"".join(stage.compress(region, total))
            assert stage.decompress(stream, total) == bytes(region[0])
            row[label] = len(blob)
            row[f"{label}_enc_MBps"] = total / 1e6 / best_time(lambda: stage.compress(region, total), repeats)
            row[f"{label}_dec_MBps"] = total / 1e6 / best_time(lambda: stage.decompress(stream, total), repeats)
            if label == "ans":
                sectioned = b"".join(stage.compress(region, total, table))
                assert stage.decompress(sectioned, total, table) == bytes(region[0])
                row["ans+sections"] = len(blob) - len(stream) + len(sectioned)
                row["ans+sections_enc_MBps"] = total / 1e6 / best_time(lambda: stage.compress(region, total, table), repeats)
                row["ans+sections_dec_MBps"] = total / 1e6 / best_time(lambda: stage.decompress(sectioned, total, table), repeats)
        msg.codec = base
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/entropy.json")
    parser.add_argument("--big", type=int, default=1 << 24, help="values of the Gaussian workload")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = measure("lora-296k", lora_update(), args.repeats)
    g = torch.Generator().manual_seed(0)
    rows += measure(f"gauss-{args.big}", {"g": torch.randn(args.big, generator=g)}, max(1, args.repeats - 2))
    with open(args.out, "w") as f:
        json.dump({"command": f"python benchmarks/entropy_compare.py --out {args.out} --big {args.big} --repeats {args.repeats}",
                   "machine": "2-core CPU, shared with other jobs (timings noisy: best of repeats)", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
