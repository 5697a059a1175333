"""The reference federated LoRA fine-tuning app: a Flower 1.42 ServerApp and ClientApp (Message API).

    server (ServerApp)                                           clients (ClientApp, one per data partition)
    ───────────────────────────────────────────────────────────  ───────────────────────────────────────────
    query every node for its partition-id (once)            ──▶  load model + partition (node config)
    for each codec spec in config.codecs:
      CompressedStrategy(LoraFedAvg, uplink_codec=spec)
      round r: sample partitions (seeded), send the global  ──▶  gradcodec_mod decodes, the app trains
               adapter                                            `local_steps` AdamW steps on its data and
                                                            ◀──  replies its adapter; the mod uploads the
                                                                  compressed update (error feedback)
               FedAvg of A and B separately, weighted by
               examples (peft.fedavg); evaluate the global
               adapter on the held-out set; write the round
               record (report.py)
    table, summary.json, compare.png

The app itself is codec-agnostic: compression is `gradcodec_mod` (first in the ClientApp's mods) and
`CompressedStrategy` around the strategy, as integrations/flower.py promises. Every codec of a
comparison runs in the same Flower run (one Ray session in simulation) from the same initial adapter,
on the same partitions, sampled the same way, with the same local batches.

Configuration (`config.FedTrainConfig`): `make_server_app(config)` / `make_client_app(config)` fix it
(simulation, tests); the module-level `server_app` and `client_app`, which the deployment engine loads
through pyproject.toml, read it from the run config. A ClientApp learns its partition from the node
config (`partition-id`, `num-partitions`: set by the simulation engine, or `flower-supernode
--node-config "partition-id=0 num-partitions=2"`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import random
import re
import threading
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from tqdm.auto import tqdm

from .. import peft
from ..flower import CompressedStrategy, RoundStats, gradcodec_mod
from .config import FedTrainConfig, learned_codec_needs_model
from .report import FedTrainResult, RecordWriter, summarize, write_summary

__all__ = ["LoraFedAvg", "load_model", "split_data", "client_features", "serve", "make_server_app",
           "make_client_app", "server_app", "client_app"]

_lock = threading.Lock()
_models: dict[tuple, tuple] = {}  # one entry: (model with adapter, tokenizer, initial adapter state)


# ====================================================================== shared by server and clients


def load_model(cfg: FedTrainConfig) -> tuple[torch.nn.Module, Any, dict[str, torch.Tensor]]:
    """The model with its LoRA adapter, the tokenizer and the initial adapter state (cached per process).

    The initial adapter depends only on the config (`lora_seed`), so the server and every client build
    the same one. Only the last model stays cached: a process holds one (possibly 7B) base at a time.
    """
    from . import model as fl_model

    key = (cfg.model, cfg.pretrained, cfg.dtype, cfg.device, cfg.gradient_checkpointing, cfg.lora_rank,
           cfg.lora_alpha, cfg.targets, cfg.lora_seed)
    with _lock:
        if key not in _models:
            _models.clear()
            dtype = getattr(torch, cfg.dtype)
            if fl_model.is_preset(cfg.model) and cfg.pretrained:
                base = fl_model.pretrained_base(cfg.model, progress=cfg.progress).to(dtype)
                if cfg.gradient_checkpointing:
                    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base = fl_model.build_model(cfg.model, dtype=dtype, gradient_checkpointing=cfg.gradient_checkpointing)
            model = fl_model.attach_lora(base, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.targets,
                                         seed=cfg.lora_seed).to(cfg.device)
            _models[key] = (model, fl_model.load_tokenizer(cfg.model), peft.lora_state(model))
        return _models[key]


@functools.lru_cache(maxsize=2)
def split_data(cfg: FedTrainConfig) -> tuple[list[dict], list[dict]]:
    """(held-out examples the server evaluates on, training examples the clients split)."""
    from .dataset import generate_examples, load_instructions

    if cfg.data:
        examples = load_instructions(cfg.data)
        random.Random(cfg.data_seed).shuffle(examples)
        if len(examples) <= cfg.eval_examples:
            raise ValueError(f"{cfg.data} has {len(examples)} examples; need more than eval_examples={cfg.eval_examples}")
    else:
        examples = generate_examples(cfg.train_examples + cfg.eval_examples, cfg.data_seed)
    return examples[: cfg.eval_examples], examples[cfg.eval_examples:]


@functools.lru_cache(maxsize=64)
def client_features(cfg: FedTrainConfig, partition: int, num_partitions: int) -> list[dict[str, list[int]]]:
    """The tokenised training examples of one partition of the non-IID (Dirichlet) split."""
    from .dataset import dirichlet_split, tokenize_example

    _, train = split_data(cfg)
    part = dirichlet_split(train, num_partitions, cfg.dirichlet_alpha, cfg.data_seed)[partition]
    tokenizer = load_model(cfg)[1]
    return [tokenize_example(e, tokenizer, cfg.max_length) for e in part]


def _to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in state.items()})


def _to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


# ====================================================================== client


def _config_of(fixed: FedTrainConfig | None, context: Context) -> FedTrainConfig:
    return fixed if fixed is not None else FedTrainConfig.from_run_config(context.run_config)


def _partition(context: Context, cfg: FedTrainConfig) -> tuple[int, int]:
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("this SuperNode has no partition-id in its node config; start it with "
                         f"--node-config \"partition-id=<0..{cfg.num_clients - 1}> num-partitions={cfg.num_clients}\"")
    partition, count = int(node["partition-id"]), int(node.get("num-partitions", cfg.num_clients))
    if not 0 <= partition < count:
        raise ValueError(f"partition-id {partition} is outside 0..{count - 1} (num-partitions={count})")
    return partition, count


def client_query(msg: Message, context: Context, cfg: FedTrainConfig) -> Message:
    """Say which partition this node holds and how many examples it has (loading model and data early)."""
    partition, count = _partition(context, cfg)
    examples = len(client_features(cfg, partition, count))
    info = ConfigRecord({"partition-id": partition, "num-partitions": count, "num-examples": examples})
    return Message(RecordDict({"partition": info}), reply_to=msg)


def client_train(msg: Message, context: Context, cfg: FedTrainConfig) -> Message:
    """One round of local LoRA training from the received global adapter; replies the local adapter."""
    from .train import local_train

    server_round = int(msg.content["config"]["server-round"])
    partition, count = _partition(context, cfg)
    if partition == cfg.fail_partition and server_round == cfg.fail_round:
        raise RuntimeError(f"injected failure of partition {partition} in round {server_round} (fail_partition)")
    model, tokenizer, _ = load_model(cfg)
    features = client_features(cfg, partition, count)
    peft.load_lora_state(model, _to_state(msg.content["arrays"]))
    length = {"epochs": cfg.local_epochs} if cfg.local_epochs > 0 else {"steps": cfg.local_steps}
    t0 = time.perf_counter()
    stats = local_train(model, features, tokenizer, **length, lr=cfg.lr_at(server_round), batch_size=cfg.batch_size,
                        seed=cfg.seed * 1_000_003 + server_round * 1009 + partition, max_length=cfg.max_length,
                        progress=cfg.progress, optimizer=cfg.optimizer)
    metrics = MetricRecord({"num-examples": stats["num_examples"], "train-loss": stats["loss"],
                            "partition-id": partition, "train-s": time.perf_counter() - t0})
    return Message(RecordDict({"arrays": _to_record(peft.lora_state(model)), "metrics": metrics}), reply_to=msg)


@functools.lru_cache(maxsize=8)
def _gradcodec_mod(codecs: tuple[str, ...], error_feedback: bool, seed: int, residual_decay: float):
    """The server names the uplink codec of each round (a learned one by its model's fingerprint, so the
    client holds the models of every learned codec of the run); the client's own default is the first."""
    import gradcodec

    models = [m for m in (gradcodec.get_codec(spec).model for spec in codecs[1:]) if m is not None]
    return gradcodec_mod(codecs[0], error_feedback=error_feedback, seed=seed, models=models, residual_decay=residual_decay)


