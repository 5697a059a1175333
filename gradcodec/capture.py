"""Capture files: round updates recorded from a federated LoRA fine-tuning.

They feed the learned codec's pre-training (TGAP, gradcodec.learned.tgap) and the benchmark's
real-update workloads (`gradcodec bench --workload file:runs/capture.pt`). They are written by
`gradcodec capture` (gradcodec.integrations.fedlora.capture) and read here, so that gradcodec itself
needs nothing from the integrations to use them. Layout (torch.save, loadable with weights_only=True):

    {"format": "gradcodec-capture-v1",
     "config":  the capture run's configuration as a dict,
     "records": [{"round": int, "client": int, "num_examples": int, "loss": float,
                  "update": {name: float32 tensor}, "state": {name: float32 tensor}}, ...],
     "history": [{"round": int, "eval_loss": float, "eval_accuracy": float}, ...]}

"update" is a client's round update (its adapter minus the global adapter it started from): what a
codec should encode. "state" is its local LoRA state: what the CG-FedLLM paper fed its AutoEncoder.
Records are in upload order (round, then client).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "gradcodec-capture-v1"


def save_capture(capture: dict, path: str | os.PathLike) -> None:
    """Write a capture atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(capture, partial)
    os.replace(partial, path)


def is_capture(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_capture(path: str | os.PathLike) -> dict:
    """Read a capture file, checking its format tag and record fields."""
    obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not is_capture(obj):
        tag = obj.get("format") if isinstance(obj, dict) else None
        raise ValueError(f"{path} is not a {FORMAT} capture file (format tag {tag!r})")
    check_records(obj, str(path))
    return obj


def check_records(obj: dict, where: str) -> None:
    for i, r in enumerate(obj.get("records", [])):
        if not {"round", "client", "update"} <= set(r):
            raise ValueError(f"{where}: record {i} lacks round, client or update")
