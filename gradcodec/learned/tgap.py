"""TGAP (Temporal-ensemble Gradient-Aware Pre-training): train the AE on snapshots of a LoRA fine-tuning.

    capture (integrations/fedlora/capture.py): round updates of many clients over the whole trajectory
        ──▶ normalised canvases (per-factor RMS, as the codec normalises) ──▶ AE, Adam, MSE ──▶ model file

"Temporal ensemble": the snapshots span the whole trajectory (early and late rounds, all clients), so the
AE sees every phase of training. The paper trains on the LoRA *state*; `representation="state"` does
that, for comparison only: we train and encode the round *update* (docs/results.md shows why).

Losses (on the normalised canvas, padding masked out): `mse` (the paper's), `nmse` (squared error over
the sample's energy: every snapshot counts alike) and `cosine` (1 - cos, direction only). Training
augments each batch by random sign flips (x and -x are equally likely updates).

The light `block` AE is linear up to its tanh, so it starts from the closed-form optimum of a linear
code, each tile position's principal components (`init="pca"`), scaled so its latents have standard
deviation 1/`PCA_SPREAD` (within tanh's near-linear range, a fine grid for the fixed-range codes); Adam
then adapts it to the tanh and the quantisation. From random weights at lr 2e-4 it needs many more steps.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from .. import kernels
from ..errors import InvalidInput
from .canvas import CanvasLayout
from .model import AEConfig, AutoEncoder
from .modelfile import LearnedModel

LOSSES = ("mse", "nmse", "cosine")
INITS = ("pca", "random")
PCA_SPREAD = 3.0
Named = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """How TGAP trains: Adam at `lr` (the paper's 2e-4) for `steps` batches of `batch_size` canvases."""

    loss: str = "mse"
    lr: float = 2e-4
    steps: int = 2000
    batch_size: int = 16
    seed: int = 0
    bits: int = 8  # latent quantisation simulated in training (0: none)
    weight_decay: float = 0.0
    init: str = "pca"  # block AE only

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise InvalidInput(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.init not in INITS:
            raise InvalidInput(f"init must be one of {INITS}, got {self.init!r}")
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise InvalidInput(f"need steps >= 0, batch_size >= 1, lr > 0; got {self.steps}, {self.batch_size}, {self.lr}")


def snapshots_from_capture(capture: Mapping, representation: str = "update") -> list[dict[str, torch.Tensor]]:
    """The named tensors of every record of a capture: its round `update` or its LoRA `state`."""
    if representation not in ("update", "state"):
        raise InvalidInput(f"representation must be 'update' or 'state', got {representation!r}")
    out = [dict(r[representation]) for r in capture["records"]]
    if not out or not all(out):
        raise InvalidInput(f"the capture holds no {representation} snapshots (captured with keep_states=False?)")
    return out


def normalised_canvases(snapshots: Sequence[Named], layout: CanvasLayout, shape: tuple[int, int]) -> torch.Tensor:
    """[N, *shape] float32: each snapshot's canvas with every factor divided by its RMS, as the codec does."""
    table = layout.table()
    out = torch.empty(len(snapshots), *shape)
    for i, named in enumerate(snapshots):
        layout.check(named)
        out[i] = kernels.canvas_pack(table, [t.float().contiguous() for t in named.values()], layout.height, shape)[0]
    return out


def canvas_mask(layout: CanvasLayout, shape: tuple[int, int]) -> torch.Tensor:
    """1 where a factor value sits, 0 on padding."""
    ones = [torch.ones(f.shape) for f in layout.factors]
    scales = torch.ones(len(ones))
    return kernels.canvas_pack(layout.table(), ones, layout.height, shape, scales=scales)[0]


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean over the batch of the chosen loss between canvases x_hat and x (padding masked out)."""
    err = (x_hat - x) * mask
    if loss == "mse":
        return err.square().sum() / (mask.sum() * x.shape[0])
    flat_hat, flat = (x_hat * mask).flatten(1), x.flatten(1)
    if loss == "nmse":
        return (err.flatten(1).square().sum(1) / flat.square().sum(1).clamp_min(1e-12)).mean()
    return (1 - torch.nn.functional.cosine_similarity(flat_hat, flat, dim=1, eps=1e-12)).mean()


def tiles_of(canvases: torch.Tensor, config: AEConfig) -> torch.Tensor:
    """[bands, groups, N, tile]: the block AE's tiles of N canvases (rows zero-padded to whole bands)."""
    h, w = config.padded_shape
    x = torch.nn.functional.pad(canvases, (0, 0, 0, h - canvases.shape[1]))
    t = x.reshape(len(x), h // config.block_rows, config.block_rows, w // config.block_cols, config.block_cols)
    return t.permute(1, 3, 0, 2, 4).reshape(h // config.block_rows, w // config.block_cols, len(x), -1)


@torch.no_grad()
def pca_init(ae: AutoEncoder, canvases: torch.Tensor) -> None:
    """Set a block AE to each tile position's top principal directions of `canvases` (uncentred:
    updates are sign-symmetric), latents scaled to standard deviation 1 / PCA_SPREAD."""
    cfg = ae.config
    tiles = tiles_of(canvases, cfg).double()
    _, s, vh = torch.linalg.svd(tiles, full_matrices=False)  # vh [bands, groups, min(N, tile), tile]
    k = min(cfg.latents, vh.shape[-2])
    basis = vh[..., :k, :]
    sd = (s[..., :k] / math.sqrt(len(canvases))).clamp_min(1e-6)
    enc_w = torch.zeros_like(ae.encoder.weight, dtype=torch.float64)
    dec_w = torch.zeros_like(ae.decoder.weight, dtype=torch.float64)
    enc_w[..., :k] = basis.transpose(-1, -2) / (PCA_SPREAD * sd[..., None, :])
    dec_w[..., :k, :] = basis * (PCA_SPREAD * sd[..., None])
    ae.encoder.weight.copy_(enc_w)
    ae.decoder.weight.copy_(dec_w)
    ae.encoder.bias.zero_()
    ae.decoder.bias.zero_()


def train_autoencoder(train: Sequence[Named], ae_config: AEConfig, config: TrainConfig = TrainConfig(),
                      held_out: Sequence[Named] = (), device: str | torch.device = "cpu",
                      progress: bool = False, log_every: int = 200) -> LearnedModel:
    """Train an AE of `ae_config` on `train` snapshots and return it frozen, with a training report.

    The report (`model.training`) holds the loss curve (every `log_every` steps), the held-out loss,
    and how long it took; the codec-level figures come from gradcodec.learned.evaluate.
    """
    if not train:
        raise InvalidInput("TGAP needs at least one training snapshot")
    layout = CanvasLayout.of(train[0], height=ae_config.canvas_height)
    if layout.digest() != ae_config.layout_digest:
        raise InvalidInput("the snapshots' layout is not the one the AE config was built for")
    x_train = normalised_canvases(train, layout, layout.shape).to(device)
    x_held = normalised_canvases(held_out, layout, layout.shape).to(device) if held_out else None
    mask = canvas_mask(layout, layout.shape).to(device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        ae = AutoEncoder(ae_config)
        if ae_config.arch == "block" and config.init == "pca":
            pca_init(ae, x_train.cpu())
        ae = ae.to(device)
        opt = torch.optim.Adam(ae.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        g = torch.Generator().manual_seed(config.seed)
        curve, started = [], time.perf_counter()
        ae.train()
        for step in range(config.steps):
            idx = torch.randint(0, len(x_train), (config.batch_size,), generator=g)
            signs = (torch.randint(0, 2, (config.batch_size, 1, 1), generator=g) * 2 - 1).float().to(device)
            x = x_train[idx.to(device)] * signs
            loss = reconstruction_loss(ae(x, config.bits), x, mask, config.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % log_every == 0 or step == config.steps - 1:
                curve.append([step, loss.item()])
                if progress:
                    print(f"step {step}/{config.steps}: {config.loss} {loss.item():.4f}", flush=True)
        ae.eval()
        report = {"train": asdict(config), "snapshots": len(train), "held_out": len(held_out), "curve": curve,
                  "seconds": round(time.perf_counter() - started, 1), "ratio": ae_config.ratio}
        if x_held is not None:
            with torch.no_grad():
                report["held_out_loss"] = float(sum(
                    reconstruction_loss(ae(x_held[i:i + 64], config.bits), x_held[i:i + 64], mask, config.loss)
                    * len(x_held[i:i + 64]) for i in range(0, len(x_held), 64)) / len(x_held))
    return LearnedModel.trained(ae_config, ae.encoder.cpu(), ae.decoder.cpu(), training=report)

