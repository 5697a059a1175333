"""The paired comparison's statistics, against hand-computed values."""
import json
import math

import pytest

from gradcodec.integrations.fedlora import paired
from gradcodec.integrations.fedlora.config import FedTrainConfig
from gradcodec.integrations.fedlora.report import FedTrainResult


def test_mean_ci_matches_a_hand_computed_paired_t_interval():
    # values 1, 2, 3, 6: mean 3, sample sd sqrt(((4 + 1 + 0 + 9) / 3)) = sqrt(14/3), t(0.975, 3) = 3.182
    mean, lo, hi = paired.mean_ci([1.0, 2.0, 3.0, 6.0])
    half = 3.182 * math.sqrt(14 / 3) / 2
    assert mean == 3.0 and lo == pytest.approx(3 - half) and hi == pytest.approx(3 + half)


def test_one_seed_has_no_interval():
    assert paired.mean_ci([0.5]) == (0.5, -math.inf, math.inf)


@pytest.mark.parametrize("loss, acc, expected", [
    ((-0.004, 0.006), (-0.8, 0.9), "within 1 %"),
    ((-0.004, 0.012), (-0.8, 0.9), "inconclusive"),   # the loss CI reaches past +1 %
    ((-0.004, 0.006), (-1.2, 0.9), "inconclusive"),   # the accuracy CI reaches past -1 pt
    ((0.002, 0.03), (-0.5, 0.5), "worse"),            # significantly higher loss
    ((-0.02, 0.02), (-3.0, -0.1), "worse"),           # significantly lower accuracy
    ((-0.03, -0.015), (-0.5, 2.0), "better"),
    ((0.002, 0.008), (-0.5, 0.5), "within 1 %"),      # significant but inside the tolerance
])
def test_verdict(loss, acc, expected):
    assert paired.verdict(loss, acc) == expected


def _figures(loss: dict, acc: dict, wire: float, payload: float) -> dict:
    return {s: {"eval_loss": loss[s], "eval_accuracy": acc[s], "wire_bytes_per_round": wire, "payload_bytes_per_client": payload,
                "encode_ms_per_reply": 1.0, "decode_ms_per_reply": 1.0, "seconds": 10.0} for s in loss}


def test_analyse_pairs_each_codec_with_raw_on_the_same_seed():
    raw = _figures({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 0.4, 2: 0.3}, 1e6, 4e5)
    # the codec is exactly 0.5 % worse on every seed: the paired CI collapses to that value, although
    # the losses themselves spread over a factor of 4 between seeds
    codec = _figures({0: 1.005, 1: 2.01, 2: 4.02}, {0: 0.5, 1: 0.4, 2: 0.3}, 1e4, 2e3)
    rows = {r["codec"]: r for r in paired.analyse({"raw": raw, "c": codec})}
    c = rows["c"]
    assert c["rel_loss_diff"] == pytest.approx(0.005)
    assert c["rel_loss_diff_ci"] == pytest.approx([0.005, 0.005])
    assert c["wire_ratio"] == pytest.approx(100.0) and c["payload_ratio"] == pytest.approx(200.0)
    assert c["verdict"] == "within 1 %" and rows["raw"]["verdict"] == "baseline"
    assert c["eval_loss"] == pytest.approx((1.005 + 2.01 + 4.02) / 3)


def test_analyse_needs_raw():
    with pytest.raises(ValueError, match="raw"):
        paired.analyse({"int8": _figures({0: 1.0}, {0: 0.5}, 1, 1)})


def test_convergence_is_the_spread_of_the_last_five_rounds_over_the_final():
    curve = [2.0, 1.0, 0.80, 0.81, 0.79, 0.80, 0.80]
    assert paired.convergence({0: curve}) == {0: pytest.approx((0.81 - 0.79) / 0.80)}


def test_write_leaves_every_per_seed_figure_to_recompute_the_cis(tmp_path):
    def result(seed, raw_loss, c_loss):
        rows = [{"codec": c, "eval_loss": l, "eval_accuracy": 0.5, "uplink_bytes_per_round": w,
                 "uplink_payload_bytes_per_reply": w / 2, "encode_ms_per_reply": 1.0, "decode_ms_per_reply": 1.0, "seconds": 1.0}
                for c, l, w in (("raw", raw_loss, 1e6), ("int8", c_loss, 2.5e5))]
        records = [{"codec": "raw", "round": 1}] + [{"codec": "raw", "round": r, "eval_loss": raw_loss} for r in (2, 3)]
        return FedTrainResult(config={}, records=records, rows=rows)

    results = {0: result(0, 1.0, 1.001), 1: result(1, 1.2, 1.199)}
    rows = paired.write(results, tmp_path, {"seeds": "0,1"}, 12.0)
    data = json.loads((tmp_path / "paired.json").read_text())
    assert data["per_seed"]["int8"]["1"]["eval_loss"] == 1.199
    diffs = [(data["per_seed"]["int8"][s]["eval_loss"] - data["per_seed"]["raw"][s]["eval_loss"]) / data["per_seed"]["raw"][s]["eval_loss"]
             for s in ("0", "1")]
    assert next(r for r in rows if r["codec"] == "int8")["rel_loss_diff_ci"] == pytest.approx(list(paired.mean_ci(diffs)[1:]))
    assert (tmp_path / "paired.md").read_text().startswith("| codec |")
    assert (tmp_path / "rate-distortion.png").stat().st_size > 1000
    assert data["raw_eval_loss_by_round"]["0"] == [1.0, 1.0]  # rounds without an evaluation left out


