"""TGAP memory of the shared AE: fit it from a capture streamed (CaptureSnapshots, memory-mapped) or with
every record loaded, polling the process's peak memory. docs/results/cgfed-scale.md.

    python benchmarks/cgfed_scale_memory.py make llama-2-7b:layers=8 24 runs/syn.pt   # synthetic capture
    python benchmarks/cgfed_scale_memory.py stream runs/syn.pt
    python benchmarks/cgfed_scale_memory.py load runs/syn.pt
"""
import json
import os
import sys
import threading
import time

import torch

torch.set_num_threads(1)


def make(preset: str, n: int, path: str) -> None:
    from gradcodec.capture import FORMAT, save_capture
    from gradcodec.integrations.fedlora.presets import lora_shapes

    shapes = lora_shapes(preset, 8)
    g = torch.Generator().manual_seed(0)
    recs = [{"round": i // 4, "client": i % 4, "num_examples": 1, "loss": 0.0,
             "update": {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}} for i in range(n)]
    save_capture({"format": FORMAT, "config": {"synthetic": preset}, "records": recs, "history": []}, path)


if sys.argv[1] == "make":
    make(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    sys.exit()
mode, path = sys.argv[1], sys.argv[2]
peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
def poll():
    while True:
        for line in open("/proc/self/status"):
            k = line.split(":")[0]
            if k in peak:
                peak[k] = max(peak[k], int(line.split()[1]))
        time.sleep(0.02)
threading.Thread(target=poll, daemon=True).start()
from gradcodec.learned.canvas import CanvasLayout
from gradcodec.learned.model import AEConfig
from gradcodec.learned.tgap import CaptureSnapshots, fit_shared
from gradcodec.capture import load_capture
time.sleep(0.1); base = dict(peak)
t = time.perf_counter()
if mode == "stream":
    snaps = CaptureSnapshots([path])
    first = next(iter(snaps))
else:
    snaps = [dict(r["update"]) for r in load_capture(path)["records"]]
    first = snaps[0]
cfg = AEConfig.shared(CanvasLayout.of(first), 1 / 64, block_rows=16)
del first
model = fit_shared(snaps, cfg)
time.sleep(0.1)
print(json.dumps({"mode": mode, "capture_bytes": os.path.getsize(path), "seconds": round(time.perf_counter() - t, 1),
                  "baseline_kB": base, "peak_kB": peak}))
