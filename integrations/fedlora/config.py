"""The run configuration of `gradcodec fedtrain`: one dataclass, its defaults, and the ways to set it.

Precedence, lowest first: the defaults below, a config file (`--config run.toml` or `.json`: a flat
table of these keys, snake_case or kebab-case), then command-line flags. In Flower's deployment engine
the same keys, kebab-case, are the app's run config (`pyproject.toml` beside this file, overridden with
`flwr run ... --run-config "rounds=5 codecs='int8'"`), which `FedTrainConfig.from_run_config` reads.

Only the standard library is imported here: `gradcodec --help` builds its flags from this module.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

# The codecs `--compare default` runs. EF = error feedback, on by default for every lossy codec. cgfed
# without a model file is trained first by TGAP on a pilot federation (run.train_learned_codec), or
# uses `cgfed_model`.
DEFAULT_COMPARE = (
    "raw",
    "int8",
    "int4",
    "topk:ratio=0.01|fp16",
    "powersgd:rank=1|fp16",
    "cgfed",
)


# The clients' local optimizers (train.train_steps builds them; fresh each round).
OPTIMIZERS = ("adamw", "sgd")
# How the clients' local learning rate changes over the rounds (round_lr).
LR_SCHEDULES = ("constant", "cosine")


def round_lr(lr: float, schedule: str, server_round: int, rounds: int) -> float:
    """The clients' local learning rate in `server_round` (1-based) of `rounds`: constant, or a cosine
    from lr in round 1 to lr * (1 + cos(pi (R-1)/R)) / 2 (about 0.6 % of lr at R = 20) in the last.
    The Flower app and the in-process loop (capture.run_federated) both take it from here."""
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * (server_round - 1) / rounds))


def _opt(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - argparse's word
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class FedTrainConfig:
    """Everything a federated LoRA fine-tuning run (or a comparison of codecs) depends on."""

    # ---- model
    model: str = _opt("tiny", "model preset (tiny) or local transformers checkpoint directory")
    pretrained: bool = _opt(True, "presets: fine-tune the cached pre-trained base (off: random weights)")
    dtype: str = _opt("float32", "model dtype: float32 or bfloat16 (the adapter travels as float32)")
    device: str = _opt("cpu", "torch device of every model copy, e.g. cpu, cuda")
    gradient_checkpointing: bool = _opt(False, "trade compute for activation memory (large models)")
    # ---- LoRA
    lora_rank: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(16.0, "LoRA alpha (scale alpha/rank)")
    lora_targets: str = _opt("q_proj,k_proj,v_proj,o_proj", "comma-separated linear layers that get adapters")
    lora_seed: int = _opt(0, "seed of the initial global adapter")
    # ---- data
    data: str = _opt("", "Alpaca/Dolly JSON or JSONL file (empty: the generated task suite)")
    train_examples: int = _opt(2000, "generated suite: examples split across clients")
    eval_examples: int = _opt(140, "held-out examples the server evaluates the global adapter on")
    eval_every: int = _opt(1, "evaluate every k-th round, and each of the last 5 (1: every round)")
    max_length: int = _opt(128, "tokens per example (longer ones are cut)")
    eval_max_new_tokens: int = _opt(8, "greedy answer length for exact-match accuracy (generated answers fit in 8)")
    num_clients: int = _opt(10, "clients (data partitions; SuperNodes in simulation)")
    dirichlet_alpha: float = _opt(0.5, "non-IID split: Dirichlet concentration over categories (small: skewed)")
    data_seed: int = _opt(0, "seed of the data, the held-out split and the client partition")
    # ---- federated training
    rounds: int = _opt(8, "federated rounds per codec")
    fraction: float = _opt(0.2, "fraction of clients sampled each round (at least one)")
    local_steps: int = _opt(20, "local AdamW steps per round (ignored when local_epochs > 0)")
    local_epochs: float = _opt(0.0, "local epochs per round over the client's data (0: use local_steps)")
    lr: float = _opt(3e-3, "local learning rate (of round 1 with lr_schedule cosine)")
    lr_schedule: str = _opt("constant", "local learning rate over rounds: constant, or cosine (decays to ~0 by the last round)")
    batch_size: int = _opt(16, "local batch size")
    optimizer: str = _opt("adamw", "clients' local optimizer, fresh each round: adamw, or sgd (plain SGD; needs a far larger lr, e.g. 1)")
    seed: int = _opt(0, "seed of client sampling, local batches and stochastic codecs")
    seeds: str = _opt("", "paired comparison: run every codec once per seed (e.g. 0,1,2; each sets seed and lora_seed) and report paired 95 %% CIs vs raw")
    # ---- compression
    codecs: tuple[str, ...] = _opt(("int8",), "uplink codec specs, run one after the other on the same data")
    error_feedback: bool = _opt(True, "clients keep error-feedback residuals for lossy codecs")
    residual_decay: float = _opt(1.0, "a residual is scaled by this per round its client was not sampled (1: keep, 0: drop)")
    downlink_codec: str = _opt("", "also compress the global adapter sent to clients (e.g. bf16; empty: none)")
    final_codec: str = _opt("", "lossy codecs with error feedback send the last round with this codec instead (e.g. int4): "
                                "the update plus every residual still waiting; its bytes count in the table (empty: none)")
    cgfed_model: str = _opt("", "AutoEncoder file for cgfed entries without model= (default: TGAP trains one)")
    cgfed_ratio: str = _opt("1/64", "cgfed without a model file: the AE's latent / canvas ratio TGAP trains")
    tgap_rounds: int = _opt(20, "cgfed without a model file: rounds of the TGAP pilot run that collects updates")
    # ---- running
    out_dir: str = _opt("runs/fedtrain", "where rounds.jsonl, summary.json, table.md and compare.png go")
    progress: bool = _opt(True, "progress bars (rounds on the server, local steps on the clients)")
    client_cpus: float = _opt(1.0, "simulation: CPUs per virtual client (parallel clients = CPUs / this)")
    client_gpus: float = _opt(0.0, "simulation: GPUs per virtual client (e.g. 0.5 for two per GPU)")
    wait_for_clients_s: float = _opt(300.0, "deployment: how long the server waits for num_clients SuperNodes")
    fail_partition: int = _opt(-1, "testing: this partition's client raises in round fail_round (-1: none)")
    fail_round: int = _opt(1, "testing: the round in which fail_partition fails")

    def __post_init__(self) -> None:
        codecs = (self.codecs,) if isinstance(self.codecs, str) else tuple(self.codecs)
        if self.cgfed_model:
            codecs = tuple(with_model(c, self.cgfed_model) if learned_codec_needs_model(c) else c for c in codecs)
        object.__setattr__(self, "codecs", codecs)
        problems = []
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        for name in ("lora_rank", "rounds", "num_clients", "batch_size", "max_length", "train_examples", "eval_max_new_tokens",
                     "tgap_rounds", "eval_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.local_steps < 1 and not self.local_epochs > 0:
            problems.append(f"need local_steps >= 1 or local_epochs > 0, got {self.local_steps} and {self.local_epochs}")
        if not 0 < self.fraction <= 1:
            problems.append(f"fraction must be in (0, 1], got {self.fraction}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if not 0 <= self.residual_decay <= 1:
            problems.append(f"residual_decay must be in [0, 1], got {self.residual_decay}")
        if not self.dirichlet_alpha > 0 or not self.lr > 0:
            problems.append(f"dirichlet_alpha and lr must be > 0, got {self.dirichlet_alpha} and {self.lr}")
        if self.eval_examples < 1:
            problems.append(f"eval_examples must be >= 1 (the server evaluates every round), got {self.eval_examples}")
        if not codecs or not all(isinstance(c, str) and c.strip() for c in codecs):
            problems.append(f"codecs must be a non-empty list of codec specs, got {self.codecs!r}")
        if self.final_codec and learned_codec_needs_model(self.final_codec):
            problems.append(f"final_codec {self.final_codec!r} needs its model file (model=FILE)")
        if not self.targets:
            problems.append("lora_targets names no layer")
        try:
            seeds = self.seed_list
        except ValueError:
            seeds = ()
            problems.append(f"seeds must be comma-separated integers such as 0,1,2, got {self.seeds!r}")
        if len(set(seeds)) != len(seeds):
            problems.append(f"seeds repeat a seed: {self.seeds!r}")
        if problems:
            raise ValueError("invalid fedtrain configuration: " + "; ".join(problems))

    # ------------------------------------------------------------------ derived values

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def seed_list(self) -> tuple[int, ...]:
        """The seeds of a paired comparison (empty: one run at `seed`)."""
        return tuple(int(s) for s in self.seeds.replace(";", ",").split(",") if s.strip())

    def lr_at(self, server_round: int) -> float:
        """The clients' local learning rate in `server_round` (1-based): `round_lr` of this run."""
        return round_lr(self.lr, self.lr_schedule, server_round, self.rounds)

    def evaluates(self, server_round: int) -> bool:
        """Whether the server evaluates the global adapter after `server_round` (0: the initial one)."""
        return server_round % self.eval_every == 0 or server_round > self.rounds - 5

    def clients_per_round(self, available: int | None = None) -> int:
        """How many of `available` (default num_clients) clients a round samples."""
        n = self.num_clients if available is None else available
        return min(n, max(1, round(self.fraction * n)))

    # ------------------------------------------------------------------ conversions

    def replace(self, **overrides: Any) -> FedTrainConfig:
        """A copy with `overrides` (snake_case or kebab-case keys, values coerced to each field's type)."""
        return dataclasses.replace(self, **_coerce(overrides))

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flower's flat run config (kebab-case keys, scalar values; codec specs joined with ';')."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = ";".join(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_run_config(cls, run_config: Any) -> FedTrainConfig:
        """The config a Flower run carries (deployment: `context.run_config`); unknown keys are ignored
        there, since Flower may add its own."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls().replace(**{k: v for k, v in dict(run_config).items() if _field_name(k) in known})


def _codec_stage(spec: str) -> int:
    """Index of the stage that names the codec: the first, or the second behind a whole-update dp stage."""
    stages = spec.split("|")
    return 1 if len(stages) > 1 and stages[0].split(":")[0].strip() == "dp" else 0


def learned_codec_needs_model(spec: str) -> bool:
    """Whether `spec` is the learned codec (possibly behind `dp:...|`) without an AutoEncoder file."""
    stage = spec.split("|")[_codec_stage(spec)]
    return stage.split(":")[0].strip() == "cgfed" and "model=" not in stage


def with_model(spec: str, path: str | os.PathLike) -> str:
    """`spec` with `model=path` added to its cgfed stage (the first, or the second behind dp)."""
    if any(c in os.fspath(path) for c in ",|"):
        raise ValueError(f"model file {os.fspath(path)!r}: a path in a codec spec cannot contain ',' or '|'; move the "
                         "file (or set GRADCODEC_CACHE to a folder without them)")
    stages = spec.split("|")
    i = _codec_stage(spec)
    name, _, params = stages[i].partition(":")
    stages[i] = f"{name}:{params},model={path}" if params else f"{name}:model={path}"
    return "|".join(stages)


def _field_name(key: str) -> str:
    return key.replace("-", "_")


def _coerce(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keys to field names and values to field types; raises on unknown keys and wrong values."""
    fields = {f.name: f for f in dataclasses.fields(FedTrainConfig)}
    out = {}
    for key, value in overrides.items():
        name = _field_name(key)
        if name not in fields:
            raise ValueError(f"unknown fedtrain setting {key!r}; known settings: {', '.join(sorted(fields))}")
        default = fields[name].default
        if name == "codecs":
            out[name] = parse_codec_list(value) if isinstance(value, str) else tuple(value)
        elif isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                value = value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError(f"setting {key!r} must be true or false, got {value!r}")
            out[name] = value
        else:
            try:
                out[name] = type(default)(value)
            except (TypeError, ValueError):
                raise ValueError(f"setting {key!r} must be a {type(default).__name__}, got {value!r}") from None
            if isinstance(default, int) and isinstance(value, float) and value != int(value):
                raise ValueError(f"setting {key!r} must be an integer, got {value!r}")
    return out


def parse_codec_list(text: str) -> tuple[str, ...]:
    """Codec specs from a list such as "raw,int8,topk:ratio=0.01,k=0|int8;cgfed:model=ae.safetensors".

    Items are separated by ',' or ';' (a ',' followed by key=value continues the previous spec's
    parameters, as in `gradcodec bench --codecs`); "default" stands for `DEFAULT_COMPARE`.
    """
    from gradcodec.bench.runner import expand_codecs

    text = re.sub(r"(?<![^,;\s])default(?![^,;\s])", ";".join(DEFAULT_COMPARE), text)
    specs = tuple(dict.fromkeys(expand_codecs(text)))  # a codec listed twice runs once
    if not specs:
        raise ValueError(f"no codec spec in {text!r}")
    return specs


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in a TOML or JSON config file (a flat table; a TOML file may nest them under
    [tool.flwr.app.config], so the app's own pyproject.toml works too)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode("utf-8"))
            data = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid {'JSON' if path.endswith('.json') else 'TOML'} file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings, found {type(data).__name__}")
    try:
        _coerce(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return data
