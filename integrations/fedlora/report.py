"""What a fedtrain run leaves behind: one JSON record per round, the comparison table, the plot.

Files in the run's `out_dir`:

* `rounds.jsonl`: one JSON object per (codec, round), written as each round ends. Round 0 is the
  initial adapter's evaluation (no traffic). Keys: `codec`, `round`, `error_feedback`, `eval_loss`, `eval_accuracy`,
  `eval_categories` ({category: {loss, accuracy, num_examples}}) and `eval_s` (on the rounds the server
  evaluates: `eval_every`, the last 5 and round 0), `train_loss` (clients' mean local loss,
  weighted by examples), `sampled` / `aggregated` / `failed` (partition ids), `dropped` (partition id ->
  why its reply was not aggregated), the uplink and downlink bytes of the round summed over clients —
  `*_message_bytes` (what Flower carries, measured by `CompressedStrategy`), `*_uncompressed_message_bytes`
  (the same messages without compression), `*_payload_bytes` (the codec's payloads) —,
  `uncompressed_replies` (replies the client could not compress), `encode_s` (clients' encoding time,
  summed), `decode_s` (the server's), `round_s` (wall time).
* `summary.json`: the configuration, the table's rows and the total wall time.
* `table.md` and `compare.png`: the table below and the plot of eval loss vs round and vs cumulative
  uplink bytes, one line per codec.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

Record = dict[str, Any]
BASELINE = "raw"


@dataclass
class FedTrainResult:
    """A finished run: its per-round records and one summary row per codec."""

    config: dict[str, Any]
    records: list[Record]
    rows: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    out_dir: str = ""

    def table(self) -> str:
        return format_table(self.rows)


class RecordWriter:
    """Appends round records to `out_dir/rounds.jsonl` (truncated when the writer is made)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "rounds.jsonl"
        self.path.write_text("")
        self.records: list[Record] = []

    def __call__(self, record: Record) -> None:
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def read_records(path: str | os.PathLike) -> list[Record]:
    """The records of a `rounds.jsonl` file (or of a gzipped one, `rounds.jsonl.gz`, as docs/results keeps them)."""
    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per codec, in the order the codecs ran: traffic per round, final quality, Δ vs raw."""
    by_codec: dict[str, list[Record]] = {}
    for r in records:
        by_codec.setdefault(r["codec"], []).append(r)
    rows = []
    for codec, recs in by_codec.items():
        rounds = sorted((r for r in recs if r["round"] > 0), key=lambda r: r["round"])
        final = max(recs, key=lambda r: r["round"])
        replies = sum(len(r["aggregated"]) for r in rounds)
        sent = sum(r["uplink_message_bytes"] or 0 for r in rounds)
        plain = sum(r["uplink_uncompressed_message_bytes"] or 0 for r in rounds)
        rows.append({
            "codec": codec,
            "error_feedback": bool(final.get("error_feedback")),
            "rounds": len(rounds),
            "replies": replies,
            "uplink_bytes_per_round": sent / len(rounds) if rounds else math.nan,
            "uplink_bytes_per_reply": sent / replies if replies else math.nan,
            "uplink_payload_bytes_per_reply": sum(r["uplink_payload_bytes"] for r in rounds) / replies if replies else math.nan,
            "compression": plain / sent if sent else math.nan,
            "eval_loss": final["eval_loss"],
            "eval_accuracy": final["eval_accuracy"],
            "encode_ms_per_reply": 1e3 * sum(r["encode_s"] for r in rounds) / replies if replies else math.nan,
            "decode_ms_per_reply": 1e3 * sum(r["decode_s"] for r in rounds) / replies if replies else math.nan,
            "failed_replies": sum(len(r["dropped"]) for r in rounds),
            "uncompressed_replies": sum(r["uncompressed_replies"] for r in rounds),
            "seconds": sum(r["round_s"] for r in rounds),
            "epsilon": final.get("epsilon", math.nan),
        })
    base = next((row for row in rows if row["codec"] == BASELINE), None)
    for row in rows:
        row["delta_loss"] = row["eval_loss"] - base["eval_loss"] if base else math.nan
        row["delta_accuracy"] = row["eval_accuracy"] - base["eval_accuracy"] if base else math.nan
    return rows


def _bytes(n: float) -> str:
    if not math.isfinite(n):
        return "–"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _signed(x: float, fmt: str, unit: str = "") -> str:
    return "–" if not math.isfinite(x) else format(x, "+" + fmt) + unit


def codec_label(spec: str) -> str:
    """`spec` as tables and plots show it: a learned codec's model file by its name, not its whole path."""
    return re.sub(r"model=([^,|]*)", lambda m: f"model={Path(m.group(1)).name}", spec)