def _compression_mod(fixed: FedTrainConfig | None):
    """`gradcodec_mod` with the run's settings; the run config is only known when a message arrives."""

    def mod(msg: Message, context: Context, call_next):
        cfg = _config_of(fixed, context)
        codecs = cfg.codecs + ((cfg.final_codec,) if cfg.final_codec else ())
        return _gradcodec_mod(codecs, cfg.error_feedback, cfg.seed, cfg.residual_decay)(msg, context, call_next)

    return mod


def make_client_app(config: FedTrainConfig | None = None) -> ClientApp:
    """The ClientApp; `config` None: read the configuration from each message's run config."""
    app = ClientApp(mods=[_compression_mod(config)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return client_train(msg, context, _config_of(config, context))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return client_query(msg, context, _config_of(config, context))

    return app


# ====================================================================== server


class LoraFedAvg(FedAvg):
    """FedAvg of LoRA adapters over known partitions: `peft.fedavg` of the replies (A and B averaged
    separately, weighted by each client's example count), deterministic sampling and order.

    partitions: partition id -> node id. Each round samples `config.clients_per_round` partitions with a
    generator seeded by (seed, round), so every codec of a comparison trains the same clients. Replies
    are averaged in partition order (float sums do not commute). Federated evaluation is off: the
    server evaluates the global adapter itself.
    """

    def __init__(self, config: FedTrainConfig, partitions: dict[int, int]):
        super().__init__(fraction_train=config.fraction, min_available_nodes=len(partitions))
        self.config = config
        self.partitions = dict(sorted(partitions.items()))
        self.node_partition = {node: p for p, node in self.partitions.items()}
        self.rounds: dict[int, dict[str, Any]] = {}  # per round: sampled, aggregated, failed, train_loss, started

    def summary(self) -> None:
        log(logging.INFO, "\t├──> LoraFedAvg: %d of %d partitions per round, seed %d",
            self.config.clients_per_round(len(self.partitions)), len(self.partitions), self.config.seed)

    def sample(self, server_round: int) -> list[int]:
        rng = random.Random(self.config.seed * 1_000_003 + server_round)
        k = self.config.clients_per_round(len(self.partitions))
        return sorted(rng.sample(sorted(self.partitions), k))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        sampled = self.sample(server_round)
        self.rounds[server_round] = {"sampled": sampled, "aggregated": [], "failed": [], "train_loss": float("nan"),
                                     "started": time.perf_counter()}
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, [self.partitions[p] for p in sampled], MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        info = self.rounds.setdefault(server_round, {"sampled": [], "aggregated": [], "failed": [], "train_loss": float("nan"),
                                                     "started": time.perf_counter()})
        kept = []
        for reply in replies:
            partition = self.node_partition.get(reply.metadata.src_node_id, -1)
            if reply.has_error():
                info["failed"].append(partition)
                continue
            kept.append((partition, reply))
        if not kept:
            return None, None
        kept.sort(key=lambda pr: pr[0])
        metrics = [next(iter(r.content.metric_records.values())) for _, r in kept]
        weights = [float(m[self.weighted_by_key]) for m in metrics]
        states = [_to_state(next(iter(r.content.array_records.values()))) for _, r in kept]
        info["aggregated"] = [p for p, _ in kept]
        info["train_loss"] = sum(w * float(m["train-loss"]) for w, m in zip(weights, metrics)) / sum(weights)
        out = MetricRecord({"train-loss": info["train_loss"], "clients": len(kept), "num-examples": sum(weights)})
        return _to_record(peft.fedavg(states, weights)), out

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def discover_partitions(grid: Grid, cfg: FedTrainConfig) -> dict[int, int]:
    """Partition id -> node id, asked of every connected node once `num_clients` nodes are connected."""
    deadline = time.monotonic() + cfg.wait_for_clients_s
    while len(nodes := list(grid.get_node_ids())) < cfg.num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of num_clients={cfg.num_clients} SuperNodes connected within "
                               f"{cfg.wait_for_clients_s:.0f} s; start more SuperNodes or lower num_clients")
        time.sleep(0.5)
    messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in nodes]
    partitions: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.wait_for_clients_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(logging.WARNING, "node %s cannot take part: %s", node, reply.error.reason)
            continue
        partition = int(reply.content["partition"]["partition-id"])
        if partition in partitions:
            raise RuntimeError(f"nodes {partitions[partition]} and {node} both hold partition {partition}; "
                               "give each SuperNode its own partition-id")
        partitions[partition] = node
    if not partitions:
        raise RuntimeError("no node could load its data partition (see the errors above)")
    return dict(sorted(partitions.items()))