def _records(codec: str, loss: float, wire: int) -> list[dict]:
    base = {"codec": codec, "aggregated": [0, 1], "uplink_message_bytes": wire, "uplink_uncompressed_message_bytes": 1000,
            "uplink_payload_bytes": wire - 100, "encode_s": 0.01, "decode_s": 0.01, "dropped": {}, "uncompressed_replies": 0,
            "round_s": 1.0}
    return [{**base, "round": 0, "eval_loss": 2.0, "eval_accuracy": 0.1},
            {**base, "round": 1, "eval_loss": loss, "eval_accuracy": 0.5}]


def test_from_runs_merges_runs_by_seed_in_both_layouts_and_refuses_a_codec_twice(tmp_path):
    """raw from one --seeds run (fedtrain's layout), int8 added later (docs/results' gzipped layout)."""
    import gzip

    for seed, loss in ((0, 1.0), (1, 1.2)):
        (tmp_path / "a" / f"seed-{seed}").mkdir(parents=True)
        (tmp_path / "a" / f"seed-{seed}" / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records("raw", loss, 1000)))
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / f"seed-{seed}-rounds.jsonl.gz").write_bytes(
            gzip.compress("".join(json.dumps(r) + "\n" for r in _records("int8", loss * 1.01, 250)).encode()))
    results = paired.from_runs(tmp_path / "a", tmp_path / "b")
    assert sorted(results) == [0, 1]
    rows = {r["codec"]: r for r in paired.analyse(paired.per_seed(results))}
    assert rows["int8"]["rel_loss_diff_ci"] == pytest.approx([0.01, 0.01])
    assert rows["int8"]["wire_ratio"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"seed \d: raw found in more than one"):
        paired.from_runs(tmp_path / "a", tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no seed-"):
        paired.from_runs(tmp_path)


def test_seeds_and_eval_schedule_settings():
    cfg = FedTrainConfig(seeds="0, 1,2", rounds=12, eval_every=4)
    assert cfg.seed_list == (0, 1, 2)
    assert [r for r in range(13) if cfg.evaluates(r)] == [0, 4, 8, 9, 10, 11, 12]
    with pytest.raises(ValueError, match="seeds"):
        FedTrainConfig(seeds="0,x")
    with pytest.raises(ValueError, match="repeat"):
        FedTrainConfig(seeds="1,1")


def test_cosine_lr_schedule():
    cfg = FedTrainConfig(lr=2e-3, rounds=4, lr_schedule="cosine")
    assert [cfg.lr_at(r) for r in (1, 2, 3, 4)] == pytest.approx([2e-3, 1e-3 * (1 + math.cos(math.pi / 4)), 1e-3,
                                                                  1e-3 * (1 + math.cos(3 * math.pi / 4))])
    assert FedTrainConfig(lr=2e-3).lr_at(7) == 2e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        FedTrainConfig(lr_schedule="step")
    # the in-process loop (TGAP pilot, benchmarks/fed_divergence.py) runs the same schedule
    from gradcodec.integrations.fedlora.run import capture_config
    assert capture_config(cfg).lr_schedule == "cosine" and capture_config(cfg).rounds == 4


def test_the_table_names_the_seed_count_of_each_row_when_they_differ():
    row = {"wire_bytes_per_round": 1e3, "wire_ratio": 1.0, "payload_bytes_per_client": 1e3, "payload_ratio": 1.0,
           "eval_loss": 0.3, "eval_accuracy": 0.5, "rel_loss_diff": 0.0, "rel_loss_diff_ci": [0.0, 0.0],
           "accuracy_diff_pt": 0.0, "accuracy_diff_pt_ci": [0.0, 0.0], "verdict": "baseline"}
    same = paired.format_table([{**row, "codec": "raw", "seeds": [0, 1, 2]}, {**row, "codec": "int8", "seeds": [0, 1, 2]}])
    assert "\n3 seeds; Δ" in same
    mixed = paired.format_table([{**row, "codec": "raw", "seeds": [0, 1, 2, 3, 4]},
                                 {**row, "codec": "topk:ratio=0.02|int4", "seeds": [0, 1, 2, 3, 4]},
                                 {**row, "codec": "sign", "seeds": [0, 1, 2]}])
    assert "\n5 seeds: `raw`, `topk:ratio=0.02\\|int4`; 3 seeds: `sign`; Δ" in mixed
