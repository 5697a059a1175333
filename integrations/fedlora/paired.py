"""Paired comparison over seeds: does a codec fine-tune as well as raw, within 1 %, with 95 % confidence?

Each seed runs every codec on the same data, client sampling, local batches and initial adapter
(`run.simulate_seeds`); a seed changes all of those at once. For each codec and seed the *paired*
difference against raw on the same seed removes what the seed does to both, so a handful of seeds
can resolve differences far smaller than the spread between seeds.

    relative loss difference   d_s = (loss_codec,s - loss_raw,s) / loss_raw,s
    accuracy difference        a_s = 100 (acc_codec,s - acc_raw,s)          (points)
    95 % CI                    mean ± t(0.975, n-1) · sd / sqrt(n)          (paired t; Student's t table below)

Verdict (`verdict`): "within 1 %" only when the whole loss CI lies inside ±1 % and the whole accuracy
CI inside ±1 point; "worse" when either CI excludes zero on the wrong side (loss CI above 0 or
accuracy CI below 0) but not within; "better" when the loss CI lies below 0 and accuracy is not
worse; otherwise "inconclusive" (the CI is too wide to say: more seeds would).

`paired.json` (every per-seed figure, so anyone can recompute the CIs), `paired.md` (the table) and
`rate-distortion.png` go to the run's out_dir.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from .report import BASELINE, FedTrainResult, _bytes, codec_label

# two-sided 95 % quantiles of Student's t, by degrees of freedom (df > 30: the normal's 1.96 is within 2 %)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}
LOSS_TOLERANCE = 0.01  # relative
ACCURACY_TOLERANCE = 1.0  # points


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the paired-t 95 % confidence interval of the mean; one value has no interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(loss_ci: tuple[float, float], accuracy_ci: tuple[float, float]) -> str:
    """See the module docstring. loss_ci is relative (0.01 = 1 %), accuracy_ci in points."""
    (l_lo, l_hi), (a_lo, a_hi) = loss_ci, accuracy_ci
    if -LOSS_TOLERANCE <= l_lo and l_hi <= LOSS_TOLERANCE and -ACCURACY_TOLERANCE <= a_lo and a_hi <= ACCURACY_TOLERANCE:
        return "within 1 %"
    if l_lo > 0 or a_hi < 0:
        return "worse"
    if l_hi < 0:
        return "better"
    return "inconclusive"


def per_seed(results: dict[int, FedTrainResult]) -> dict[str, dict[int, dict[str, float]]]:
    """codec -> seed -> the figures the table is made of (from each seed's summary rows)."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for seed, result in results.items():
        for row in result.rows:
            out.setdefault(row["codec"], {})[seed] = {
                "eval_loss": row["eval_loss"], "eval_accuracy": row["eval_accuracy"],
                "wire_bytes_per_round": row["uplink_bytes_per_round"],
                "payload_bytes_per_client": row["uplink_payload_bytes_per_reply"],
                "encode_ms_per_reply": row["encode_ms_per_reply"], "decode_ms_per_reply": row["decode_ms_per_reply"],
                "seconds": row["seconds"],
            }
    return out


def analyse(figures: dict[str, dict[int, dict[str, float]]], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """One row per codec: means over seeds, ratios and paired CIs against `baseline` on the same seeds."""
    if baseline not in figures:
        raise ValueError(f"a paired comparison needs the {baseline!r} codec among the codecs")
    base = figures[baseline]
    rows = []
    for codec, seeds in figures.items():
        common = sorted(set(seeds) & set(base))
        mean = {k: sum(seeds[s][k] for s in common) / len(common) for k in next(iter(seeds.values()))}
        rel = [(seeds[s]["eval_loss"] - base[s]["eval_loss"]) / base[s]["eval_loss"] for s in common]
        acc = [100 * (seeds[s]["eval_accuracy"] - base[s]["eval_accuracy"]) for s in common]
        loss_m, loss_lo, loss_hi = mean_ci(rel)
        acc_m, acc_lo, acc_hi = mean_ci(acc)
        base_wire = sum(base[s]["wire_bytes_per_round"] for s in common) / len(common)
        base_payload = sum(base[s]["payload_bytes_per_client"] for s in common) / len(common)
        rows.append({
            "codec": codec, "seeds": common, **mean,
            "eval_loss_ci": list(mean_ci([seeds[s]["eval_loss"] for s in common])[1:]),
            "wire_ratio": base_wire / mean["wire_bytes_per_round"],
            "payload_ratio": base_payload / mean["payload_bytes_per_client"],
            "rel_loss_diff": loss_m, "rel_loss_diff_ci": [loss_lo, loss_hi],
            "accuracy_diff_pt": acc_m, "accuracy_diff_pt_ci": [acc_lo, acc_hi],
            "verdict": "baseline" if codec == baseline else verdict((loss_lo, loss_hi), (acc_lo, acc_hi)),
        })
    return rows


def _pct(x: float) -> str:
    return "∞" if math.isinf(x) else f"{100 * x:+.2f}"


def _pt(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:+.1f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The paired comparison as Markdown: traffic and its ratio to raw, mean quality, paired 95 % CIs, verdict."""
    lines = [
        "| codec | wire / round | × raw | payload / client | × raw | eval loss | accuracy | Δ loss vs raw (95 % CI) | Δ acc vs raw (95 % CI) | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lo, hi = r["rel_loss_diff_ci"]
        alo, ahi = r["accuracy_diff_pt_ci"]
        lines.append(
            f"| `{codec_label(r['codec']).replace('|', chr(92) + '|')}` | {_bytes(r['wire_bytes_per_round'])} | {r['wire_ratio']:.1f}× "
            f"| {_bytes(r['payload_bytes_per_client'])} | {r['payload_ratio']:.1f}× | {r['eval_loss']:.4f} | {r['eval_accuracy']:.1%} "
            f"| {_pct(r['rel_loss_diff'])} % [{_pct(lo)}, {_pct(hi)}] | {_pt(r['accuracy_diff_pt'])} pt [{_pt(alo)}, {_pt(ahi)}] "
            f"| {r['verdict']} |"
        )
    counts: dict[int, list[str]] = {}
    for r in rows:
        counts.setdefault(len(r["seeds"]), []).append(codec_label(r["codec"]))
    if len(counts) > 1:  # rows added on fewer seeds (paired.from_runs) say so
        n = "; ".join(f"{k} seeds: {', '.join(f'`{c}`' for c in v)}".replace("|", chr(92) + "|")
                      for k, v in sorted(counts.items(), reverse=True))
    else:
        n = f"{next(iter(counts), 0)} seeds"
    lines.append(f"\n{n}; Δ: paired differences against raw on the same seed, mean and paired-t 95 % CI "
                 "(loss relative, accuracy in points); verdict \"within 1 %\" needs both whole CIs inside ±1 % / ±1 pt.")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Rate–distortion: final eval loss (mean over seeds, 95 % CI bars) against wire bytes per round (log),
    and beside it the paired relative loss difference against raw with its CI and the ±1 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        x = r["wire_bytes_per_round"]
        lo, hi = r["eval_loss_ci"]
        err = [[r["eval_loss"] - lo], [hi - r["eval_loss"]]] if math.isfinite(lo) else None
        (mark,) = left.errorbar([x], [r["eval_loss"]], yerr=err, fmt="o", capsize=4, label=codec_label(r["codec"]))[:1]
        dlo, dhi = r["rel_loss_diff_ci"]
        derr = [[100 * (r["rel_loss_diff"] - dlo)], [100 * (dhi - r["rel_loss_diff"])]] if math.isfinite(dlo) else None
        right.errorbar([x], [100 * r["rel_loss_diff"]], yerr=derr, fmt="o", capsize=4, color=mark.get_color())
    right.axhspan(-100 * LOSS_TOLERANCE, 100 * LOSS_TOLERANCE, color="green", alpha=0.12, label="±1 %")
    right.axhline(0, color="black", lw=0.8)
    left.set(xscale="log", xlabel="uplink bytes per round on the wire (Flower messages, all clients)",
             ylabel="final eval loss (mean over seeds, 95 % CI)", title="rate–distortion")
    right.set(xscale="log", xlabel="uplink bytes per round on the wire", ylabel="Δ eval loss vs raw, % (paired, 95 % CI)",
              title="paired difference against raw")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict[int, FedTrainResult], out_dir: str | os.PathLike, config: dict[str, Any], wall_s: float,
          title: str = "") -> list[dict[str, Any]]:
    """paired.json, paired.md and rate-distortion.png in `out_dir`; returns the table's rows."""
    figures = per_seed(results)
    rows = analyse(figures)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_curves = {seed: raw_curve(res.records) for seed, res in results.items()}
    (out / "paired.json").write_text(json.dumps({
        "config": config, "wall_s": wall_s, "per_seed": {c: {str(s): v for s, v in f.items()} for c, f in figures.items()},
        "raw_eval_loss_by_round": {str(s): v for s, v in raw_curves.items()}, "rows": rows,
    }, indent=1, sort_keys=True, default=str))
    (out / "paired.md").write_text(format_table(rows) + "\n")
    plot(rows, out / "rate-distortion.png", title)
    return rows


def raw_curve(records: Sequence[dict[str, Any]]) -> list[float]:
    """Raw's eval loss on the rounds the server evaluated (after round 0), in round order."""
    return [r["eval_loss"] for r in sorted(records, key=lambda r: r["round"])
            if r["codec"] == BASELINE and r["round"] > 0 and "eval_loss" in r]


def from_runs(*dirs: str | os.PathLike) -> dict[int, FedTrainResult]:
    """The per-seed results that `--seeds` runs left in `dirs`, merged by seed (to redo the analysis, or to
    add codecs to a finished comparison: the runs are deterministic, so a later run of another codec on
    the same seeds pairs with the earlier raw). A dir holds `seed-<s>/rounds.jsonl` (what fedtrain writes)
    or `seed-<s>-rounds.jsonl.gz` (how docs/results keeps them); a codec found twice for a seed is an error.
    """
    from .report import read_records, summarize

    records: dict[int, list[dict[str, Any]]] = {}
    for d in map(Path, dirs):
        files = [(p.parent.name[5:], p) for p in d.glob("seed-*/rounds.jsonl")]
        files += [(p.name[5:-len("-rounds.jsonl.gz")], p) for p in d.glob("seed-*-rounds.jsonl.gz")]
        if not files:
            raise FileNotFoundError(f"{d}: no seed-<s>/rounds.jsonl or seed-<s>-rounds.jsonl.gz")
        for seed, path in files:
            new = read_records(path)
            mine = records.setdefault(int(seed), [])
            if twice := {r["codec"] for r in new} & {r["codec"] for r in mine}:
                raise ValueError(f"seed {seed}: {', '.join(sorted(twice))} found in more than one of the runs")
            mine += new
    return {s: FedTrainResult(config={}, records=rs, rows=summarize(rs), out_dir=str(dirs[0]))
            for s, rs in sorted(records.items())}


def convergence(curves: dict[Any, list[float]], last: int = 5) -> dict[Any, float]:
    """Per seed: the relative change of raw's eval loss over its last `last` rounds, (max - min) / final."""
    return {s: (max(c[-last:]) - min(c[-last:])) / c[-1] for s, c in curves.items() if len(c) >= last}


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m gradcodec.integrations.fedlora.paired --out DIR RUN...`: the paired analysis of runs merged by seed."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("runs", nargs="+", help="out_dirs of `gradcodec fedtrain --seeds` runs (see from_runs)")
    parser.add_argument("--out", required=True, help="where paired.json, paired.md and rate-distortion.png go")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    rows = write(from_runs(*args.runs), args.out, {"runs": args.runs}, 0.0, args.title)
    print(format_table(rows))


if __name__ == "__main__":
    main()
