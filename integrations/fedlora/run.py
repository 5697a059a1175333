"""Running the fedtrain app in Flower's simulation engine, and preparing what a run needs first.

    from gradcodec.integrations.fedlora.config import FedTrainConfig
    from gradcodec.integrations.fedlora.run import simulate

    result = simulate(FedTrainConfig(codecs=("raw", "int8", "topk:ratio=0.01|fp16"), rounds=5))
    print(result.table())          # result.records: the per-round records; result.rows: the table's rows

All codecs of a comparison run inside ONE simulation (one Ray start-up, ~15 s here, paid once): the
ServerApp loops over them (app.serve). Before Ray starts, this process loads (the first time:
pre-trains and caches) the base model, so the virtual clients only ever load it from the cache.

For the deployment engine (SuperLink + SuperNodes on several machines) see docs/fedtrain.md and
tests/test_fedlora_deployment.py: the same app runs there with `flwr run`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

from .config import FedTrainConfig, learned_codec_needs_model, with_model
from .report import FedTrainResult


def capture_config(cfg: FedTrainConfig, eval_examples: int = 0):
    """The in-process loop's (capture.run_federated) configuration of the same run as `cfg` with raw
    uplinks: same data, clients, sampling, batches, learning rates and adapter (local_steps only)."""
    from .capture import CaptureConfig

    if cfg.local_epochs > 0:
        raise ValueError("the in-process loop runs local_steps, not local_epochs")
    return CaptureConfig(
        model=cfg.model, pretrained=cfg.pretrained, data=cfg.data or None, examples=cfg.train_examples,
        eval_examples=eval_examples, rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, targets=cfg.targets,
        num_clients=cfg.num_clients, clients_per_round=cfg.clients_per_round(), rounds=cfg.rounds,
        local_steps=cfg.local_steps, lr=cfg.lr, lr_schedule=cfg.lr_schedule, batch_size=cfg.batch_size, optimizer=cfg.optimizer, max_length=cfg.max_length,
        dirichlet_alpha=cfg.dirichlet_alpha, lora_seed=cfg.lora_seed, seed=cfg.seed, data_seed=cfg.data_seed,
        device=cfg.device, dtype=cfg.dtype, keep_states=False,
    )


def tgap_pilot(cfg: FedTrainConfig):
    """The TGAP pilot of `cfg`: the same model, adapter initialisation and federated recipe, run for
    `tgap_rounds` rounds on *other* data, clients and sampling (data_seed + 1, seed + 1), so the AE is
    never trained on the updates of the run it then serves. It runs in-process (capture.run_federated),
    which gives the same run as the Flower app for the same settings (tests/test_fedlora_app.py)."""
    return capture_config(cfg.replace(rounds=cfg.tgap_rounds, seed=cfg.seed + 1, data_seed=cfg.data_seed + 1,
                                      lr_schedule="constant"))


def train_learned_codec(spec: str, cfg: FedTrainConfig) -> str:
    """TGAP for a cgfed spec without a model file: run the pilot (`tgap_pilot`), train the light (block)
    AE at `cgfed_ratio` on its round updates, and return `spec` with `model=<file>` added.

    The model file is cached (in `model.default_cache_dir()`, keyed by the pilot's configuration, the
    ratio and the training recipe), so a repeated comparison trains nothing. Whether the pilot uses the
    pre-trained base, and which, follows `cfg`; a changed base recipe needs GRADCODEC_CACHE cleared or
    pointed elsewhere.
    """
    import dataclasses
    import hashlib
    import json
    from fractions import Fraction

    from gradcodec.learned import AEConfig, CanvasLayout
    from gradcodec.learned.tgap import TrainConfig, train_autoencoder

    from .capture import run_federated
    from .model import default_cache_dir, is_preset, lora_shapes

    try:
        ratio = float(Fraction(cfg.cgfed_ratio))
    except (ValueError, ZeroDivisionError):
        ratio = float("nan")
    if not 0 < ratio <= 1:
        raise ValueError(f"cgfed_ratio must be a fraction in (0, 1] such as 1/64, got {cfg.cgfed_ratio!r}")
    arch = "block"
    if is_preset(cfg.model):  # a ratio the AE cannot have fails now, not after the pilot's minutes
        layout = CanvasLayout.for_shapes(lora_shapes(cfg.model, cfg.lora_rank, cfg.targets))
        arch = _arch_for(AEConfig.block(layout, ratio), layout)
        getattr(AEConfig, arch)(layout, ratio)
    pilot = tgap_pilot(cfg)
    # The block AE's per-tile PCA start is its fit: Adam on top overfits (docs/results.md), so no steps.
    training = TrainConfig(steps=0)
    key = hashlib.sha256(json.dumps({"pilot": dataclasses.asdict(pilot), "ratio": ratio, "arch": arch,
                                     "train": dataclasses.asdict(training)}, sort_keys=True).encode()).hexdigest()[:16]
    path = default_cache_dir() / f"cgfed-{arch}-{key}.safetensors"
    if not path.exists():
        print(f"TGAP for {spec}: a {pilot.rounds}-round pilot federation collects round updates (once; cached)",
              flush=True)
        updates = [r["update"] for r in run_federated(pilot, progress=cfg.progress)["records"]]
        layout = CanvasLayout.of(updates[0])
        ae_config = getattr(AEConfig, arch)(layout, ratio)
        train_autoencoder(updates, ae_config, training).save(path)  # atomic: concurrent runs share the cache
        print(f"TGAP: trained a 1/{round(1 / ratio)} {arch} AE on {len(updates)} updates: {path}", flush=True)
    return with_model(spec, path)


# The block AE holds 2 x canvas values x latents-per-tile weights: per-factor tiles are right for the tiny
# preset's adapters and tens of GB at LLaMA shapes (docs/results/llama-scale-codecs.md). Above this many
# weights TGAP fits the shared AE instead (weights shared across layers; docs/results/cgfed-scale.md).
MAX_BLOCK_AE_WEIGHTS = 1 << 28  # 1 GiB of fp32


def _arch_for(block, layout) -> str:
    """"block" where its AE stays under MAX_BLOCK_AE_WEIGHTS, else "shared"."""
    weights = 2 * layout.height * layout.width * block.latents  # one tile-sized map per latent, position, half
    return "block" if weights <= MAX_BLOCK_AE_WEIGHTS else "shared"


def prepare_codecs(cfg: FedTrainConfig) -> FedTrainConfig:
    """The config with its codec list ready to run: each cgfed entry without a model file (nor a
    `cgfed_model`, which FedTrainConfig fills in) gets an AE trained by TGAP (`train_learned_codec`)."""
    return cfg.replace(codecs=tuple(train_learned_codec(s, cfg) if learned_codec_needs_model(s) else s for s in cfg.codecs))


class _DropDeprecation(logging.Filter):
    """`run_simulation` is deprecated in Flower 1.42 in favour of `flwr run`; its warning says nothing
    a fedtrain user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in str(record.msg)


