"""FAF (Federated AutoEncoder-involved Fine-tuning): the learned codec in the federated loop.

In the paper the AE sits on the uplink while federated fine-tuning continues on new data. In gradcodec
that means three things, each optional:

1. Clients encode their round update with `cgfed` (`FAFClient`), an encoder-only model file being
   enough. With `error_feedback=True` a client keeps what the AE missed and sends it in later rounds;
   this needs the decoder on the client too (to know what the server decodes) and pays off with the
   residual stage (`residual=R`): the AE's code is a fixed learned subspace, so what it misses once it
   misses every time, and only the top-k residual stage can deliver it (docs/results.md).
2. The server decodes and averages (`FAFServer.decode` / `aggregate`), refusing payloads of another AE.
3. The server keeps adapting its *decoder* to the updates of this federation, on pairs it can verify:
   in calibration rounds a client also sends its encoded input through a classic codec with a bound
   (`FAFClient.upload(..., calibrate=True)`, int8 by default), and `FAFServer.adapt()` refits the
   decoder on the (latent, reference) pairs seen so far. The encoder never changes, so clients download
   nothing and the payloads keep their fingerprint; the adapted decoder is a new *revision* of the same
   code (saved with `FAFServer.model.save`). The light AE's decoder is refit in closed form (per tile
   position, ridge regression towards the TGAP decoder); the conv AE's by Adam steps.

What FAF does not do: retrain the encoder during a federation (every client would need the new one
at the same round). Retrain with TGAP between federations instead; the new AE has a new fingerprint.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

from .. import api, kernels, registry
from ..codec import as_named, unpack
from ..codecs.learned import CGFedCodec
from ..errors import InvalidInput
from ..feedback import ErrorFeedback
from .canvas import CanvasLayout
from .model import LATENT_QMAX
from .modelfile import LearnedModel, load_model
from .tgap import tiles_of

Named = dict[str, torch.Tensor]


class FAFClient:
    """A client's uplink: `upload(update)` -> cgfed bytes (plus a reference payload when calibrating).

    model: the AE file (encoder-only is enough without error feedback and residual stage).
    reference: the classic codec spec of calibration payloads (its error bound is what the server trusts).
    """

    def __init__(self, model, *, bits: int = 8, residual: float = 0.0, error_feedback: bool = False,
                 reference: str = "int8", seed: int | None = None):
        self.codec = api.get_codec("cgfed", model=load_model(model), bits=bits, residual=residual,
                                   error_feedback=error_feedback, seed=seed)
        self.reference = reference

    def upload(self, update: Mapping[str, torch.Tensor], calibrate: bool = False) -> bytes | tuple[bytes, bytes]:
        """The payload of `update`; with `calibrate`, also `reference`'s payload of the very input the
        AE encodes (update + residual under error feedback)."""
        if not calibrate:
            return self.codec.encode(dict(update))
        named, _ = as_named(dict(update))
        residuals = self.codec.residuals if isinstance(self.codec, ErrorFeedback) else {}
        encoded_input = {k: v.float() + residuals[k] if k in residuals else v for k, v in named.items()}
        reference = api.encode(encoded_input, self.reference)
        return self.codec.encode(named), reference

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Error-feedback residuals to keep across restarts (empty without error feedback)."""
        return self.codec.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.codec.load_state_dict(state)


