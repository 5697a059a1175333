"""`gradcodec capture`, `gradcodec train-ae` and `gradcodec eval-ae`: the learned codec's commands.

    gradcodec capture --rounds 60 --out runs/capture-tgap.pt                    # TGAP snapshots (tiny, CPU)
    gradcodec capture --rounds 30 --seed 1 --data-seed 1 --out runs/capture-eval.pt   # held-out trajectory
    gradcodec train-ae --capture runs/capture-tgap.pt --held-out runs/capture-eval.pt --ratio 1/64 --out runs/ae.safetensors
    gradcodec eval-ae --capture runs/capture-eval.pt --model runs/ae.safetensors --baselines

Registering only defines arguments; torch and the learned modules are imported when a command runs.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from fractions import Fraction
from pathlib import Path


def parse_ratio(text: str) -> float:
    """'1/64' or '0.015625' -> 0.015625."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"ratio {text!r} is not a fraction such as 1/64") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1], got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("capture", help="record round updates of a federated LoRA fine-tuning (TGAP snapshots)")
    c.add_argument("--out", required=True, help="capture file to write (torch.save)")
    c.add_argument("--model", default="tiny", help="preset name or local checkpoint directory")
    c.add_argument("--random-base", action="store_true", help="a preset with random weights instead of the pre-trained base")
    c.add_argument("--data", help="Alpaca/Dolly JSON or JSONL file (default: the generated task suite)")
    for name, default in [("examples", 4000), ("eval-examples", 0), ("rank", 8), ("num-clients", 20),
                          ("clients-per-round", 4), ("rounds", 30), ("local-steps", 10), ("batch-size", 16),
                          ("max-length", 128), ("lora-seed", 0), ("seed", 0), ("data-seed", 0)]:
        c.add_argument(f"--{name}", type=int, default=default)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--lora-alpha", type=float, default=16)
    c.add_argument("--dirichlet-alpha", type=float, default=0.5)
    c.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated LoRA target modules")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--no-states", action="store_true", help="record updates only (halves the file)")
    c.add_argument("--codec", help="run with this codec on the uplink (FAF when cgfed): the server averages decoded updates")
    c.add_argument("--codec-model", help="the AE file for --codec cgfed")
    c.add_argument("--error-feedback", action="store_true", help="clients keep error-feedback residuals")
    c.add_argument("--canvas", action="store_true", help="apply --codec to the whole LoRA canvas as one matrix")
    c.set_defaults(run=run_capture)

    t = sub.add_parser("train-ae", help="TGAP: train the cgfed AutoEncoder on captured round updates")
    t.add_argument("--capture", action="append", required=True, help="capture file(s) to train on")
    t.add_argument("--held-out", help="capture of other clients to report quality on (default: hold out every 5th client)")
    t.add_argument("--out", required=True, help="model file (encoder + decoder)")
    t.add_argument("--encoder-out", help="also write an encoder-only file (for clients)")
    t.add_argument("--decoder-out", help="also write a decoder-only file (for the server)")
    t.add_argument("--arch", default="block", choices=["block", "conv", "shared"],
                   help="block: per-position tiles (small adapters); shared: weights shared across layers (1B-70B); "
                        "conv: the paper's AE")
    t.add_argument("--ratio", type=parse_ratio, default=parse_ratio("1/64"), help="latent / canvas values, e.g. 1/64")
    t.add_argument("--representation", default="update", choices=["update", "state"],
                   help="what the AE encodes: the round update (ours) or the LoRA state (the paper's)")
    t.add_argument("--loss", default="mse", choices=["mse", "nmse", "cosine"])
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--steps", type=int, default=None, help="Adam steps (default: 0 for block after its PCA start, 1000 for conv)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--init", default="pca", choices=["pca", "random"], help="block AE start")
    t.add_argument("--stages", type=int, default=6, help="conv: stride-2 stages")
    t.add_argument("--width", type=int, default=8, help="conv: channels of the first stage (doubling, capped at --max-channels)")
    t.add_argument("--max-channels", type=int, default=64)
    t.add_argument("--block-rows", type=int, help="block: tile rows (default: the canvas height); shared: band "
                                                      "length along each factor's long side (default: 512 / rank)")
    t.add_argument("--block-cols", type=int, help="block: tile columns (default: the LoRA rank)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    t.set_defaults(run=run_train)

    e = sub.add_parser("eval-ae", help="held-out quality of cgfed models next to classic codecs at the same bytes")
    e.add_argument("--capture", required=True, help="capture of held-out clients/rounds")
    e.add_argument("--model", action="append", required=True, help="model file(s) to evaluate")
    e.add_argument("--residual", type=float, default=0.01, help="top-k ratio of the residual stage row (0: no such row)")
    e.add_argument("--baselines", action="store_true", help="add top-k / PowerSGD / int4 rows at the same bytes")
    e.add_argument("--rounds", help="evaluate only rounds lo:hi of the capture")
    e.add_argument("--faf-calibration-rounds", type=int, default=0,
                   help="FAF: adapt each decoder on calibration pairs from the capture's first N rounds, then compare "
                        "TGAP and adapted decoders on the remaining rounds")
    e.add_argument("--faf-ridge", type=float, default=10.0, help="FAF: ridge weight pulling the refit towards the TGAP decoder")
    e.add_argument("--json", help="write the rows to this JSON file")
    e.add_argument("--threads", type=int, default=0)
    e.set_defaults(run=run_eval)


def _command() -> str:
    return "gradcodec " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run_capture(args: argparse.Namespace) -> int:
    from ..capture import save_capture
    from ..integrations.fedlora.capture import CaptureConfig, run_federated

    config = CaptureConfig(
        model=args.model, pretrained=not args.random_base, data=args.data, examples=args.examples,
        eval_examples=args.eval_examples, rank=args.rank, lora_alpha=args.lora_alpha,
        targets=tuple(t for t in args.targets.split(",") if t), num_clients=args.num_clients,
        clients_per_round=args.clients_per_round, rounds=args.rounds, local_steps=args.local_steps, lr=args.lr,
        batch_size=args.batch_size, max_length=args.max_length, dirichlet_alpha=args.dirichlet_alpha,
        lora_seed=args.lora_seed, seed=args.seed, data_seed=args.data_seed, device=args.device, dtype=args.dtype,
        keep_states=not args.no_states,
    )
    transmit, sizes = _uplink(args) if args.codec else (None, [])
    capture = run_federated(config, transmit=transmit, progress=True)
    if args.codec:
        capture["uplink"] = {"codec": args.codec, "model": args.codec_model, "error_feedback": args.error_feedback,
                             "canvas": args.canvas, "bytes": sizes}
        print(f"uplink {args.codec}: {sum(sizes) / len(sizes):.0f} bytes per upload on average")
    save_capture(capture, args.out)
    print(f"wrote {len(capture['records'])} records to {args.out}")
    return 0


def _uplink(args: argparse.Namespace):
    """transmit(client, round, update) through one codec object per client, and the list of payload sizes."""
    import gradcodec

    from .canvas import CanvasLayout
    from .evaluate import CanvasCodec

    params = {"model": args.codec_model} if args.codec_model else {}
    codecs, sizes = {}, []

    def transmit(client: int, rnd: int, update: dict) -> dict:
        if client not in codecs:
            codec = gradcodec.get_codec(args.codec, error_feedback=args.error_feedback, seed=client, **params)
            codecs[client] = CanvasCodec(codec, CanvasLayout.of(update)) if args.canvas else codec
        blob = codecs[client].encode(update)
        sizes.append(len(blob))
        return codecs[client].decode(blob)

    return transmit, sizes


def _split(records: list, held_out_path: str | None):
    from ..capture import load_capture

    if held_out_path:
        return records, load_capture(held_out_path)["records"]
    clients = sorted({r["client"] for r in records}, reverse=True)
    held = set(clients[::5])  # every 5th client, the highest id first
    train = [r for r in records if r["client"] not in held]
    if not train:
        raise ValueError("the capture has a single client: pass --held-out with another capture")
    return train, [r for r in records if r["client"] in held]


def run_train(args: argparse.Namespace) -> int:
    import torch

    from ..capture import load_capture
    from .canvas import CanvasLayout
    from .evaluate import evaluate_uplink, format_table
    from .model import AEConfig
    from .tgap import TrainConfig, train_autoencoder

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arch == "shared":  # streamed from the capture files: never all snapshots in memory
        from .tgap import CaptureSnapshots

        records = list(CaptureSnapshots(args.capture).records())  # memory-mapped: tensors are read when used
        if args.held_out:
            train, held = records, list(CaptureSnapshots([args.held_out]).records())
        else:
            train, held = _split(records, None)
        train_clients = {r["client"] for r in train}
        snapshots = CaptureSnapshots(args.capture, args.representation, keep=lambda r: r["client"] in train_clients)
        layout = CanvasLayout.of(dict(train[0][args.representation]))
    else:
        records = [r for path in args.capture for r in load_capture(path)["records"]]
        train, held = _split(records, args.held_out)
        snapshots = [dict(r[args.representation]) for r in train]
        layout = CanvasLayout.of(snapshots[0])
    if args.arch == "shared":
        ae_config = AEConfig.shared(layout, args.ratio, args.block_rows)
    elif args.arch == "conv":
        ae_config = AEConfig.conv(layout, args.ratio, stages=args.stages, width=args.width, max_channels=args.max_channels)
    else:
        ae_config = AEConfig.block(layout, args.ratio, args.block_rows, args.block_cols)
    steps = args.steps if args.steps is not None else (1000 if args.arch == "conv" else 0)
    config = TrainConfig(loss=args.loss, lr=args.lr, steps=steps, batch_size=args.batch_size, seed=args.seed, init=args.init)
    print(f"TGAP: {len(train)} {args.representation} snapshots, canvas {layout.shape}, {args.arch} AE, "
          f"latent {ae_config.latent_shape} (ratio 1/{round(1 / ae_config.ratio)})", flush=True)
    model = train_autoencoder(snapshots, ae_config, config, device=args.device, progress=True)

    import gradcodec

    report = evaluate_uplink(lambda: gradcodec.get_codec("cgfed", model=model), held, args.representation)
    model.training.update(representation=args.representation, held_out=report, command=_command())
    model.save(args.out)
    for path, parts in [(args.encoder_out, ("encoder",)), (args.decoder_out, ("decoder",))]:
        if path:
            model.save(path, parts=parts)
    print(f"wrote {args.out} (fingerprint {model.fingerprint.hex()}); held-out ({len(held)} uploads):")
    print(format_table([{**report, "name": f"cgfed {args.arch} ({args.representation})",
                         "ratio": f"1/{round(1 / ae_config.ratio)}"}]))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    import gradcodec

    from ..capture import load_capture
    from .evaluate import evaluate_uplink, evaluation_rows, format_table, reference_rows
    from .faf import calibrated
    from .modelfile import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    records = load_capture(args.capture)["records"]
    if args.rounds:
        lo, hi = (int(v) for v in args.rounds.split(":"))
        records = [r for r in records if lo <= r["round"] < hi]

    def show(row: dict) -> None:
        print(format_table([row]).splitlines()[-1], flush=True)

    rows = []
    calibration = [r for r in records if r["round"] < args.faf_calibration_rounds]
    records = [r for r in records if r["round"] >= args.faf_calibration_rounds]
    for path in args.model:
        model = load_model(path)
        rows += evaluation_rows(model, records, residual=args.residual, baselines=args.baselines, progress=show)
        if calibration and model.training.get("representation", "update") == "update":
            adapted = calibrated(model, calibration, ridge=args.faf_ridge)
            for ef in (False, True):
                row = {"name": f"cgfed {model.config.arch} (update), FAF decoder ({len(calibration)} pairs)",
                       "ratio": f"1/{round(1 / model.config.ratio)}", "ef": ef,
                       **evaluate_uplink(lambda: gradcodec.get_codec("cgfed", model=adapted, error_feedback=ef), records)}
                rows.append(row)
                show(row)
    if args.baselines:
        rows += reference_rows(records, progress=show)
    print(f"\n# {_command()}\n# {len(records)} uploads from {args.capture}\n")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": _command(), "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0
