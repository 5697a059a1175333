"""Codecs under client-level DP on the reference app: final eval loss and accuracy at noise 0, 0.5, 1.0.

    python benchmarks/dp_table.py --seeds 0 --noises 0,0.5,1.0     # runs what is missing (heavy), then the report
    python benchmarks/dp_table.py --report-only                    # only the report from runs/dp/

1. **Clip** (`choose_clip`), chosen without looking at the evaluated runs: the median L2 norm (one norm
   over the whole update) of the client round updates of a raw pilot federation as long as the evaluated
   run, with the same recipe on other data, clients and sampling (`tgap_pilot`: data_seed + 1, seed + 1),
   rounded to two significant digits. Cached in `<runs>/pilot.json`.
2. **AE.** cgfed's block AE is the one `gradcodec fedtrain --seeds` would use: trained by TGAP for the
   first seed (`train_learned_codec`, cached in ~/.cache/gradcodec) and passed to every run by path.
3. **Runs.** One `gradcodec fedtrain --compare` per (seed, noise) with `dp:clip=C,noise=N|<codec>` for
   raw, int8, int4, sign, top-k 1 % and cgfed (error feedback on for every lossy codec, as fedtrain does;
   the residual is of the noised update), `--seed S --lora-seed S` as `--seeds` sets them, other
   settings those of `--config` (default: the `tiny` preset's defaults). The noise-0 call also runs
   plain `raw` (no dp stage: no clipping) as the no-DP reference. A (seed, noise) whose
   `summary.json` exists is not run again, so the work can be split over several jobs.
4. **Report** (`report`): per row the per-seed figures, their means, ε at δ = 1e-5 both against an
   observer of the aggregate (what fedtrain records: sample rate = clients per round / clients, T =
   rounds) and against the server seeing one client's uploads (noise / 2, no sampling, T = rounds, the
   worst case of a client sampled every round), the paired difference against `dp|raw` at the same noise
   and seed, and the *robustness* figure: the codec's loss increase from noise 0 to noise N minus raw's
   on the same seed (paired 95 % CI with 2+ seeds). Writes `--out` (JSON, every per-run figure) and
   prints the Markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

CODECS = ("raw", "int8", "int4", "sign", "topk:ratio=0.01|fp16", "cgfed")
DELTA = 1e-5


def load_config(path: str):
    """The FedTrainConfig the runs use: the defaults, updated from a TOML/JSON file if given."""
    from gradcodec.integrations.fedlora.config import FedTrainConfig

    cfg = FedTrainConfig()
    if path:
        text = Path(path).read_text()
        values = json.loads(text) if path.endswith(".json") else _toml(text)
        cfg = cfg.replace(**values)
    return cfg


def _toml(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


def update_norm(update: dict) -> float:
    """L2 norm of one whole update (all tensors together), in float64."""
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in update.values()))


def pilot_update_norms(cfg) -> list[float]:
    """Norms of every client round update of a raw pilot federation as long as the evaluated run."""
    from gradcodec.integrations.fedlora.capture import run_federated
    from gradcodec.integrations.fedlora.run import tgap_pilot

    pilot = dataclasses.replace(tgap_pilot(cfg), rounds=cfg.rounds)
    return [update_norm(r["update"]) for r in run_federated(pilot, progress=False)["records"]]


def clip_from_norms(norms: Sequence[float]) -> float:
    """The median norm rounded to two significant digits (a round number the table can print)."""
    if not norms:
        raise ValueError("no update norms to choose a clip from")
    return float(f"{statistics.median(norms):.2g}")


def choose_clip(cfg, runs: Path) -> dict[str, Any]:
    """The pilot's norms and the clip, from `<runs>/pilot.json` or measured (and cached) now."""
    path = runs / "pilot.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    norms = pilot_update_norms(cfg)
    out = {"norms": norms, "clip": clip_from_norms(norms), "median": statistics.median(norms),
           "min": min(norms), "max": max(norms), "wall_s": time.perf_counter() - t0}
    runs.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def specs_for(clip: float, noise: float, codecs: Sequence[str], plain_raw: bool) -> list[str]:
    """The --compare list of one noise level. With `plain_raw`, the no-DP references come first: plain
    `raw`, and plain cgfed (the same AE) when cgfed is among the codecs."""
    specs = [f"dp:clip={clip:g},noise={noise:g}|{c}" for c in codecs]
    plain = ["raw"] + [c for c in codecs if c.split(":")[0] == "cgfed"]
    return (plain if plain_raw else []) + specs


