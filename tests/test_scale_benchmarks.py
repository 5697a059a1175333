"""benchmarks/cgfed_scale_quality.py (linear optimum of the AE designs) and benchmarks/llama_scale_codecs.py
(interleaved codec timing), on small inputs."""
import importlib.util
import math
from pathlib import Path

import torch

from gradcodec import api

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quality = _load("cgfed_scale_quality")
codecs = _load("llama_scale_codecs")

SHAPES = {f"model.layers.{l}.self_attn.{p}_proj.lora_{ab}.weight": ((4, 32) if ab == "A" else (32, 4))
          for l in range(3) for p in "qv" for ab in "AB"}


def snapshots(n, span, seed):
    """n updates whose every factor lies in a fixed `span`-dim subspace of its own (per layer)."""
    g = torch.Generator().manual_seed(0)
    bases = {k: torch.randn(span, *s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    g.manual_seed(seed)
    return [{k: torch.einsum("i,ijk->jk", torch.randn(span, generator=g, dtype=torch.float64), b)
             for k, b in bases.items()} for _ in range(n)]


def test_band_tiles_reads_a_factor_in_its_own_orientation_and_pads_the_last_band():
    a = torch.arange(2 * 5, dtype=torch.float64).view(2, 5)  # LoRA A [r, L]
    tiles = quality.band_tiles(a, 2)
    assert tiles.shape == (3, 4)
    assert tiles[0].tolist() == [0, 1, 5, 6] and tiles[2].tolist() == [4, 0, 9, 0]
    b = a.T.contiguous()  # LoRA B [L, r]
    assert quality.band_tiles(b, 2)[1].tolist() == [2, 7, 3, 8]


def test_per_factor_pca_recovers_updates_that_lie_in_few_enough_directions():
    # 128-value factors at 1/16: 8 latents per factor; a 5-dim span per factor is kept exactly
    train, held = snapshots(30, 5, 1), snapshots(10, 5, 2)
    cos, energy = quality.held_out_cosine(quality.fit(train, "block-fair", None, None, 1 / 16), held)
    assert cos > 0.999 and energy > 0.999


def test_a_projection_s_cosine_is_the_square_root_of_the_kept_energy():
    train, held = snapshots(30, 40, 1), snapshots(10, 40, 2)
    codes = quality.fit(train, "shared", 16, None, 1 / 16)
    cos, _ = quality.held_out_cosine(codes, held)
    ref = []
    for u in held:  # independent reference: project each band tile on the basis by hand
        kept = total = 0.0
        for n, x in u.items():
            e = codes[n][0]
            for i, t in enumerate(quality.band_tiles(x, 16)):
                kept += float((e[i].T @ t).square().sum())
                total += float(t.square().sum())
        ref.append(math.sqrt(kept / total))
    assert abs(cos - sum(ref) / len(ref)) < 1e-9


def test_least_squares_decoder_recovers_layers_with_their_own_spans_from_a_shared_encoder():
    # each layer's 3-dim span differs; the pooled 8 directions cannot hold all three layers' spans
    # (9 dims in 128-value tiles), but from 8 latents a per-layer decoder can rebuild a 3-dim update
    train, held = snapshots(40, 3, 1), snapshots(10, 3, 2)
    shared, _ = quality.held_out_cosine(quality.fit(train, "shared", 32, None, 1 / 16), held)
    lsdec, _ = quality.held_out_cosine(quality.fit(train, "lsdec", 32, None, 1 / 16), held)
    assert lsdec > 0.999 and shared < lsdec


def test_codec_row_reports_min_times_against_the_copy_and_the_payload_ratio():
    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    codec = api.get_codec("int8", seed=0)
    row = codecs.measure_one("int8", codec, x, "small", 3)
    blob = codec.encode(x)
    assert row["payload_bytes"] == len(blob) and row["ratio"] == row["input_bytes"] / len(blob)
    assert row["input_bytes"] == sum(v.numel() for v in x.values()) * 4
    assert all(len(v) == 3 for v in row["seconds"].values())
    assert row["encode_x_copy"] == min(row["seconds"]["encode"]) / min(row["seconds"]["copy"])
    assert row["cosine"] > 0.999
