"""benchmarks/dp_table.py: the clip rule, spec building and the report's paired figures (no training)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("dp_table", ROOT / "benchmarks" / "dp_table.py")
dp_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dp_table)


def test_the_clip_is_the_median_norm_to_two_significant_digits():
    assert dp_table.clip_from_norms([0.5, 3.14159, 1.23456]) == 1.2
    assert dp_table.clip_from_norms([10.0, 20.0]) == 15.0
    with pytest.raises(ValueError):
        dp_table.clip_from_norms([])


def test_update_norm_is_one_norm_over_all_tensors():
    import torch

    assert dp_table.update_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == pytest.approx(5.0)


def test_specs_put_the_dp_stage_first_and_plain_raw_only_when_asked():
    specs = dp_table.specs_for(1.5, 0.5, ["raw", "topk:ratio=0.01|fp16"], plain_raw=False)
    assert specs == ["dp:clip=1.5,noise=0.5|raw", "dp:clip=1.5,noise=0.5|topk:ratio=0.01|fp16"]
    assert dp_table.specs_for(2, 0, ["int8"], plain_raw=True) == ["raw", "dp:clip=2,noise=0|int8"]
    assert dp_table.specs_for(2, 0, ["raw", "cgfed:model=/a.st"], plain_raw=True) == [
        "raw", "cgfed:model=/a.st", "dp:clip=2,noise=0|raw", "dp:clip=2,noise=0|cgfed:model=/a.st"]


def test_codec_name_and_noise_read_back_from_a_spec():
    s = "dp:clip=1.2,noise=0.5|cgfed:model=/root/.cache/gradcodec/cgfed-block-ab.safetensors"
    assert dp_table.codec_name(s) == "cgfed"
    assert dp_table.noise_of(s) == 0.5
    assert dp_table.codec_name("dp:clip=1,noise=1|topk:ratio=0.01|fp16") == "topk:ratio=0.01|fp16"
    assert dp_table.codec_name("raw") == "raw" and dp_table.noise_of("raw") is None
    assert dp_table.codec_name("cgfed:bits=4,model=/x/ae.safetensors") == "cgfed:bits=4"


def _run(seed, noise, codec, loss, acc=0.5):
    return {"seed": seed, "noise": noise, "codec": codec, "eval_loss": loss, "eval_accuracy": acc, "compression": 1.0,
            "epsilon": None}


def test_report_pairs_by_seed_against_dp_raw_and_against_the_codec_at_noise_0():
    runs = [
        _run(0, 0.0, "raw", 1.0), _run(1, 0.0, "raw", 2.0),
        _run(0, 0.0, "int4", 1.1), _run(1, 0.0, "int4", 2.1),
        _run(0, 1.0, "raw", 3.0), _run(1, 1.0, "raw", 5.0),
        _run(0, 1.0, "int4", 3.5, acc=0.4), _run(1, 1.0, "int4", 5.3, acc=0.3),
        _run(0, None, "raw", 0.9),
    ]
    rows = {(r["noise"], r["codec"]): r for r in dp_table.report(runs, rounds=8, sample_rate=0.2)}
    assert list(rows)[0] == (None, "raw")  # the no-DP reference first
    r = rows[1.0, "int4"]
    assert r["loss_vs_dp_raw"] == pytest.approx([0.5, 0.3])
    assert r["acc_pt_vs_dp_raw"] == pytest.approx([-10.0, -20.0])
    # rise int4: 2.4 and 3.2; raw: 2.0 and 3.0 -> excess 0.4 and 0.2; paired t with 1 df: 0.3 ± 12.706 * 0.1/√2
    assert r["excess_loss_rise_vs_raw"] == pytest.approx([0.4, 0.2])
    half = 12.706 * math.sqrt(0.02) / math.sqrt(2)
    assert r["excess_loss_rise_vs_raw_ci95"] == pytest.approx([0.3 - half, 0.3 + half])
    assert math.isinf(rows[0.0, "raw"]["epsilon_aggregate"])
    from gradcodec import privacy

    assert r["epsilon_aggregate"] == pytest.approx(privacy.epsilon(1.0, 0.2, 8, 1e-5))
    assert r["epsilon_upload"] == pytest.approx(privacy.epsilon(0.5, 1.0, 8, 1e-5))
    table = dp_table.format_table(list(rows.values()))
    assert "| no dp | `raw` |" in table and "| ∞ |" in table


def test_the_json_has_no_bare_infinity():
    text = json.dumps(dp_table.finite({"a": [math.inf, 1.0], "b": -math.inf}))
    assert json.loads(text) == {"a": ["inf", 1.0], "b": "-inf"}


def test_noise_passthrough_is_one_for_raw_and_about_the_kept_share_for_topk():
    shapes = {"a": (64, 128), "b": (128, 64)}
    out = dp_table.noise_passthrough(["raw", "topk:ratio=0.01|fp16", "int8"], shapes, trials=2)
    assert out["raw"] == pytest.approx({"energy_share": 1.0, "cosine": 1.0})
    # the top 1 % of |z| of a standard normal hold about 7.5 % of its energy (E[z² | |z| > 2.576] ≈ 7.5)
    assert 0.05 < out["topk:ratio=0.01|fp16"]["energy_share"] < 0.10
    assert out["int8"]["cosine"] > 0.99
