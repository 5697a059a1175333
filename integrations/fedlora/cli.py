"""`gradcodec fedtrain`: federated LoRA fine-tuning on Flower with compressed uplinks, and codec comparisons.

    gradcodec fedtrain --compare                       # raw, int8, int4, top-k 1%, PowerSGD, cgfed on the built-in task
    gradcodec fedtrain --compare "raw,int8,topk:ratio=0.01,k=0|int8" --rounds 20
    gradcodec fedtrain --codec int4 --config run.toml --out-dir runs/int4
    gradcodec fedtrain --model /models/llama-7b --bf16 --gradient-checkpointing --device cuda \\
        --data alpaca.json --client-gpus 0.5 --compare raw,int8,int4

Every setting of `config.FedTrainConfig` is a flag (`--rounds`, `--lora-rank`, `--no-error-feedback`,
...); a `--config` TOML/JSON file sets them too, and flags win. Registering only defines the flags:
Flower, torch and transformers are imported when the command runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

from .config import DEFAULT_COMPARE, FedTrainConfig, load_config_file


def _flag_type(default):
    return {bool: None, int: int, float: float}.get(type(default), str)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fedtrain",
        help="federated LoRA fine-tuning on Flower with compressed uploads; --compare codecs",
        description=__doc__.split("\n\nEvery setting")[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="TOML or JSON file of settings (flags override it)")
    p.add_argument("--compare", nargs="?", const="default", metavar="CODECS",
                   help="run these codecs one after the other on the same seed and data and print a table; "
                        "a list separated by ',' or ';' (specs keep their own commas: 'topk:ratio=0.01,k=0|int8'); "
                        f"'default' (or no value) is {','.join(DEFAULT_COMPARE)}")
    p.add_argument("--codec", help="one uplink codec spec, e.g. int8 or 'topk:ratio=0.01|fp16'")
    p.add_argument("--bf16", action="store_const", const="bfloat16", dest="dtype", default=argparse.SUPPRESS,
                   help="shorthand for --dtype bfloat16")
    p.add_argument("--prepare", action="store_true",
                   help="only load (the first time: pre-train and cache) the base model and the data, then exit; "
                        "run it once on each deployment machine")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as TOML and exit")
    p.add_argument("--verbose", action="store_true",
                   help="show Flower's and Ray's logs, and the virtual clients' local-step progress bars")
    settings = p.add_argument_group("settings (defaults shown; see integrations/fedlora/config.py)")
    for f in dataclasses.fields(FedTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.name == "codecs":
            settings.add_argument(flag, default=argparse.SUPPRESS, metavar="LIST",
                                  help=f"{help_text} (a list as for --compare; default {';'.join(f.default)})")
        elif isinstance(f.default, bool):
            settings.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                  help=f"{help_text} (default {'on' if f.default else 'off'})")
        else:
            settings.add_argument(flag, type=_flag_type(f.default), default=argparse.SUPPRESS,
                                  help=f"{help_text} (default {f.default!r})")
    p.set_defaults(run=run_fedtrain)


def resolve_config(args: argparse.Namespace) -> FedTrainConfig:
    """Defaults < --config file < flags."""
    names = {f.name for f in dataclasses.fields(FedTrainConfig)}
    settings = load_config_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k in names}
    chosen = [flag for flag, given in (("--compare", args.compare), ("--codec", args.codec), ("--codecs", "codecs" in flags)) if given]
    if len(chosen) > 1:
        raise ValueError(f"give one of {', '.join(chosen)}")
    if args.compare is not None:
        flags["codecs"] = args.compare
    elif args.codec is not None:
        flags["codecs"] = (args.codec,)
    return FedTrainConfig().replace(**{**settings, **flags})


def to_toml(cfg: FedTrainConfig) -> str:
    """The settings as a TOML config file (loadable with --config)."""
    lines = []
    for key, value in dataclasses.asdict(cfg).items():
        value = ";".join(value) if isinstance(value, (list, tuple)) else value
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def run_fedtrain(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    from .app import client_features, load_model, split_data
    from .run import simulate, simulate_seeds

    if args.prepare:
        t0 = time.perf_counter()
        load_model(cfg)
        split_data(cfg)
        client_features(cfg, 0, cfg.num_clients)
        print(f"model and data ready in {time.perf_counter() - t0:.0f} s")
        return 0
    t0 = time.perf_counter()
    if cfg.seed_list:
        from . import paired

        results, rows = simulate_seeds(cfg, verbose=args.verbose)
        moved = paired.convergence({s: paired.raw_curve(res.records) for s, res in results.items()})
        print(f"\n{paired.format_table(rows)}\n")
        print("raw's eval loss over its last 5 rounds moved by " + ", ".join(f"{100 * v:.2f} %" for v in moved.values())
              + " (seeds " + ", ".join(map(str, moved)) + ")")
        print(f"{len(rows)} codec(s) x {len(results)} seeds x {cfg.rounds} rounds in {time.perf_counter() - t0:.0f} s; "
              f"per-seed runs in {cfg.out_dir}/seed-*/, paired.json, paired.md and rate-distortion.png in {cfg.out_dir}/")
        return 0
    result = simulate(cfg, verbose=args.verbose)
    print(f"\n{result.table()}\n")
    print(f"{len(result.rows)} codec(s) x {cfg.rounds} rounds, {cfg.num_clients} clients, in {time.perf_counter() - t0:.0f} s; "
          f"per-round records, table and plot in {result.out_dir}/ (rounds.jsonl, table.md, compare.png)")
    return 0