def _epsilon(eps: float) -> str:
    """A dp row's privacy after the last round, as the codec cell shows it."""
    return "" if math.isnan(eps) else f" (ε={eps:.3g} at δ=1e-5)"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (Δ columns against the `raw` row; "–" without one).

    uplink / round: the Flower messages of a round's replies, summed over its clients; payload / client:
    one client's gradcodec payload; compression: the same messages uncompressed over as sent; the
    loss and accuracy are the global adapter's after the last round; encode / decode: per reply.
    """
    lines = [
        "| codec | uplink / round | payload / client | compression | eval loss | accuracy | Δ loss vs raw | Δ acc vs raw | encode ms | decode ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for row in rows:
        mark = ""
        if row["failed_replies"]:
            mark += "¹"
        if row["uncompressed_replies"]:
            mark += "²"
        lines.append(
            f"| `{codec_label(row['codec']).replace('|', chr(92) + '|')}`{' + EF' if row['error_feedback'] else ''}{mark}"
            f"{_epsilon(row.get('epsilon', math.nan))} | {_bytes(row['uplink_bytes_per_round'])} "
            f"| {_bytes(row['uplink_payload_bytes_per_reply'])} | {row['compression']:.1f}× "
            f"| {row['eval_loss']:.3f} | {row['eval_accuracy']:.1%} | {_signed(row['delta_loss'], '.3f')} "
            f"| {_signed(100 * row['delta_accuracy'], '.1f', ' pt')} | {row['encode_ms_per_reply']:.1f} | {row['decode_ms_per_reply']:.1f} |"
        )
    if any(r["failed_replies"] for r in rows):
        notes.append("¹ some clients' replies failed and were left out of their round (see rounds.jsonl, `dropped`)")
    if any(r["uncompressed_replies"] for r in rows):
        notes.append("² some clients could not encode with this codec and sent their update uncompressed")
    return "\n".join(lines + notes)


def plot(records: Sequence[Record], path: str | os.PathLike, title: str = "") -> None:
    """Eval loss vs round and vs cumulative uplink bytes (log scale), one line per codec, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_codec: dict[str, list[Record]] = {}
    for r in records:
        by_codec.setdefault(r["codec"], []).append(r)
    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for codec, recs in by_codec.items():
        recs = sorted(recs, key=lambda r: r["round"])
        evaluated = [r for r in recs if "eval_loss" in r]
        (line,) = by_round.plot([r["round"] for r in evaluated], [r["eval_loss"] for r in evaluated], marker="o", ms=3,
                                label=codec_label(codec))
        trained = [r for r in recs if r["round"] > 0]
        sent = [r["uplink_message_bytes"] or 0 for r in trained]
        cumulative = [sum(sent[: i + 1]) for i in range(len(sent))]
        points = [(c, r["eval_loss"]) for c, r in zip(cumulative, trained) if "eval_loss" in r]
        by_bytes.plot(*zip(*points), marker="o", ms=3, color=line.get_color(), label=codec_label(codec))
    by_round.set(xlabel="round", ylabel="eval loss (held-out, per response token)", title="eval loss vs round")
    by_bytes.set(xlabel="cumulative uplink bytes (Flower messages, all clients)", xscale="log", title="eval loss vs uplink traffic")
    for ax in (by_round, by_bytes):
        ax.grid(alpha=0.3)
    by_bytes.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _local_work(c: dict[str, Any]) -> str:
    return f"{c['local_epochs']:g} local epochs" if c["local_epochs"] > 0 else f"{c['local_steps']} local steps"


def write_summary(result: FedTrainResult) -> None:
    """summary.json, table.md and compare.png in the result's out_dir."""
    out = Path(result.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"config": result.config, "rows": result.rows, "wall_s": result.wall_s},
                                                 indent=1, sort_keys=True, default=str))
    (out / "table.md").write_text(result.table() + "\n")
    c = result.config
    plot(result.records, out / "compare.png",
         title=f"{c['model']} · {c['num_clients']} clients (Dirichlet α={c['dirichlet_alpha']}), {c['fraction']:.0%} per round, "
               f"{_local_work(c)}, LoRA r={c['lora_rank']}, error feedback {'on' if c['error_feedback'] else 'off'}")
