"""Is a federation chaotic? Two runs of the same FedAvg recipe, one with raw uploads and one whose uploads
go through a near-lossless codec (fp16 with error feedback: ~2e-4 of an update), and the distance
between their global adapters after every round (docs/results.md, "Rate, proven").

A codec comparison can only resolve differences larger than what such a tiny perturbation grows into:
where the distance stays at the codec's own error the federation is stable and paired seeds measure a
codec's cost; where it grows to order 1 the two runs end as different models and "within 1 %" needs
many seeds (or cannot be shown at all).

    python benchmarks/fed_divergence.py --lr 3e-3 6e-4 3e-4 --rounds 20 --schedule-rounds 60 --json OUT

Each setting is the docs/results/rate-proof.toml federation (tiny preset, LoRA r32 on all seven
projections, 4 clients all sampled, 5 local steps of batch 16, cosine lr over `--schedule-rounds`),
run in-process (capture.run_federated, which the Flower app matches). Per round it records the relative
distance ||g_raw - g_codec|| / ||g_raw - g_0|| and both adapters' held-out loss.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch

import gradcodec
from gradcodec.feedback import ErrorFeedback
from gradcodec.integrations import peft
from gradcodec.integrations.fedlora.capture import CaptureConfig, _model_and_tokenizer, run_federated
from gradcodec.integrations.fedlora.config import OPTIMIZERS

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum((a[k].double() - b[k].double()).square().sum().item() for k in a))


def trajectory(config: CaptureConfig, codec: str | None, rounds: int) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """The global adapter after each of the first `rounds` rounds of `config` (index 0: the initial
    one) and its held-out loss after each round, uploads through `codec` with error feedback (None: raw)."""
    feedback: dict[int, ErrorFeedback] = {}

    def transmit(client: int, _round: int, update):
        ef = feedback.setdefault(client, ErrorFeedback(gradcodec.get_codec(codec)))
        return ef.decode(ef.encode(update))

    states: list[dict[str, torch.Tensor]] = []

    def on_round(server_round: int, state) -> bool:
        states.append({k: v.clone() for k, v in state.items()})
        return server_round >= rounds

    model, _ = _model_and_tokenizer(config)
    states.append({k: v.clone() for k, v in peft.lora_state(model).items()})
    capture = run_federated(config, transmit=transmit if codec else None, on_round=on_round)
    return states, [h["eval_loss"] for h in capture["history"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-3, 3e-4])
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    ap.add_argument("--rounds", type=int, default=15, help="rounds run")
    ap.add_argument("--schedule-rounds", type=int, default=60, help="the cosine schedule's length (the recipe's rounds)")
    ap.add_argument("--codec", default="fp16", help="the perturbing codec (with error feedback)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-examples", type=int, default=200, help="held-out examples, evaluated after every round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args(argv)
    if not 1 <= args.rounds <= args.schedule_rounds:
        ap.error("need 1 <= --rounds <= --schedule-rounds")
    torch.set_num_threads(args.threads)
    settings = []
    for lr in args.lr:
        base = CaptureConfig(rank=32, lora_alpha=64, targets=TARGETS, num_clients=4, clients_per_round=4,
                             rounds=args.schedule_rounds, local_steps=5, lr=lr, lr_schedule="cosine",
                             optimizer=args.optimizer, examples=4000, eval_examples=args.eval_examples,
                             seed=args.seed, lora_seed=args.seed,
                             keep_states=False)
        t0 = time.perf_counter()
        runs = {name: trajectory(base, codec, args.rounds) for name, codec in (("raw", None), (args.codec, args.codec))}
        (raw, raw_loss), (other, other_loss) = runs["raw"], runs[args.codec]
        rel = [distance(r, o) / max(distance(r, raw[0]), 1e-30) for r, o in zip(raw[1:], other[1:])]
        row = {"optimizer": args.optimizer, "lr": lr, "rounds": args.rounds, "schedule_rounds": args.schedule_rounds,
               "codec": args.codec, "seed": args.seed, "eval_examples": args.eval_examples, "relative_distance": rel,
               "held_out_loss": {"raw": raw_loss, args.codec: other_loss}, "wall_s": round(time.perf_counter() - t0, 1)}
        settings.append(row)
        shown = sorted({1, *range(5, args.rounds + 1, 5), args.rounds})
        print(f"{args.optimizer} lr {lr:g}, rounds {shown}: distance " + " ".join(f"{rel[i - 1]:.1e}" for i in shown)
              + f"; held-out loss raw {raw_loss[-1]:.4f}, {args.codec} {other_loss[-1]:.4f}"
              + f" ({(other_loss[-1] / raw_loss[-1] - 1) * 100:+.3f} %)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/fed_divergence.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       "machine": f"{platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}",
                       "settings": settings}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
