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

The `shared` AE is fitted in closed form only (`fit_shared`): per (factor type, band), the principal
directions of that band's tiles pooled over every layer and snapshot, then one gain per (layer, band)
that brings each layer's latents to the common spread. It streams: each pass reads the snapshots one
at a time (`CaptureSnapshots` iterates a capture file memory-mapped, record by record) and keeps only
a Gram matrix per band, so memory is bounded by one snapshot plus the Grams (`max_gram_bytes`, types
taken in chunks that fit, one pass per chunk), whatever the capture's length.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from .. import kernels
from ..errors import InvalidInput
from .canvas import CanvasLayout
from .model import AEConfig, AutoEncoder, band_stack, factor_types, safe_scales
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
    if ae_config.arch == "shared":
        if config.steps:
            raise InvalidInput("the shared AE is fitted in closed form (PCA): train it with steps=0 (--steps 0)")
        return fit_shared(train, ae_config, progress=progress)
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



class CaptureSnapshots:
    """The `representation` snapshots of capture files, streamed: each iteration maps the files
    (torch.load with mmap=True) and yields one record's tensors at a time, so only the records being
    used are read into memory. `keep(record)` selects records (e.g. by client)."""

    def __init__(self, paths: Sequence[str | os.PathLike], representation: str = "update", keep=None):
        if representation not in ("update", "state"):
            raise InvalidInput(f"representation must be 'update' or 'state', got {representation!r}")
        self.paths, self.representation, self.keep = list(paths), representation, keep

    def records(self) -> Iterator[Mapping]:
        from ..capture import check_records, is_capture

        for path in self.paths:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not is_capture(obj):
                raise InvalidInput(f"{path} is not a gradcodec capture file")
            check_records(obj, str(path))
            for r in obj["records"]:
                if self.keep is None or self.keep(r):
                    yield r

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for r in self.records():
            if not r.get(self.representation):
                raise InvalidInput(f"a capture record holds no {self.representation} (captured with --no-states?)")
            yield dict(r[self.representation])


def _type_tiles(tensors: list[torch.Tensor], members: Sequence[int], band: int) -> torch.Tensor:
    """One type's band-major tiles [bands, layers, tile], each factor divided by its RMS as the codec does."""
    x = [tensors[i].float() for i in members]
    s = torch.stack([torch.linalg.vector_norm(t) for t in x]) / math.sqrt(x[0].numel())
    return band_stack(x, band) / safe_scales(s)[:, None]


@torch.no_grad()
def fit_shared(snapshots: Iterable[Named], ae_config: AEConfig, max_gram_bytes: int = 1 << 30,
               progress: bool = False) -> LearnedModel:
    """The shared AE fitted to `snapshots` (re-iterable: a list or CaptureSnapshots) in streaming passes.

    Per (type, band): the top `latents` eigenvectors of the uncentred Gram of its tiles over all
    layers and snapshots, scaled as pca_init scales the block AE's; then per (band, layer) a gain so
    that layer's latents have standard deviation 1 / PCA_SPREAD. Two passes per chunk of types whose
    Grams fit in `max_gram_bytes` (float32)."""
    if ae_config.arch != "shared":
        raise InvalidInput(f"fit_shared fits the shared AE, not {ae_config.arch!r}")
    started = time.perf_counter()
    ae = AutoEncoder(ae_config)
    layout, types, chunks, count = None, None, [[]], 0
    for cfg_type in ae_config.types:
        _, a, b, _, band, _ = cfg_type
        need = -(-max(a, b) // band) * (band * min(a, b)) ** 2 * 4
        if chunks[-1] and sum(c[1] for c in chunks[-1]) + need > max_gram_bytes:
            chunks.append([])
        chunks[-1].append((len([t for c in chunks for t in c]), need))
    for chunk in chunks:
        index = [i for i, _ in chunk]
        grams = {i: torch.zeros(ae.encoder.weight[i].shape[0], ae.encoder.weight[i].shape[2],
                                ae.encoder.weight[i].shape[2]) for i in index}
        count = 0
        for named in snapshots:
            if layout is None:
                layout = CanvasLayout.of(named, height=ae_config.canvas_height)
                if layout.digest() != ae_config.layout_digest:
                    raise InvalidInput("the snapshots' layout is not the one the AE config was built for")
                types = factor_types(layout)
            layout.check(named)
            tensors = list(named.values())
            for i in index:
                t = _type_tiles(tensors, types[i].members, ae_config.types[i][4])
                grams[i].baddbmm_(t.transpose(1, 2), t)
            count += 1
        if not count:
            raise InvalidInput("TGAP needs at least one training snapshot")
        samples = {}
        for i in index:
            evals, evecs = torch.linalg.eigh(grams.pop(i).double())  # ascending
            k = ae_config.types[i][5]
            basis = evecs.flip(-1)[..., :k]  # [bands, tile, k]
            n = count * ae_config.types[i][3]
            sd = (evals.flip(-1)[..., :k].clamp_min(0) / n).sqrt().clamp_min(1e-6)  # [bands, k]
            ae.encoder.weight[i].copy_((basis / (PCA_SPREAD * sd[:, None, :])).transpose(1, 2))
            ae.decoder.weight[i].copy_(basis.transpose(1, 2) * (PCA_SPREAD * sd[..., None]))
            samples[i] = torch.zeros(basis.shape[0], ae_config.types[i][3], dtype=torch.float64)
        for named in snapshots:  # per (layer, band) spread of the latents
            tensors = list(named.values())
            for i in index:
                z = torch.bmm(_type_tiles(tensors, types[i].members, ae_config.types[i][4]),
                              ae.encoder.weight[i].transpose(1, 2))
                samples[i] += z.double().square().mean(-1)
        for i in index:
            rms = (samples[i] / count).sqrt()
            gain = torch.where(rms > 1e-12, 1 / (PCA_SPREAD * rms), torch.ones_like(rms)).clamp(0.01, 100)
            ae.encoder.gain[i].copy_(gain)
            ae.decoder.gain[i].copy_(1 / gain)
        if progress:
            print(f"fitted {len(index)} of {len(ae_config.types)} factor types ({count} snapshots)", flush=True)
    report = {"fit": "shared PCA (streaming)", "snapshots": count, "ratio": ae_config.ratio,
              "seconds": round(time.perf_counter() - started, 1), "max_gram_bytes": max_gram_bytes}
    return LearnedModel.trained(ae_config, ae.encoder, ae.decoder, training=report)