def codec_name(spec: str) -> str:
    """The row's codec: the spec without its dp stage and without a model file's path."""
    stages = spec.split("|")
    if stages[0].split(":")[0] == "dp":
        stages = stages[1:]
    name = re.sub(r",?model=[^,|]*", "", "|".join(stages))
    return re.sub(r":(?=\||$)", "", name.replace(":,", ":")) or spec  # no empty parameter list left behind


def noise_of(spec: str) -> float | None:
    """The dp stage's noise multiplier, None for a spec without one."""
    m = re.match(r"dp:[^|]*noise=([0-9.eE+-]+)", spec)
    return float(m.group(1)) if m else None


def run_missing(cfg, config_path: str, runs: Path, seeds: Sequence[int], noises: Sequence[float], clip: float,
                codecs: Sequence[str]) -> None:
    """One `gradcodec fedtrain --compare` per (seed, noise) not yet run; its wall time in `wall.json`."""
    for seed in seeds:
        for noise in noises:
            out_dir = runs / f"seed-{seed}" / f"noise-{noise:g}"
            if (out_dir / "summary.json").exists():
                continue
            specs = specs_for(clip, noise, codecs, plain_raw=noise == 0)
            cmd = ["gradcodec", "fedtrain", "--compare", ";".join(specs), "--seed", str(seed), "--lora-seed", str(seed),
                   "--out-dir", str(out_dir), "--no-progress"]
            if config_path:
                cmd[2:2] = ["--config", config_path]
            print(f"seed {seed} noise {noise:g}: {len(specs)} runs", flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            (out_dir / "wall.json").write_text(json.dumps({"command": cmd, "wall_s": time.perf_counter() - t0}))


def noise_passthrough(codecs: Sequence[str], shapes: dict[str, tuple[int, ...]], trials: int = 3,
                      model_files: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """What share of pure DP noise each codec hands the server in one upload (no error feedback):
    ||decode(encode(z))||² / ||z||² and the cosine of decode(encode(z)) with z, for z ~ N(0, 1) per
    coordinate over the adapter's `shapes` (the noise dominates a noised upload: its norm is
    noise · clip · sqrt(d) against the clipped update's clip). Mean over `trials` draws."""
    import torch

    import gradcodec

    out = {}
    gen = torch.Generator().manual_seed(0)
    for spec in codecs:
        codec = gradcodec.get_codec(spec, seed=0)
        energy, cos = [], []
        for _ in range(trials):
            z = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
            d = gradcodec.decode(codec.encode(z), models=list(model_files))
            zz = sum(float((t.double() ** 2).sum()) for t in z.values())
            dd = sum(float((d[k].double() ** 2).sum()) for k in z)
            zd = sum(float((d[k].double() * z[k].double()).sum()) for k in z)
            energy.append(dd / zz)
            cos.append(zd / math.sqrt(zz * dd) if dd else 0.0)
        out[codec_name(spec)] = {"energy_share": _mean(energy), "cosine": _mean(cos)}
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _ci(xs: Sequence[float]) -> list[float]:
    from gradcodec.integrations.fedlora.paired import mean_ci

    return list(mean_ci(xs)[1:]) if xs else [math.nan, math.nan]


def _initial_loss(out_dir: Path) -> float | None:
    """Eval loss of the adapter before any round (round 0), the same for every codec of a run."""
    path = out_dir / "rounds.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("round") == 0 and "eval_loss" in r:
            return r["eval_loss"]
    return None


def collect(runs: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every run's figures (one dict per seed, noise and codec) and the per-(seed, noise) call info."""
    per_run, calls = [], {}
    for summary in sorted(runs.glob("seed-*/*/summary.json")):  # noise-N/, and extra no-DP references
        out_dir = summary.parent
        seed = int(out_dir.parent.name.split("-", 1)[1])
        wall = json.loads((out_dir / "wall.json").read_text()) if (out_dir / "wall.json").exists() else {}
        rows = json.loads(summary.read_text()).get("rows")
        if rows is None:  # not a fedtrain summary (a run held back by hand)
            continue
        calls[f"seed-{seed}/{out_dir.name}"] = {"wall_s": wall.get("wall_s"), "command": wall.get("command"),
                                                "initial_eval_loss": _initial_loss(out_dir)}
        curves: dict[str, list[float]] = {}
        for line in (out_dir / "rounds.jsonl").read_text().splitlines() if (out_dir / "rounds.jsonl").exists() else []:
            rec = json.loads(line)
            if "eval_loss" in rec:
                curves.setdefault(rec["codec"], []).append((rec["round"], rec["eval_loss"], rec["eval_accuracy"]))
        for row in rows:
            dp_noise = noise_of(row["codec"])
            curve = sorted(curves.get(row["codec"], []))
            per_run.append({
                "seed": seed, "noise": dp_noise, "codec": codec_name(row["codec"]), "spec": row["codec"],
                **{k: row.get(k) for k in ("eval_loss", "eval_accuracy", "epsilon", "compression",
                                           "uplink_bytes_per_round", "uplink_payload_bytes_per_reply", "error_feedback",
                                           "failed_replies", "uncompressed_replies", "seconds")},
                "eval_loss_by_round": [c[1] for c in curve], "eval_accuracy_by_round": [c[2] for c in curve],
                "mean_eval_loss_after_round_0": _mean([c[1] for c in curve if c[0] > 0]),
            })
    return per_run, calls


def report(per_run: Sequence[dict[str, Any]], rounds: int, sample_rate: float) -> list[dict[str, Any]]:
    """One row per (noise, codec): means over seeds, ε both ways, paired differences (see the docstring)."""
    from gradcodec import privacy

    by = {(r["noise"], r["codec"], r["seed"]): r for r in per_run}
    keys = sorted({(r["noise"], r["codec"]) for r in per_run}, key=lambda k: (k[0] is not None, k[0] or 0,
                                                                              _order(k[1])))
    rows = []
    for noise, codec in keys:
        seeds = sorted(s for (n, c, s) in by if (n, c) == (noise, codec))
        runs = [by[noise, codec, s] for s in seeds]
        row: dict[str, Any] = {"noise": noise, "codec": codec, "seeds": seeds,
                               "eval_loss": _mean([r["eval_loss"] for r in runs]),
                               "eval_accuracy": _mean([r["eval_accuracy"] for r in runs]),
                               "eval_loss_per_seed": [r["eval_loss"] for r in runs],
                               "eval_accuracy_per_seed": [r["eval_accuracy"] for r in runs],
                               "compression": _mean([r["compression"] for r in runs]),
                               "mean_eval_loss_after_round_0": _mean([r.get("mean_eval_loss_after_round_0", math.nan)
                                                                      for r in runs])}
        if noise is not None:
            row["epsilon_aggregate"] = privacy.epsilon(noise, sample_rate, rounds, DELTA)
            row["epsilon_upload"] = privacy.epsilon(noise / 2, 1.0, rounds, DELTA)
            recorded = [r["epsilon"] for r in runs if r.get("epsilon") is not None]
            row["epsilon_recorded_by_fedtrain"] = recorded[0] if recorded else None
            vs_raw = [s for s in seeds if (noise, "raw", s) in by]
            row["loss_vs_dp_raw"] = [by[noise, codec, s]["eval_loss"] - by[noise, "raw", s]["eval_loss"] for s in vs_raw]
            row["acc_pt_vs_dp_raw"] = [100 * (by[noise, codec, s]["eval_accuracy"] - by[noise, "raw", s]["eval_accuracy"])
                                       for s in vs_raw]
            both = [s for s in seeds if all(k in by for k in ((0.0, codec, s), (0.0, "raw", s), (noise, "raw", s)))]
            # robustness: how much more the codec's loss rises from noise 0 to this noise than raw's does
            row["excess_loss_rise_vs_raw"] = [(by[noise, codec, s]["eval_loss"] - by[0.0, codec, s]["eval_loss"])
                                              - (by[noise, "raw", s]["eval_loss"] - by[0.0, "raw", s]["eval_loss"])
                                              for s in both]
            for k in ("loss_vs_dp_raw", "acc_pt_vs_dp_raw", "excess_loss_rise_vs_raw"):
                row[k + "_mean"] = _mean(row[k])
                row[k + "_ci95"] = _ci(row[k])
        rows.append(row)
    return rows


def _order(codec: str) -> int:
    names = ["raw"] + [codec_name("dp:clip=1,noise=0|" + c) for c in CODECS[1:]]
    return names.index(codec) if codec in names else len(names)


def _f(x: float, fmt: str) -> str:
    if x is not None and math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return "–" if x is None or not math.isfinite(x) else format(x, fmt)


def _ci_cell(mean: float, ci: Sequence[float], fmt: str) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    if not all(math.isfinite(c) for c in ci):
        return format(mean, "+" + fmt)
    return f"{format(mean, '+' + fmt)} [{format(ci[0], '+' + fmt)}, {format(ci[1], '+' + fmt)}]"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of docs/results/dp.md."""
    lines = ["| noise | codec | ε aggregate | ε upload | compression | seeds | eval loss | accuracy | "
             "mean loss rounds 1–T | Δ loss vs dp raw (95 % CI) | Δ acc vs dp raw, pt | excess loss rise vs raw (95 % CI) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        noise = "no dp" if r["noise"] is None else f"{r['noise']:g}"
        eps_a, eps_u = r.get("epsilon_aggregate"), r.get("epsilon_upload")
        lines.append(
            f"| {noise} | `{r['codec'].replace('|', chr(92) + '|')}` | {_f(eps_a, '.3g') if eps_a is not None else '–'} | "
            f"{_f(eps_u, '.3g') if eps_u is not None else '–'} | {_f(r['compression'], '.1f')}× | {len(r['seeds'])} | "
            f"{_f(r['eval_loss'], '.3f')} | {_f(100 * r['eval_accuracy'], '.1f')} % | "
            f"{_f(r.get('mean_eval_loss_after_round_0', math.nan), '.2f')} | "
            f"{_ci_cell(r.get('loss_vs_dp_raw_mean'), r.get('loss_vs_dp_raw_ci95', []), '.3f')} | "
            f"{_ci_cell(r.get('acc_pt_vs_dp_raw_mean'), r.get('acc_pt_vs_dp_raw_ci95', []), '.1f')} | "
            f"{_ci_cell(r.get('excess_loss_rise_vs_raw_mean'), r.get('excess_loss_rise_vs_raw_ci95', []), '.3f') if r['noise'] else '–'} |")
    return "\n".join(lines)


def finite(x: Any) -> Any:
    """`x` with every non-finite float written as the string "inf" / "-inf" / "nan" (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results/dp.json")
    ap.add_argument("--runs", default="runs/dp")
    ap.add_argument("--config", default="", help="TOML/JSON settings for fedtrain (default: the tiny defaults)")
    ap.add_argument("--noises", default="0,0.5,1.0")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--report-only", action="store_true", help="only aggregate what is in --runs")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    cfg = load_config(args.config)
    pilot = choose_clip(cfg, runs) if not args.report_only else json.loads((runs / "pilot.json").read_text())
    clip = pilot["clip"]
    print(f"pilot update norms ({len(pilot['norms'])}): min {pilot['min']:.3g} median {pilot['median']:.3g} "
          f"max {pilot['max']:.3g}; clip {clip:g}", flush=True)
    if not args.report_only:
        from gradcodec.integrations.fedlora.run import train_learned_codec

        seeds = [int(s) for s in args.seeds.split(",")]
        first = cfg.replace(seed=seeds[0], lora_seed=seeds[0])  # as fedtrain --seeds: the first seed's TGAP pilot
        codecs = [train_learned_codec(c, first) if c == "cgfed" else c for c in CODECS]
        run_missing(cfg, args.config, runs, seeds, [float(n) for n in args.noises.split(",")], clip, codecs)
    from gradcodec.integrations.fedlora.model import lora_shapes

    model_files = sorted({m for r in collect(runs)[0] for m in re.findall(r"model=([^,|]*)", r["spec"])})
    cgfed = [f"cgfed:model={m}" for m in model_files[:1]]
    passthrough = noise_passthrough([c for c in CODECS if c != "cgfed"] + cgfed,
                                    lora_shapes(cfg.model, cfg.lora_rank, cfg.targets), model_files=model_files)
    per_run, calls = collect(runs)
    sample_rate = cfg.clients_per_round() / cfg.num_clients
    rows = report(per_run, cfg.rounds, sample_rate)
    result = {"command": "python " + " ".join(sys.argv), "delta": DELTA, "clip": clip, "pilot": pilot,
              "sample_rate": sample_rate, "config": dataclasses.asdict(cfg), "calls": calls,
              "noise_passthrough": passthrough,
              "rows": rows, "runs": per_run}
    Path(args.out).write_text(json.dumps(finite(result), indent=1, default=str))
    print(format_table(rows))
    print("noise pass-through (one upload of pure N(0,1) noise, no error feedback):",
          {k: {m: round(v, 4) for m, v in d.items()} for k, d in passthrough.items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
