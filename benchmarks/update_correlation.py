"""Can an upload be predicted from what both ends already hold? Cosines between a client's round update
and (a) its own previous update, (b) the previous round's global update, (c) another client's update of
the same round, on the docs/results/rate-stable.toml federation (docs/results.md, "Rate, proven").

A codec that sends update − prediction (with the prediction rebuilt on the server) saves energy only in
proportion to cos²: at a cosine of 0.3 the difference still carries 91 % of the update's energy.

    python benchmarks/update_correlation.py --lr 6e-4 --rounds 12 --json OUT
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from gradcodec.integrations.fedlora.capture import CaptureConfig, run_federated

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b / (a.norm() * b.norm()).clamp_min(1e-300)).item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--rounds", type=int, default=12, help="rounds run (of the 60-round cosine schedule)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    clients = 4
    config = CaptureConfig(rank=32, lora_alpha=64, targets=TARGETS, num_clients=clients, clients_per_round=clients,
                           rounds=60, local_steps=5, lr=args.lr, lr_schedule="cosine", examples=4000, seed=args.seed,
                           lora_seed=args.seed, keep_states=False)
    capture = run_federated(config, on_round=lambda rnd, _state: rnd >= args.rounds)
    flat = {(r["round"], r["client"]): torch.cat([v.reshape(-1).double() for v in r["update"].values()])
            for r in capture["records"]}
    rows = []
    for t in range(1, args.rounds):
        previous_global = sum(flat[(t - 1, c)] for c in range(clients)) / clients
        row = {"round": t + 1,
               "own_previous": sum(_cos(flat[(t, c)], flat[(t - 1, c)]) for c in range(clients)) / clients,
               "global_previous": sum(_cos(flat[(t, c)], previous_global) for c in range(clients)) / clients,
               "other_client": sum(_cos(flat[(t, c)], flat[(t, (c + 1) % clients)]) for c in range(clients)) / clients}
        rows.append(row)
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/update_correlation.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