def _traffic(stats: RoundStats | None) -> dict[str, Any]:
    """A round's communication, summed over its messages (see CompressedStrategy.history)."""
    stats = stats or RoundStats(0)
    up, down = list(stats.uplink.values()), list(stats.downlink.values())
    return {
        "uplink_message_bytes": stats.uplink_message_bytes,
        "uplink_uncompressed_message_bytes": stats.uplink_uncompressed_message_bytes,
        "uplink_payload_bytes": stats.uplink_payload_bytes,
        "uplink_uncompressed_bytes": stats.uplink_uncompressed_bytes,
        "downlink_message_bytes": stats.downlink_message_bytes,
        "downlink_uncompressed_message_bytes": stats.downlink_uncompressed_message_bytes,
        "downlink_payload_bytes": sum(t.payload_bytes for t in down),
        "uncompressed_replies": sum(t.codec is None for t in up),
        "encode_s": sum(float(t.client.get("encode-s", 0.0)) for t in up),
        "decode_s": sum(t.seconds for t in up),
    }


def _last_line(reason: str) -> str:
    """The informative end of an error reason (a remote traceback, colour codes and all)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", reason).splitlines() if line.strip()]
    return (lines[-1] if lines else reason)[:300]


class _Evaluator:
    """Server-side evaluation of the global adapter on the held-out examples (round 0 computed once)."""

    def __init__(self, cfg: FedTrainConfig):
        self.cfg = cfg
        self.model, self.tokenizer, self.initial = load_model(cfg)
        self.held_out, _ = split_data(cfg)
        self.first: dict[str, Any] | None = None

    def __call__(self, state: dict[str, torch.Tensor], initial: bool) -> dict[str, Any]:
        from .train import evaluate

        if initial and self.first is not None:
            return self.first
        t0 = time.perf_counter()
        peft.load_lora_state(self.model, state)
        result = evaluate(self.model, self.held_out, self.tokenizer, max_length=self.cfg.max_length,
                          max_new_tokens=self.cfg.eval_max_new_tokens)
        out = {"eval_loss": result["loss"], "eval_accuracy": result["accuracy"],
               "eval_categories": result["categories"], "eval_s": time.perf_counter() - t0}
        if initial:
            self.first = out
        return out


def _epsilons(dp, cfg: FedTrainConfig) -> list[float]:
    """ε (δ = 1e-5) after each round for a `dp` pre-pass (none: []). The sampling rate is taken as
    clients_per_round / num_clients: fedtrain samples a fixed number per round, not Poisson, so it is an
    approximation of the accountant's model."""
    if dp is None:
        return []
    from gradcodec.privacy import epsilon_per_round

    return epsilon_per_round(dp.noise, cfg.clients_per_round() / cfg.num_clients, cfg.rounds, 1e-5)


