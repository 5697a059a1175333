"""A runnable FLARE job: FedAvg of LoRA adapters on the tiny LLaMA preset, with or without gradcodec.

    python -m gradcodec.integrations.nvflare.lora_job --spec int8 --rounds 3 --workspace /tmp/flare
    python -m gradcodec.integrations.nvflare.lora_job --rounds 3 --workspace /tmp/flare    # uncompressed

The job is built with FLARE's Job API and run in its simulator (one process per client group, CPU):
the server runs FLARE's own `FedAvg` controller (subclassed only to create the initial adapter and to
save the global one as safetensors), each client a `LoraTrainer` executor that trains the adapter on
its share of the generated instruction tasks (integrations/fedlora). Compression is the two filter
lines in `build_job`; nothing else differs between the runs.
"""
import argparse
import glob
import json
import os
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.job_config.api import FedJob

from gradcodec.integrations.fedlora.dataset import generate_examples
from gradcodec.integrations.fedlora.model import attach_lora, build_model, load_tokenizer, pretrained_base
from gradcodec.integrations.fedlora.train import evaluate, local_train
from gradcodec.integrations.nvflare.filters import (GradcodecDecoder, GradcodecEncoder, allow_gradcodec_classes,
                                                    ship_as_installed_package)
from gradcodec.integrations.peft import load_lora_state, lora_state

GLOBAL_FILE = "global_lora.safetensors"
TRAIN_SEED, EVAL_SEED = 11, 12  # the generated examples' seeds (disjoint from pre-training's)


def lora_model(preset: str = "tiny", pretrained: bool = False, rank: int = 8, seed: int = 0) -> torch.nn.Module:
    """The base (pre-trained and cached, or randomly initialised) with a fresh LoRA adapter."""
    base = pretrained_base(preset, seed=seed) if pretrained else build_model(preset, seed=seed)
    return attach_lora(base, rank=rank, seed=seed)


def client_examples(site: str, n_clients: int, per_client: int) -> list[dict]:
    """Site "site-k"'s share: every n_clients-th example of one generated list, from position k - 1."""
    index = int(site.rsplit("-", 1)[-1]) - 1
    return generate_examples(per_client * n_clients, TRAIN_SEED)[index::n_clients]


class LoraFedAvg(FedAvg):
    """FLARE's FedAvg, starting from a fresh adapter and saving the global adapter as safetensors."""

    def __init__(self, num_clients: int = 2, num_rounds: int = 3, preset: str = "tiny", pretrained: bool = False,
                 rank: int = 8, seed: int = 0):
        super().__init__(num_clients=num_clients, num_rounds=num_rounds, persistor_id="", save_filename=GLOBAL_FILE)
        self.preset, self.pretrained, self.rank, self.seed = preset, pretrained, rank, seed

    def load_model(self) -> FLModel:
        state = lora_state(lora_model(self.preset, self.pretrained, self.rank, self.seed))
        return FLModel(params={k: v.numpy() for k, v in state.items()})

    def save_model_file(self, model: FLModel, filepath: str) -> None:
        from safetensors.torch import save_file

        save_file({k: torch.as_tensor(np.asarray(v)).contiguous() for k, v in model.params.items()}, filepath)


