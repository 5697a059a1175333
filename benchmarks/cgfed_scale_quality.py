"""Why the shared cgfed AE keeps less of a held-out update than the per-factor block AE: the linear optimum
of each design, from the same TGAP and held-out captures (docs/results/cgfed-scale.md).

    python benchmarks/cgfed_scale_quality.py TGAP_CAPTURE EVAL_CAPTURE [--json OUT]

Every design below is, before its tanh and its 8-bit grid, an orthogonal projection P of each factor's
RMS-normalised tiles onto k = tile / 64 directions fitted on the TGAP updates (uncentred PCA, as
tgap.pca_init and tgap.fit_shared fit them). For a projection the decoded update's cosine with the true
one is sqrt(sum_f ||P x_f||² / sum_f ||x_f||²) (x_f in the update's own units), so the mean of that over
the held-out uploads is the cosine each design would reach with exact latents; the real codecs lose a
little more to tanh and quantisation (the block AE: 0.535 measured).

Designs, all at 1/64 of the adapter values:
  block            one basis per factor (per layer), tile = the whole factor: today's block AE (a GQA k/v B
                   factor, half the canvas height, gets a full-height tile's latents: 1/32 of its values)
  block-fair       the same with tile / 64 latents for every factor (the shared AE's latent count)
  perlayer-bN      one basis per (layer, band of N rows): the cost of bands alone
  shared-bN        one basis per (type, band) pooled over the layers: the shared AE (N=64 its default)
  mix-bN-mM        a shared M-direction basis per (type, band), and per layer the best k of its span
                   (a k x M matrix per (layer, band)): a per-layer part larger than a gain
  lsdec-bN[-mM]    the shared AE's encoder (the client's file and speed unchanged) with a per-layer
                   least-squares decoder D = G E (E^T G E)^-1 on the server (within a shared M-dim span:
                   M x k per (layer, band)); it uses how each layer's updates correlate with the pooled
                   directions, which an orthogonal projection cannot

The cosine column is computed from x_hat directly (for the projections it equals sqrt(kept energy)).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

LAYER = re.compile(r"\d+")


def updates(path: str) -> list[dict[str, torch.Tensor]]:
    cap = torch.load(path, map_location="cpu", weights_only=True)
    return [{k: v.double() for k, v in r["update"].items()} for r in cap["records"]]


_CACHE: dict = {}


def stacked_tiles(snaps: list[dict], name: str, band: int, normalise: bool) -> torch.Tensor:
    """[bands, N, tile] of factor `name` over the snapshots (each divided by its RMS if `normalise`), cached."""
    key = (id(snaps), name, band, normalise)
    if key not in _CACHE or _CACHE[key][0] is not snaps:  # the list is kept alive with its entry: ids stay unique
        _CACHE[key] = (snaps, torch.stack([band_tiles(u[name] / u[name].square().mean().sqrt().clamp_min(1e-30)
                                                      if normalise else u[name], band) for u in snaps], 1))
    return _CACHE[key][1]


def band_tiles(t: torch.Tensor, band: int) -> torch.Tensor:
    """[bands, tile] of one factor (long side cut into bands, the last zero-padded), own orientation."""
    a, b = t.shape
    long = max(a, b)
    bands = -(-long // band)
    if a < b:
        t = torch.nn.functional.pad(t, (0, bands * band - b))
        return t.view(a, bands, band).transpose(0, 1).reshape(bands, -1)
    t = torch.nn.functional.pad(t, (0, 0, 0, bands * band - a))
    return t.view(bands, band * b)


def types_of(names: list[str], shapes: dict[str, tuple[int, int]]) -> dict[tuple, list[str]]:
    out: dict[tuple, list[str]] = defaultdict(list)
    for n in names:
        out[(LAYER.sub("#", n), shapes[n])].append(n)
    return out


def top_of_tiles(t: torch.Tensor, k: int) -> torch.Tensor:
    """[bands, tile, k]: the top-k right singular vectors of tiles [bands, N, tile] (the top eigenvectors of
    their uncentred Gram, from an SVD of the tiles: cheaper than the Gram's eigh when N < tile)."""
    _, _, vh = torch.linalg.svd(t, full_matrices=False)
    v = vh.transpose(1, 2)[..., :k]
    if v.shape[-1] < k:  # fewer samples than latents: pad with zero directions
        v = torch.nn.functional.pad(v, (0, k - v.shape[-1]))
    return v


def ls_decoder(enc: torch.Tensor, t: torch.Tensor, within: torch.Tensor | None = None) -> torch.Tensor:
    """[bands, tile, k]: the least-squares decoder of latents z = enc^T x for tiles t [bands, N, tile],
    D = G E (E^T G E)^-1 with G = t^T t, optionally restricted to the span of the orthonormal `within`."""
    z = t @ enc  # [bands, N, k]
    zz = z.transpose(1, 2) @ z
    zz = zz + 1e-9 * zz.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(zz.shape[-1], dtype=zz.dtype)
    d = torch.linalg.solve(zz, z.transpose(1, 2) @ t).transpose(1, 2)
    return d if within is None else within @ (within.transpose(1, 2) @ d)


def fit(train: list[dict], design: str, band: int | None, m: int | None, ratio: float) -> dict[str, tuple]:
    """Per factor name, its (encoder [bands, tile, k], decoder [bands, tile, k]): z = E^T x, x_hat = D z."""
    names = list(train[0])
    shapes = {n: tuple(train[0][n].shape) for n in names}
    height = max(max(s) for s in shapes.values())  # the LoRA canvas's height
    out = {}
    for (_, shape), members in types_of(names, shapes).items():
        rank, long = min(shape), max(shape)
        b = long if design.startswith("block") else min(band, long)
        # the block AE's tile is a whole canvas column strip: a short (GQA k/v B) factor gets the latents
        # of a full-height one; block-fair gives it tile / 64 like the others
        k = round((height if design == "block" else b) * rank * ratio)
        tiles = {n: stacked_tiles(train, n, b, True) for n in members}  # [bands, N, tile]
        pooled = torch.cat(list(tiles.values()), 1)
        if design in ("block", "block-fair", "perlayer"):
            for n in members:
                e = top_of_tiles(tiles[n], k)
                out[n] = (e, e)
        elif design == "shared":
            e = top_of_tiles(pooled, k)
            for n in members:
                out[n] = (e, e)
        elif design == "mix":  # shared M-dim span, per layer its best k directions within it (enc and dec)
            u = top_of_tiles(pooled, min(m, b * rank))
            for n in members:
                e = u @ top_of_tiles(tiles[n] @ u, k)
                out[n] = (e, e)
        elif design == "lsdec":  # shared encoder; per layer a least-squares decoder (in a shared M-dim span)
            e = top_of_tiles(pooled, k)
            u = top_of_tiles(pooled, min(m, b * rank)) if m else None
            for n in members:
                out[n] = (e, ls_decoder(e, tiles[n], u))
        else:
            raise ValueError(design)
    return out


def held_out_cosine(codes: dict[str, tuple], held: list[dict]) -> tuple[float, float]:
    """Mean over uploads of cos(x, x_hat), and 1 - pooled relative squared error (the kept energy)."""
    dot = total = dec = err = 0
    for n, (e, d) in codes.items():
        band = e.shape[1] // min(held[0][n].shape)
        t = stacked_tiles(held, n, band, False)  # [bands, N, tile], raw units: the RMS scale cancels
        y = (t @ e) @ d.transpose(1, 2)
        dot = dot + (t * y).sum((0, 2))
        total = total + t.square().sum((0, 2))
        dec = dec + y.square().sum((0, 2))
        err = err + (t - y).square().sum((0, 2))
    cos = dot / (total * dec).sqrt().clamp_min(1e-300)
    return cos.mean().item(), 1 - (err.sum() / total.sum()).item()


def real_shared(tgap: str, held_out: str, band: int, ratio: float, equal_latents: bool) -> dict:
    """A real shared AE (tgap.fit_shared, streamed) through the real codec on the held-out uploads.

    equal_latents: each type gets the block AE's latents per factor (canvas height x rank x ratio, split
    over its bands), i.e. the grouped-query k/v B factors twice tile / 64: the block AE's latent count."""
    import dataclasses

    import gradcodec
    from gradcodec.learned.canvas import CanvasLayout
    from gradcodec.learned.evaluate import data_bytes, evaluate_uplink
    from gradcodec.learned.model import AEConfig
    from gradcodec.learned.tgap import CaptureSnapshots, fit_shared

    held = list(CaptureSnapshots([held_out]).records())
    layout = CanvasLayout.of(dict(held[0]["update"]))
    cfg = AEConfig.shared(layout, ratio, band)
    if equal_latents:
        types = []
        for (pat, a, b, n, bd, k) in cfg.types:
            per_factor = layout.height * min(a, b) * ratio
            types.append((pat, a, b, n, bd, round(per_factor / -(-max(a, b) // bd))))
        cfg = dataclasses.replace(cfg, types=tuple(types))
    model = fit_shared(CaptureSnapshots([tgap]), cfg)
    rep = evaluate_uplink(lambda: gradcodec.get_codec("cgfed", model=model), held)
    rep["data_bytes_one"] = data_bytes(gradcodec.get_codec("cgfed", model=model).encode(dict(held[0]["update"])))
    rep["latents"] = cfg.latent_numel
    return rep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tgap")
    p.add_argument("held_out")
    p.add_argument("--ratio", type=float, default=1 / 64)
    p.add_argument("--designs", default="block,block-fair,perlayer-b128,perlayer-b64,perlayer-b32,shared-b128,shared-b64,"
                                        "shared-b32,mix-b64-m16,mix-b64-m32,lsdec-b64,lsdec-b64-m16,lsdec-b64-m32")
    p.add_argument("--real", default="", help="also fit real shared AEs and run the codec: comma-separated "
                   "bN (default latents) or bN-eq (the block AE's latent count), e.g. b64,b64-eq")
    p.add_argument("--json")
    args = p.parse_args()
    t0 = time.perf_counter()
    train, held = updates(args.tgap), updates(args.held_out)
    layers = len({LAYER.findall(n)[0] for n in train[0] if LAYER.findall(n)})
    rows = []
    for design in args.designs.split(","):
        parts = design.replace("block-fair", "blockfair").split("-")
        parts[0] = parts[0].replace("blockfair", "block-fair")
        band = int(parts[1][1:]) if len(parts) > 1 else None
        m = int(parts[2][1:]) if len(parts) > 2 else None
        codes = fit(train, parts[0], band, m, args.ratio)
        cos, energy = held_out_cosine(codes, held)
        train_cos, _ = held_out_cosine(codes, train)
        rows.append({"design": design, "held_out_cosine": cos, "held_out_energy": energy, "train_cosine": train_cos})
        print(f"{design:14} held-out cos {cos:.4f}  energy {energy:.3f}  (TGAP cos {train_cos:.4f})", flush=True)
    real = []
    for item in filter(None, args.real.split(",")):
        band = int(item.split("-")[0][1:])
        rep = real_shared(args.tgap, args.held_out, band, args.ratio, item.endswith("-eq"))
        real.append({"variant": f"shared {item}", **rep})
        print(f"real shared {item:8} latents {rep['latents']}  cos {rep['cosine']:.4f}  rel_l2 {rep['rel_l2']:.4f}  "
              f"data bytes {rep['data_bytes_one']}", flush=True)
    out = {"command": "python " + " ".join(sys.argv), "tgap_updates": len(train), "held_out_updates": len(held),
           "layers": layers, "ratio": args.ratio, "wall_s": time.perf_counter() - t0, "rows": rows,
           "real_codec": real}
    out["machine"] = "2-core CPU shared with other jobs"
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