def _run_codec(grid: Grid, cfg: FedTrainConfig, spec: str, partitions: dict[int, int], evaluator: _Evaluator,
               write: Callable[[dict], None]) -> None:
    """The federated run of one uplink codec: `cfg.rounds` rounds, a record written after each."""
    import gradcodec

    codec = gradcodec.get_codec(spec)
    feedback = cfg.error_feedback and not codec.lossless  # what gradcodec_mod does
    epsilons = _epsilons(codec.prepass, cfg)
    fedavg = LoraFedAvg(cfg, partitions)
    # With a final codec, the last round sends what error feedback still holds back (see final_codec).
    final = {cfg.rounds: cfg.final_codec} if cfg.final_codec and feedback else None
    label = f"{spec} (last round: {cfg.final_codec})" if final else spec
    strategy = CompressedStrategy(fedavg, downlink_codec=cfg.downlink_codec or None, uplink_codec=spec, round_codecs=final)
    bar = tqdm(total=cfg.rounds, desc=label, unit="round", disable=not cfg.progress, leave=True)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        record: dict[str, Any] = {"codec": label, "round": server_round, "error_feedback": feedback}
        if cfg.evaluates(server_round):
            record.update(evaluator(_to_state(arrays), initial=server_round == 0))
        if server_round > 0:
            info = fedavg.rounds.get(server_round, {})
            stats = strategy.history.get(server_round)
            record.update(_traffic(stats))
            record.update({k: info.get(k, []) for k in ("sampled", "aggregated")})
            record["train_loss"] = info.get("train_loss", float("nan"))
            dropped = stats.dropped if stats else {}
            record["dropped"] = {str(fedavg.node_partition.get(n, n)): _last_line(why) for n, why in dropped.items()}
            record["failed"] = sorted(fedavg.node_partition.get(n, -1) for n in dropped)
            record["round_s"] = time.perf_counter() - info.get("started", time.perf_counter())
            if epsilons:
                record["epsilon"] = epsilons[server_round - 1]
            bar.update(1)
            if "eval_loss" in record:
                bar.set_postfix_str(f"eval loss {record['eval_loss']:.3f} acc {record['eval_accuracy']:.1%} "
                                    f"up {(record['uplink_message_bytes'] or 0) / 1e3:.1f} kB")
            if record["uncompressed_replies"]:
                log(logging.WARNING, "%s: %d replies of round %d were not compressed (the clients could not encode "
                    "with this codec; see their logs)", spec, record["uncompressed_replies"], server_round)
        write(record)
        if "eval_loss" not in record:
            return None
        return MetricRecord({"eval-loss": record["eval_loss"], "eval-accuracy": record["eval_accuracy"]})

    try:
        strategy.start(grid=grid, initial_arrays=_to_record(evaluator.initial), num_rounds=cfg.rounds,
                       train_config=ConfigRecord(), evaluate_fn=evaluate_fn)
    finally:
        bar.close()