class LoraTrainer(Executor):
    """Client executor: load the global adapter, train it locally, send the new adapter (or its change)."""

    def __init__(self, n_clients: int = 2, preset: str = "tiny", pretrained: bool = False, rank: int = 8,
                 seed: int = 0, examples_per_client: int = 64, local_steps: int = 4, batch_size: int = 8,
                 lr: float = 2e-3, send_diff: bool = False):
        super().__init__()
        self.n_clients, self.preset, self.pretrained, self.rank, self.seed = n_clients, preset, pretrained, rank, seed
        self.examples_per_client, self.local_steps, self.batch_size, self.lr = examples_per_client, local_steps, batch_size, lr
        self.send_diff = send_diff
        self._model = None
        self._round = 0

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name != "train":
            return make_reply(ReturnCode.TASK_UNKNOWN)
        site = fl_ctx.get_identity_name()
        if self._model is None:
            self._model = lora_model(self.preset, self.pretrained, self.rank, self.seed)
            self._tokenizer = load_tokenizer(self.preset)
            self._examples = client_examples(site, self.n_clients, self.examples_per_client)
        received = {k: torch.as_tensor(np.asarray(v)) for k, v in from_shareable(shareable).data.items()}
        load_lora_state(self._model, received)
        stats = local_train(self._model, self._examples, self._tokenizer, steps=self.local_steps, lr=self.lr,
                            batch_size=self.batch_size, seed=self.seed * 1000 + self._round)
        self._round += 1
        trained = lora_state(self._model)
        if self.send_diff:
            data, kind = {k: (trained[k] - received[k]).numpy() for k in trained}, DataKind.WEIGHT_DIFF
        else:
            data, kind = {k: v.numpy() for k, v in trained.items()}, DataKind.WEIGHTS
        self.log_info(fl_ctx, f"{site}: local loss {stats['loss']:.4f}")
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: stats["steps"], MetaKey.INITIAL_METRICS: {"train_loss": stats["loss"]}}
        return DXO(kind, data, meta=meta).to_shareable()


def build_job(spec: str | None = None, *, n_clients: int = 2, rounds: int = 3, pretrained: bool = False,
              seed: int = 0, send_diff: bool = False, trainer: dict[str, Any] | None = None,
              encoder: dict[str, Any] | None = None) -> FedJob:
    """The FLARE job; with `spec`, the two gradcodec filter lines are added. `trainer`: LoraTrainer options."""
    job = FedJob(name="gradcodec_lora" if spec else "plain_lora", min_clients=n_clients)
    ship_as_installed_package(job)  # this job's own classes live in gradcodec too
    job.to_server(LoraFedAvg(num_clients=n_clients, num_rounds=rounds, pretrained=pretrained, seed=seed))
    if spec:
        job.to(GradcodecDecoder(), "server", tasks=["train"])
    for i in range(1, n_clients + 1):
        site = f"site-{i}"
        job.to(LoraTrainer(n_clients=n_clients, pretrained=pretrained, seed=seed, send_diff=send_diff, **(trainer or {})),
               site, tasks=["train"])
        if spec:
            job.to(GradcodecEncoder(spec, seed=seed, **(encoder or {})), site, tasks=["train"])
    return job


def run_job(job: FedJob, workspace: str) -> dict[str, torch.Tensor]:
    """Run `job` in FLARE's simulator under `workspace`; the final global adapter.

    The simulated sites are configured like real ones would be: they allow gradcodec's classes.
    """
    from safetensors.torch import load_file

    allow_gradcodec_classes(os.path.join(workspace, "local"))
    job.simulator_run(workspace, threads=len(job.clients), log_config="concise")
    found = sorted(glob.glob(os.path.join(workspace, "**", GLOBAL_FILE), recursive=True), key=os.path.getmtime)
    if not found:
        raise RuntimeError(f"the job saved no global adapter under {workspace}; see the simulator log there")
    return load_file(found[-1])


def eval_loss(adapter: dict[str, torch.Tensor], *, pretrained: bool = False, seed: int = 0, n: int = 64) -> float:
    """Response loss of the base with `adapter` on `n` held-out generated examples."""
    model = lora_model("tiny", pretrained, seed=seed)
    load_lora_state(model, adapter)
    return evaluate(model, generate_examples(n, EVAL_SEED), load_tokenizer("tiny"), max_new_tokens=1)["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description="FedAvg of LoRA adapters in FLARE's simulator, optionally with gradcodec")
    parser.add_argument("--spec", default=None, help="gradcodec spec for the client updates (default: uncompressed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--pretrained", action="store_true", help="start from the cached pre-trained tiny base")
    parser.add_argument("--workspace", default="/tmp/gradcodec-flare")
    args = parser.parse_args()
    job = build_job(args.spec, n_clients=args.clients, rounds=args.rounds, pretrained=args.pretrained)
    adapter = run_job(job, args.workspace)
    print(json.dumps({"spec": args.spec, "eval_loss": eval_loss(adapter, pretrained=args.pretrained)}))


if __name__ == "__main__":
    main()
