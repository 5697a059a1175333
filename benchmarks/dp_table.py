"""Codecs under client-level DP on the reference app: final eval loss and accuracy at noise 0, 0.5, 1.0.

    python benchmarks/dp_table.py [--out docs/results/dp.json] [--runs runs/dp] [--noises 0,0.5,1.0]

1. The clip is chosen without looking at the evaluated run: the median L2 norm of the round updates
   of an 8-round TGAP pilot (the same recipe on other data, clients and sampling; `tgap_pilot`).
2. For each noise multiplier, `gradcodec fedtrain --compare` runs `dp:clip=C,noise=N|<codec>` for
   raw, int8, int4, sign, top-k 1 % and cgfed (the AE that `fedtrain` would train by TGAP, passed by
   path), error feedback on for the lossy ones, default `tiny` settings, one seed.
3. Each row gets ε at δ = 1e-5 from gradcodec.privacy: against an observer of the aggregate
   (sample rate = fraction, T = rounds) and against the server seeing one client's uploads
   (noise / 2, no sampling, T = rounds, the worst case of a client sampled every round).

cgfed rows need a registry that accepts `dp|cgfed` (a dp stage in front of a whole-update codec);
without it they are skipped with a note.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import gradcodec
from gradcodec import privacy
from gradcodec.errors import GradcodecError
from gradcodec.integrations.fedlora.capture import run_federated
from gradcodec.integrations.fedlora.config import FedTrainConfig
from gradcodec.integrations.fedlora.run import tgap_pilot, train_learned_codec

CODECS = ["raw", "int8", "int4", "sign", "topk:ratio=0.01|fp16", "cgfed"]
DELTA = 1e-5


def pilot_update_norms(cfg: FedTrainConfig) -> list[float]:
    """L2 norms of the whole round updates of a pilot federation as long as the evaluated run."""
    pilot = dataclasses.replace(tgap_pilot(cfg), rounds=cfg.rounds)
    records = run_federated(pilot, progress=False)["records"]
    return [float(torch.sqrt(sum((t.double() ** 2).sum() for t in r["update"].values()))) for r in records]


def dp_cgfed_supported() -> bool:
    try:
        gradcodec.get_codec("dp:clip=1,noise=0|cgfed")
        return True
    except GradcodecError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results/dp.json")
    ap.add_argument("--runs", default="runs/dp")
    ap.add_argument("--noises", default="0,0.5,1.0")
    args = ap.parse_args()
    cfg = FedTrainConfig()
    norms = pilot_update_norms(cfg)
    clip = float(f"{statistics.median(norms):.2g}")
    print(f"pilot update norms: min {min(norms):.3g} median {statistics.median(norms):.3g} max {max(norms):.3g}; clip {clip}", flush=True)

    codecs = list(CODECS)
    notes = []
    if dp_cgfed_supported():
        codecs[codecs.index("cgfed")] = train_learned_codec("cgfed", cfg)  # cgfed:model=<cached TGAP AE>
    else:
        codecs.remove("cgfed")
        notes.append("cgfed skipped: this gradcodec refuses dp|cgfed (registry)")
    rows = []
    for noise in (float(n) for n in args.noises.split(",")):
        out_dir = Path(args.runs) / f"noise-{noise}"
        specs = ";".join(f"dp:clip={clip},noise={noise}|{c}" for c in codecs)
        subprocess.run(["gradcodec", "fedtrain", "--compare", specs, "--out-dir", str(out_dir), "--no-progress"], check=True)
        summary = json.loads((out_dir / "summary.json").read_text())
        eps_agg = privacy.epsilon(noise, cfg.fraction, cfg.rounds, DELTA)
        eps_upload = privacy.epsilon(noise / 2, 1.0, cfg.rounds, DELTA)
        for row in summary["rows"]:
            rows.append({"noise": noise, "clip": clip, "codec": row["codec"].split("|", 1)[1].split(":model=")[0],
                         "spec": row["codec"], "eval_loss": row["eval_loss"], "eval_accuracy": row["eval_accuracy"],
                         "compression": row["compression"], "uncompressed_replies": row["uncompressed_replies"],
                         "failed_replies": row["failed_replies"], "epsilon_aggregate": eps_agg,
                         "epsilon_upload": eps_upload})
        print(json.dumps(rows[-len(summary["rows"]):], indent=1), flush=True)
    result = {"command": "python " + " ".join(sys.argv), "delta": DELTA, "clip": clip, "pilot_update_norms": norms,
              "config": dataclasses.asdict(cfg), "notes": notes, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