def serve(grid: Grid, cfg: FedTrainConfig) -> FedTrainResult:
    """The ServerApp's work: every codec of `cfg.codecs` in turn, then the table, summary and plot."""
    if untrained := [spec for spec in cfg.codecs if learned_codec_needs_model(spec)]:
        raise ValueError(f"{', '.join(untrained)}: name the AutoEncoder file (cgfed:model=FILE or cgfed-model=FILE, "
                         "the same file on the server and every client); `gradcodec fedtrain` trains one by TGAP")
    t0 = time.perf_counter()
    evaluator = _Evaluator(cfg)
    partitions = discover_partitions(grid, cfg)
    log(logging.INFO, "fedtrain: partitions %s on %d nodes; codecs %s", sorted(partitions), len(partitions),
        ", ".join(cfg.codecs))
    writer = RecordWriter(cfg.out_dir)
    for spec in cfg.codecs:
        _run_codec(grid, cfg, spec, partitions, evaluator, writer)
    result = FedTrainResult(config=dataclasses.asdict(cfg), records=writer.records, rows=summarize(writer.records),
                            wall_s=time.perf_counter() - t0, out_dir=str(writer.dir))
    write_summary(result)
    return result


def make_server_app(config: FedTrainConfig | None = None,
                    on_result: Callable[[FedTrainResult], None] | None = None) -> ServerApp:
    """The ServerApp; `config` None: read the configuration from the run config. `on_result` receives
    the finished run (simulation: the caller's process runs the ServerApp)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = _config_of(config, context)
        result = serve(grid, cfg)
        if on_result is not None:
            on_result(result)
        else:
            print(f"\n{result.table()}\n\nrecords, table and plot in {result.out_dir}", flush=True)

    return app


server_app = make_server_app()
client_app = make_client_app()
