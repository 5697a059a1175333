"""Round-update snapshots of a federated LoRA fine-tuning: the training data of the learned codec (TGAP).

`run_federated` is a small in-process FedAvg loop over the fedlora base: each round it samples clients,
each client fine-tunes the global adapter on its own (Dirichlet non-IID) data with `train.local_train`,
and the server averages the clients' adapters with `peft.fedavg`. Every client upload is recorded: its
round *update* (the delta from the global adapter it started from, what a codec should encode) and its
local LoRA *state* (what the CG-FedLLM paper fed its AutoEncoder). `transmit`, if given, sits on the
uplink, so the same loop runs federated fine-tuning with a codec in the loop (gradcodec.learned.faf).

The capture file format (`save_capture` / `load_capture`) is documented in gradcodec/capture.py.

Tensor names are `peft.lora_state`'s (`model.layers.0.self_attn.q_proj.lora_A.weight`, ...); records
are in upload order (round, then client). `history` is empty unless `eval_examples` > 0.

The tiny preset on CPU: `gradcodec capture --rounds 30 --out runs/capture.pt` (minutes). A local
checkpoint on a GPU: `--model /path/to/llama --device cuda --dtype bfloat16 --data alpaca.json`.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable

import torch

from gradcodec.capture import FORMAT

Named = dict[str, torch.Tensor]
# transmit(client, round, update) -> the update as the server receives it
Transmit = Callable[[int, int, Named], Named]


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
    """One federated LoRA fine-tuning run.

    model: a preset name (`tiny` uses the cached pre-trained base unless `pretrained` is False) or a
    local checkpoint directory. data: None for the generated task suite (`examples` of them, drawn with
    `data_seed`), or an Alpaca/Dolly JSON/JSONL file. `lora_seed` is the global adapter's initialisation,
    which the server fixes once: a TGAP capture and the federated run its AE then serves share it.
    `seed` drives client sampling and local batches, `data_seed` the data and its non-IID split, so two
    captures with different data seeds see disjoint clients (the held-out trajectory of
    docs/results.md).
    """

    model: str = "tiny"
    pretrained: bool = True
    data: str | None = None
    examples: int = 4000
    eval_examples: int = 0
    rank: int = 8
    lora_alpha: float = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    num_clients: int = 20
    clients_per_round: int = 4
    rounds: int = 30
    local_steps: int = 10
    lr: float = 1e-3
    lr_schedule: str = "constant"
    batch_size: int = 16
    optimizer: str = "adamw"
    max_length: int = 128
    dirichlet_alpha: float = 0.5
    lora_seed: int = 0
    seed: int = 0
    data_seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    keep_states: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(f"clients_per_round must be in [1, num_clients={self.num_clients}], got {self.clients_per_round}")
        if self.rounds < 1 or self.local_steps < 1:
            raise ValueError(f"need rounds >= 1 and local_steps >= 1, got {self.rounds} and {self.local_steps}")
        from .config import LR_SCHEDULES

        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


def _model_and_tokenizer(config: CaptureConfig):
    from . import model as fl_model

    dtype = getattr(torch, config.dtype)
    if fl_model.is_preset(config.model) and config.pretrained:
        base = fl_model.pretrained_base(config.model).to(dtype)
    else:
        base = fl_model.build_model(config.model, dtype=dtype, gradient_checkpointing=config.device != "cpu")
    lora = fl_model.attach_lora(base, rank=config.rank, alpha=config.lora_alpha, targets=config.targets,
                                seed=config.lora_seed)
    return lora.to(config.device), fl_model.load_tokenizer(config.model)


def _client_data(config: CaptureConfig, tokenizer):
    from .dataset import dirichlet_split, generate_examples, load_instructions, tokenize_example

    if config.data is None:
        examples = generate_examples(config.examples + config.eval_examples, config.data_seed)
    else:
        examples = load_instructions(config.data)
        random.Random(config.data_seed).shuffle(examples)
    held_out, train = examples[: config.eval_examples], examples[config.eval_examples:]
    clients = dirichlet_split(train, config.num_clients, config.dirichlet_alpha, config.data_seed)
    features = [[tokenize_example(e, tokenizer, config.max_length) for e in part] for part in clients]
    return features, held_out


def run_federated(config: CaptureConfig = CaptureConfig(), transmit: Transmit | None = None,
                  progress: bool = False, on_round: Callable[[int, Named], bool | None] | None = None) -> dict:
    """Run the FedAvg loop of `config` and return the capture (the dict `save_capture` writes).
    `on_round(server_round, global_state)`, if given, sees the global adapter after each round's
    aggregation and stops the run there by returning True (the learning rates stay those of
    config.rounds; benchmarks/fed_divergence.py follows the start of two runs' trajectories with it)."""
    from .. import peft
    from .config import round_lr
    from .train import evaluate, local_train

    model, tokenizer = _model_and_tokenizer(config)
    clients, held_out = _client_data(config, tokenizer)
    global_state = peft.lora_state(model)
    records, history = [], []
    for rnd in range(config.rounds):
        # the Flower app's conventions (app.LoraFedAvg.sample, app.client_train), so that this loop and the
        # app give the same run for the same settings (tests/test_fedlora_app.py checks it)
        server_round = rnd + 1
        sampler = random.Random(config.seed * 1_000_003 + server_round)
        chosen = sorted(sampler.sample(range(config.num_clients), config.clients_per_round))
        states, weights = [], []
        for client in chosen:
            peft.load_lora_state(model, global_state)
            stats = local_train(model, clients[client], tokenizer, steps=config.local_steps,
                                lr=round_lr(config.lr, config.lr_schedule, server_round, config.rounds),
                                batch_size=config.batch_size, seed=config.seed * 1_000_003 + server_round * 1009 + client,
                                max_length=config.max_length, optimizer=config.optimizer)
            state = peft.lora_state(model)
            update = peft.lora_delta(state, global_state)
            received = transmit(client, rnd, update) if transmit is not None else update
            states.append(peft.apply_delta(global_state, received))
            weights.append(stats["num_examples"])
            records.append({"round": rnd, "client": client, "num_examples": stats["num_examples"],
                            "loss": stats["loss"], "update": update, "state": state if config.keep_states else {}})
        global_state = peft.fedavg(states, weights)
        stop = on_round is not None and on_round(server_round, global_state)
        if held_out:
            peft.load_lora_state(model, global_state)
            result = evaluate(model, held_out, tokenizer, max_length=config.max_length)
            history.append({"round": rnd, "eval_loss": result["loss"], "eval_accuracy": result["accuracy"]})
        if progress:
            losses = [r["loss"] for r in records[-len(chosen):]]
            extra = f", eval loss {history[-1]['eval_loss']:.3f} acc {history[-1]['eval_accuracy']:.3f}" if held_out else ""
            print(f"round {rnd + 1}/{config.rounds}: clients {chosen}, local loss {sum(losses) / len(losses):.3f}{extra}",
                  flush=True)
        if stop:
            break
    return {"format": FORMAT, "config": dataclasses.asdict(config), "records": records, "history": history}
