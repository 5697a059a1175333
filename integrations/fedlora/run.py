"""Running the fedtrain app in Flower's simulation engine, and preparing what a run needs first.

    from gradcodec.integrations.fedlora.config import FedTrainConfig
    from gradcodec.integrations.fedlora.run import simulate

    result = simulate(FedTrainConfig(codecs=("raw", "int8", "topk:ratio=0.01|fp16"), rounds=5))
    print(result.table())          # result.records: the per-round records; result.rows: the table's rows

All codecs of a comparison run inside ONE simulation (one Ray start-up, ~15 s here, paid once): the
ServerApp loops over them (app.serve). Before Ray starts, this process loads (the first time:
pre-trains and caches) the base model, so the virtual clients only ever load it from the cache.

For the deployment engine (SuperLink + SuperNodes on several machines) see docs/results-fedlora.md and
tests/test_fedlora_deployment.py: the same app runs there with `flwr run`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

from .config import FedTrainConfig
from .report import FedTrainResult


def learned_codec_needs_training(spec: str) -> bool:
    """Whether `spec` is the learned codec without an AutoEncoder file."""
    first = spec.split("|")[0]
    return first.split(":")[0].strip() == "cgfed" and "model=" not in first


def train_learned_codec(spec: str, cfg: FedTrainConfig) -> str:
    """TGAP seam: capture round updates of this configuration, train the cgfed AutoEncoder on them,
    and return `spec` with `model=<file>` added, so the FAF run that follows uses it.

    Not wired yet: it will call the capture (integrations/fedlora/capture.py) and AE training
    (gradcodec.learned.tgap) APIs once they settle.
    """
    raise ValueError(f"{spec!r} needs an AutoEncoder file: pass cgfed:model=FILE (or --cgfed-model FILE); make one with "
                     "`gradcodec capture ...` then `gradcodec train-ae ...` (automatic training is not wired in yet)")


def prepare_codecs(cfg: FedTrainConfig) -> FedTrainConfig:
    """The config with its codec list ready to run: `cgfed_model` added as a cgfed entry (unless one is
    listed), cgfed entries without a model trained first (train_learned_codec)."""
    specs = list(cfg.codecs)
    if cfg.cgfed_model and not any(s.split("|")[0].split(":")[0].strip() == "cgfed" for s in specs):
        specs.append(f"cgfed:model={cfg.cgfed_model}")
    specs = [train_learned_codec(s, cfg) if learned_codec_needs_training(s) else s for s in specs]
    import gradcodec

    for spec in specs:
        gradcodec.get_codec(spec)  # a bad spec fails here, not in the middle of the run
    return cfg.replace(codecs=tuple(specs))


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

    from .app import load_model, make_client_app, make_server_app

    t0 = time.perf_counter()
    cfg = prepare_codecs(cfg)
    load_model(cfg)  # pre-train or load the base here, once, before the virtual clients need it
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning
    results: list[FedTrainResult] = []
    with _flower_logging(verbose):
        run_simulation(server_app=make_server_app(cfg, on_result=results.append), client_app=make_client_app(cfg),
                       num_supernodes=cfg.num_clients, backend_config=backend_config(cfg, verbose))
    if not results:
        raise RuntimeError("the simulation ended without a result; see the errors above")
    results[0].wall_s = time.perf_counter() - t0
    return results[0]
