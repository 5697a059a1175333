"""How predictable are the bits of EF-sign from what the server already holds? (docs/results.md, "Rate, proven")

A codec could send sign(update + residual) XOR sign(previous global update), entropy-coded, and pay
H(p) bits per value instead of 1, p being how often the two signs agree. This runs the in-process FedAvg
loop (tiny preset, LoRA r32 on all seven projections, 4 clients, 5 AdamW steps, 24 rounds) with EF-sign
on the uplink and prints, per round, the agreement with the previous global update and with the
client's own previous input.  python benchmarks/ef_sign_predictability.py  (writes the JSON it prints)
"""
import json
import math

import torch

import gradcodec
from gradcodec.integrations.fedlora.capture import CaptureConfig, run_federated

ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
cfg = CaptureConfig(rank=32, lora_alpha=64, targets=ALL_SEVEN, num_clients=4, clients_per_round=4, rounds=24,
                    local_steps=5, lr=3e-3, examples=4000, keep_states=False)
codec = gradcodec.get_codec("sign")
residuals: dict[int, dict[str, torch.Tensor]] = {}
sent: dict[int, list[torch.Tensor]] = {}  # round -> what each client's payload decodes to, flattened
own: dict[int, torch.Tensor] = {}  # client -> its last encoder input, flattened
stats = []


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten() for v in d.values()])


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a >= 0) == (b >= 0)).float().mean().item()


def transmit(client: int, rnd: int, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    r = residuals.setdefault(client, {k: torch.zeros_like(v) for k, v in update.items()})
    e = {k: update[k] + r[k] for k in update}
    q = codec.decode(codec.encode(e))
    for k in e:
        r[k] = e[k] - q[k]
    row = {"round": rnd, "client": client}
    if rnd - 1 in sent:  # the previous global update (unweighted mean of the previous round's payloads)
        row["agree_prev_global"] = agreement(flat(e), sum(sent[rnd - 1]) / len(sent[rnd - 1]))
    if client in own:
        row["agree_prev_own"] = agreement(flat(e), own[client])
    own[client] = flat(e)
    sent.setdefault(rnd, []).append(flat(q))
    stats.append(row)
    return q


def entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


run_federated(cfg, transmit)
for rnd in range(1, cfg.rounds):
    rows = [s for s in stats if s["round"] == rnd]
    g = sum(s["agree_prev_global"] for s in rows) / len(rows)
    o = sum(s["agree_prev_own"] for s in rows) / len(rows)
    print(f"round {rnd + 1}: agrees with the previous global update {g:.3f} (H = {entropy(g):.2f} bits), "
          f"with its own previous input {o:.3f} (H = {entropy(o):.2f} bits)")
with open("docs/results/rate-screens/ef-sign-agreement.json", "w") as f:
    json.dump(stats, f)
