"""`gradcodec bench --peers`: each peer round-trips, its size is the bytes it would send, and its row
sits beside the gradcodec codec of nearest size. Peers whose library is absent are skipped."""
import json
import math

import pytest
import torch

from gradcodec.bench import peers
from gradcodec.cli import main


def peer(name: str, **kw) -> peers.Peer:
    built, skipped = peers.build([name], **kw)
    if skipped:
        pytest.skip(f"{name}: library not installed")
    return built[0]


def round_trip(p: peers.Peer, x):
    payload = p.encode_all(x)
    return p.decode_all(payload, x), p.size_all(payload)


def rel_l2(x, y) -> float:
    return float((x - y).norm() / x.norm())


def test_casts_send_two_bytes_per_value_and_round_like_torch():
    x = torch.randn(64, 48)
    for name, dtype in (("torch:fp16", torch.float16), ("torch:bf16", torch.bfloat16)):
        y, size = round_trip(peer(name), x)
        assert size == 2 * x.numel() and y.dtype == x.dtype and torch.equal(y, x.to(dtype).float())


def test_powersgd_step_recovers_a_low_rank_matrix_and_sends_both_factors_in_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, generator=g) @ torch.randn(3, 192, generator=g)
    y, size = round_trip(peer("torch:powersgd", rank=4), x)
    assert size == (256 + 192) * 4 * 4
    assert rel_l2(x, y) < 1e-4  # rank 3 <= 4: one power step spans the column space


def test_powersgd_sends_vectors_and_small_matrices_uncompressed_as_the_hook_does():
    x = {"bias": torch.randn(100), "small": torch.randn(6, 6)}
    y, size = round_trip(peer("torch:powersgd", rank=4), x)
    assert size == 4 * (100 + 36) and all(torch.equal(x[k], y[k]) for k in x)


def test_powersgd_rank_follows_the_gradcodec_powersgd_spec():
    assert peers.powersgd_rank(["int8", "powersgd:rank=16|fp16"]) == 16
    assert peers.powersgd_rank(["powersgd|int8"]) == 4
    assert peers.powersgd_rank(["int8"]) == 4


@pytest.mark.parametrize("name,bits", [("bnb:int8", 8), ("bnb:nf4", 4), ("bnb:fp4", 4)])
def test_bitsandbytes_sizes_are_codes_plus_one_fp32_absmax_per_64_values(name, bits):
    x = torch.randn(128, 96)
    y, size = round_trip(peer(name), x)
    n = x.numel()
    assert size == n * bits // 8 + 4 * n // 64 and y.shape == x.shape and y.dtype == x.dtype
    assert rel_l2(x, y) < (0.02 if bits == 8 else 0.15)


def test_adaquant_round_trips_within_its_level_spacing():
    x = torch.randn(50, 40)
    y, size = round_trip(peer("nvflare:adaquant"), x)
    span = float(x.max() - x.min())
    assert y.dtype == x.dtype and size < 4 * x.numel()
    assert float((x - y).abs().max()) <= span / 255 / 2 * 1.001 + 1e-6  # 8-bit levels over [min, max]


def test_a_peer_whose_library_is_missing_is_skipped_and_named(monkeypatch):
    def absent():
        raise ImportError("no module named nvflare")

    monkeypatch.setattr(peers, "_adaquant", absent)
    built, skipped = peers.build(["torch:fp16", "nvflare:adaquant"])
    assert [p.name for p in built] == ["torch:fp16"] and skipped == ["nvflare:adaquant"]


def test_an_unknown_peer_is_a_usage_error(capsys):
    assert main(["bench", "--size", "1K", "--peers", "zfp"]) == 2
    assert "unknown peer 'zfp'" in capsys.readouterr().err


def test_peer_rows_have_the_same_columns_and_follow_the_nearest_gradcodec_codec(tmp_path, capsys):
    path = tmp_path / "bench.json"
    args = ["bench", "--repeats", "1", "--size", "4K", "--json", str(path),
            "--codecs", "int8;fp16;powersgd:rank=2|fp16", "--peers", "torch:bf16,torch:powersgd"]
    assert main(args) == 0
    rows = json.loads(path.read_text())["rows"]
    ours, theirs = [r for r in rows if r["peer"] is None], [r for r in rows if r["peer"] is not None]
    assert [r["spec"] for r in theirs] == ["torch:bf16", "torch:powersgd:rank=2"]
    assert set(ours[0]) == set(theirs[0]) and all(math.isfinite(r["encode"]["fraction_of_copy"]) for r in rows)
    listed = [line.split()[1] if line.startswith("  peer") else line.split()[0]
              for line in capsys.readouterr().out.splitlines() if line.startswith(("int8", "fp16", "powersgd", "  peer"))]
    assert listed == ["int8", "fp16", "torch:bf16", "powersgd:rank=2|fp16", "torch:powersgd:rank=2"]
