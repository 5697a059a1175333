"""Render benchmark rows: a terminal table, a JSON file, and a rate-distortion plot."""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import torch

from .runner import Row

COLUMNS = [
    ("codec", "{:<34}", lambda r: (r.spec if r.peer is None else "  peer " + r.spec)[:34]),
    ("ratio", "{:>8}", lambda r: f"{r.ratio:.1f}x"),
    ("bits/el", "{:>8}", lambda r: f"{r.bits_per_element:.3f}"),
    ("rel_l2", "{:>8}", lambda r: f"{r.rel_l2:.4f}"),
    ("cosine", "{:>7}", lambda r: f"{r.cosine:.4f}"),
    ("SNR dB", "{:>7}", lambda r: "inf" if math.isinf(r.snr_db) else f"{r.snr_db:.1f}"),
    ("max_abs", "{:>9}", lambda r: f"{r.max_abs:.2e}"),
    ("enc GB/s", "{:>9}", lambda r: f"{r.gbps(r.encode):.3f}"),
    ("±", "{:>4}", lambda r: f"{100 * r.encode.spread:.0f}%"),
    ("enc/copy", "{:>8}", lambda r: f"{r.copy_fraction(r.encode):.2f}"),
    ("dec GB/s", "{:>9}", lambda r: f"{r.gbps(r.decode):.3f}"),
    ("±", "{:>4}", lambda r: f"{100 * r.decode.spread:.0f}%"),
    ("dec/copy", "{:>8}", lambda r: f"{r.copy_fraction(r.decode):.2f}"),
    ("enc mem", "{:>8}", lambda r: "-" if r.encode_peak_bytes is None else f"{r.encode_peak_bytes / r.input_bytes:.2f}x"),
]


def machine(helpers: int = 0) -> str:
    """One line naming the machine the figures come from, and how busy it was (1-minute load average,
    and the `--load` helper processes the bench ran beside the timing)."""
    cpu = platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = f", load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else ""
    extra = f", {helpers} busy helper processes during timing (--load)" if helpers else ""
    return f"{platform.system()} {cpu}, {torch.get_num_threads()} torch threads{gpu}, torch {torch.__version__}{load}{extra}"


def groups(rows: list[Row]) -> list[list[Row]]:
    """Rows split by (workload, size), in the order measured: each group shares one copy timing.

    Within a group each peer's row follows the gradcodec row nearest to it in bits per element.
    """
    keys = dict.fromkeys((r.workload, r.elements) for r in rows)
    return [beside_nearest([r for r in rows if (r.workload, r.elements) == key]) for key in keys]


def beside_nearest(rows: list[Row]) -> list[Row]:
    """gradcodec rows in their order, each followed by the peers whose size is nearest to its own."""
    ours = [r for r in rows if r.peer is None]
    if not ours:
        return rows
    after: dict[int, list[Row]] = {}
    for peer in (r for r in rows if r.peer is not None):
        nearest = min(range(len(ours)), key=lambda i: abs(math.log(ours[i].bits_per_element / peer.bits_per_element)))
        after.setdefault(nearest, []).append(peer)
    return [r for i, ours_row in enumerate(ours) for r in [ours_row, *after.get(i, [])]]


def table(rows: list[Row]) -> str:
    lines = []
    for group in groups(rows):
        first = group[0]
        copy_gbps = first.input_bytes / first.copy.median / 1e9
        lines.append(
            f"workload {first.workload}: {first.elements:,} elements, {first.input_bytes / 2**20:.1f} MiB;"
            f" copy (clone) {copy_gbps:.2f} GB/s ±{100 * first.copy.spread:.0f}%"
        )
        lines.append(" ".join(fmt.format(name) for name, fmt, _ in COLUMNS))
        lines += [" ".join(fmt.format(get(r)) for _, fmt, get in COLUMNS) for r in group]
        lines.append("")
    return "\n".join(lines)


def write_json(rows: list[Row], path: Path, command: str, helpers: int = 0, peers_skipped: list[str] = ()) -> None:
    payload = {"command": command, "machine": machine(helpers), "load_helpers": helpers,
               "peers_skipped": list(peers_skipped), "rows": [r.as_json() for r in rows]}
    path.write_text(json.dumps(payload, indent=1, default=float))


def family(spec: str) -> str:
    """The codec family a spec belongs to, for grouping points into curves.

    Stochastic rounding and a zstd stage make families of their own: on one curve they would zigzag
    between points of the same rate.
    """
    stages = [stage.split(":")[0] for stage in spec.split("|")]
    name = {"int8": "blockwise int", "int4": "blockwise int"}.get(stages[0], stages[0])
    if "stochastic=true" in spec:
        name += " stochastic"
    return name + " + zstd" if stages[-1] == "zstd" and len(stages) > 1 else name


def plot(rows: list[Row], path: Path) -> None:
    """Rate-distortion curves: bits per element vs relative L2 error, one line per codec family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = groups(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        group = [r for r in panel if r.rel_l2 > 0]
        for fam in dict.fromkeys(family(r.spec) for r in group):
            pts = sorted((r.bits_per_element, r.rel_l2) for r in group if family(r.spec) == fam)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fam)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bits per element")
        ax.set_ylabel("relative L2 error")
        ax.set_title(f"{panel[0].workload}, {panel[0].elements:,} elements")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