@contextlib.contextmanager
def _flower_logging(verbose: bool):
    logger = logging.getLogger("flwr")
    level, quiet = logger.level, _DropDeprecation()
    if not verbose:
        logger.setLevel(logging.WARNING)
        logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.removeFilter(quiet)


def backend_config(cfg: FedTrainConfig, verbose: bool = False) -> dict:
    """Ray settings: `client_cpus`/`client_gpus` per virtual client, no dashboard, quiet unless verbose."""
    return {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                      "log_to_driver": verbose, "logging_level": "INFO" if verbose else "ERROR"},
    }


def simulate(cfg: FedTrainConfig, verbose: bool = False) -> FedTrainResult:
    """Run `cfg` (every codec in `cfg.codecs`) in Flower's simulation engine with `num_clients` virtual
    clients; returns the result the ServerApp also wrote to `cfg.out_dir`.

    verbose: Flower's and Ray's logs, and the clients' output (their local-step progress bars) relayed
    by Ray; otherwise only the server's round bars, warnings and the table are shown.
    """
    from flwr.simulation import run_simulation

    import gradcodec

    from .app import load_model, make_client_app, make_server_app

    t0 = time.perf_counter()
    for spec in cfg.codecs + ((cfg.final_codec,) if cfg.final_codec else ()):
        gradcodec.get_codec(spec)  # a bad spec fails here, before any training
    load_model(cfg)  # pre-train or load the base here, once, before the virtual clients need it
    cfg = prepare_codecs(cfg)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning
    # Ray runs its workers (the virtual clients: the run's real work) at niceness 15, so any other
    # process on the machine, even a niced one, takes their CPU; run them at the caller's priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    results: list[FedTrainResult] = []
    with _flower_logging(verbose):
        run_simulation(server_app=make_server_app(cfg, on_result=results.append), client_app=make_client_app(cfg),
                       num_supernodes=cfg.num_clients, backend_config=backend_config(cfg, verbose))
    if not results:
        raise RuntimeError("the simulation ended without a result; see the errors above")
    results[0].wall_s = time.perf_counter() - t0
    return results[0]


def simulate_seeds(cfg: FedTrainConfig, verbose: bool = False) -> tuple[dict[int, FedTrainResult], list[dict]]:
    """The paired comparison of `cfg.seeds`: `simulate` once per seed (seed and lora_seed set to it; the
    data and held-out set stay those of `data_seed`), each in `out_dir/seed-<s>/`, then the paired
    analysis against raw (paired.py) in `out_dir`. A learned codec's AE is trained once, by the TGAP
    pilot of the first seed, and serves every seed. Returns the per-seed results and the table's rows.
    """
    from dataclasses import asdict
    from pathlib import Path

    from . import paired

    t0 = time.perf_counter()
    cfg = prepare_codecs(cfg.replace(seed=cfg.seed_list[0], lora_seed=cfg.seed_list[0]))
    results: dict[int, FedTrainResult] = {}
    for seed in cfg.seed_list:
        print(f"seed {seed} ({len(results) + 1} of {len(cfg.seed_list)})", flush=True)
        results[seed] = simulate(cfg.replace(seed=seed, lora_seed=seed, out_dir=str(Path(cfg.out_dir) / f"seed-{seed}")),
                                 verbose)
    rows = paired.write(results, cfg.out_dir, asdict(cfg), time.perf_counter() - t0,
                        title=f"{cfg.model} · LoRA r={cfg.lora_rank} on {len(cfg.targets)} projections · {cfg.num_clients} "
                              f"clients, {cfg.clients_per_round()} per round · {cfg.rounds} rounds · seeds {cfg.seeds}")
    return results, rows