class FAFServer:
    """Decodes cgfed payloads, averages them, and adapts its decoder on verified pairs.

    models: decoder (or full) model files / LearnedModels; payloads of other fingerprints raise ModelMismatch.
    """

    def __init__(self, models: Sequence):
        self.models = [load_model(m, parts=("decoder",)) for m in models]
        for m in self.models:
            if m.config.arch == "shared":
                raise InvalidInput("FAF adapts conv and block decoders; the shared AE (arch 'shared') has no decoder"
                                   " adaptation yet: use it without FAF")
        self.pairs: dict[bytes, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def _codec_for(self, blob: bytes) -> CGFedCodec:
        msg_spec = api.inspect(blob).codec
        _, codec, _ = registry.build(msg_spec, resources={"models": self.models})
        if not isinstance(codec, CGFedCodec):
            raise InvalidInput(f"FAFServer decodes cgfed payloads, not {msg_spec!r}")
        return codec

    def decode(self, blob: bytes, device: str | torch.device | None = None) -> Named:
        return self._codec_for(blob).decode(blob, device)

    def aggregate(self, blobs: Sequence[bytes], weights: Sequence[float]) -> Named:
        """FedAvg (weighted mean) of the decoded updates."""
        total = float(sum(weights))
        if not blobs or len(blobs) != len(weights) or not total > 0:
            raise InvalidInput("aggregate needs one positive-sum weight per payload")
        out: Named = {}
        for blob, w in zip(blobs, weights):
            for k, v in self.decode(blob).items():
                out[k] = out[k] + v.double() * (w / total) if k in out else v.double() * (w / total)
        return {k: v.float() for k, v in out.items()}

    # ------------------------------------------------------------------ decoder adaptation
    def observe(self, blob: bytes, reference: bytes) -> None:
        """Record a verified pair: a cgfed payload and a reference payload of the same input."""
        codec = self._codec_for(blob)
        msg = unpack(blob)
        model = codec.model_for(msg.fingerprint)
        target = api.decode(reference)
        floats = {e.name: e.shape for e in msg.tensors if e.dtype.is_floating_point}
        if not isinstance(target, dict) or {k: tuple(v.shape) for k, v in target.items() if k in floats} != floats:
            raise InvalidInput("the reference payload does not hold the same tensors as the cgfed payload")
        layout = CanvasLayout.for_shapes(floats, height=model.config.canvas_height)
        scales = msg.shared[0].clone()
        canvas = kernels.canvas_pack(layout.table(), [target[k].float().contiguous() for k in floats], layout.height,
                                     model.config.padded_shape, scales=scales)[0]
        self.pairs.setdefault(model.fingerprint, []).append((self._latent(codec, model, msg), canvas, scales))

    @staticmethod
    def _latent(codec: CGFedCodec, model: LearnedModel, msg) -> torch.Tensor:
        cfg = model.config
        codes = msg.shared[1]
        if cfg.arch == "conv":
            z = kernels.dequantize_blockwise(codes, msg.shared[2], codec.bits, codec.latent_block, cfg.latent_numel)
            return z.view(cfg.latent_shape).clone()
        if codec.bits == 4:
            codes = kernels.unpack_bits(codes, 4, cfg.latent_numel) - 8
        return (codes.float() / LATENT_QMAX[codec.bits]).view(cfg.latent_shape)

    def adapt(self, fingerprint: bytes | None = None, ridge: float = 1.0, steps: int = 200, lr: float = 1e-4) -> LearnedModel:
        """Refit the decoder of `fingerprint` (default: the only one with pairs) on the observed pairs and
        use it from now on; returns the new revision (save it with `.save(path, parts=("decoder",))`).

        Light AE: per tile position, ridge regression of the tile on [latents, 1] pulled towards the
        current decoder with weight `ridge` (few pairs barely move it). Conv AE: `steps` Adam steps at `lr`.
        """
        if not self.pairs:
            raise InvalidInput("no verified pairs observed yet: send calibration uploads first")
        if fingerprint is None:
            if len(self.pairs) != 1:
                raise InvalidInput("pass the fingerprint of the AE to adapt (pairs were seen for several)")
            fingerprint = next(iter(self.pairs))
        pairs = self.pairs.get(fingerprint)
        if not pairs:
            raise InvalidInput("no verified pairs observed for this AE yet: send calibration uploads first")
        index = next(i for i, m in enumerate(self.models) if m.fingerprint == fingerprint)
        model = self.models[index]
        decoder = copy.deepcopy(model.decoder)
        latents = torch.stack([p[0] for p in pairs])
        canvases = torch.stack([p[1] for p in pairs])[:, : model.config.canvas_height]
        if model.config.arch == "block":
            _ridge_refit(decoder, latents, tiles_of(canvases, model.config), ridge)
        else:
            _adam_refit(decoder, latents, canvases, steps, lr)
        adapted = LearnedModel(model.config, None, decoder.eval(), dict(model.code_hashes), model.revision + 1,
                               None, {**model.training, "faf_pairs": len(pairs)})
        self.models[index] = adapted
        return adapted


@torch.no_grad()
def _ridge_refit(decoder, latents: torch.Tensor, tiles: torch.Tensor, ridge: float) -> None:
    """decoder.weight[b, g] [K, tile], bias [tile] <- argmin ||[L, 1] W - T||² + ridge ||W - W0||²."""
    lat = latents.permute(1, 2, 0, 3).double()  # [bands, groups, n, K]
    x = torch.cat([lat, torch.ones(*lat.shape[:3], 1, dtype=lat.dtype)], dim=-1)
    w0 = torch.cat([decoder.weight.double(), decoder.bias.double()[:, :, None, :]], dim=2)  # [b, g, K+1, tile]
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    lhs = x.transpose(-1, -2) @ x + ridge * eye
    rhs = x.transpose(-1, -2) @ tiles.double() + ridge * w0
    w = torch.linalg.solve(lhs, rhs)
    decoder.weight.copy_(w[:, :, :-1])
    decoder.bias.copy_(w[:, :, -1])


def _adam_refit(decoder, latents: torch.Tensor, canvases: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    decoder.train()
    for _ in range(steps):
        loss = (decoder(latents) - canvases).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def calibrated(model: LearnedModel, records: Sequence[Mapping], ridge: float = 10.0, steps: int = 200,
               lr: float = 1e-4) -> LearnedModel:
    """`model` with its decoder adapted on calibration uploads of capture `records` (each client sends
    its update through cgfed and int8): the FAF experiment of docs/results.md."""
    server, clients = FAFServer([model]), {}
    for rec in records:
        client = clients.setdefault(rec["client"], FAFClient(model))
        server.observe(*client.upload(dict(rec["update"]), calibrate=True))
    adapted = server.adapt(ridge=ridge, steps=steps, lr=lr)
    return LearnedModel(model.config, model.encoder, adapted.decoder, dict(model.code_hashes), adapted.revision,
                        None, adapted.training)
