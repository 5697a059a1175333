"""Held-out evaluation of codecs on captured round updates: the figures of docs/results.md.

Every codec is run as a client would run it: one codec object per client (so error feedback keeps one
residual per client across the rounds it takes part in), records in upload order, each payload decoded
from its bytes. Reported per codec (all from gradcodec.metrics.distortion, against the true update):

  cosine, rel_l2   mean over uploads of the cosine / relative L2 error of the decoded update
  snr_db           10 log10(sum ||x||² / sum ||x - x̂||²) over all uploads (standard SNR, pooled)
  cum_cosine       mean over clients of cos(sum of decoded updates, sum of true updates): what error
                   feedback is for (it trades one round's error for the long-run sum)
  avg_cosine       mean over rounds of cos(FedAvg of decoded updates, FedAvg of true updates): what
                   the server applies
  bytes            mean payload bytes per upload; data_bytes: of which payload region (sections),
                   the rest being the header's tensor table (about 70 bytes per tensor)

`representation="state"` is the CG-FedLLM paper's input: the codec encodes the client's LoRA *state*,
and the server's view of the update is decoded state minus the global adapter it sent.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from .. import wire
from ..metrics import distortion
from .canvas import CanvasLayout, adapter_from_lora_canvas, lora_canvas_from_adapter

Named = dict[str, torch.Tensor]


class Uplink(Protocol):
    def encode(self, x: Named) -> bytes: ...

    def decode(self, blob: bytes) -> Named: ...


class CanvasCodec:
    """A per-tensor codec applied to the whole LoRA canvas as one matrix (e.g. PowerSGD of the canvas):
    the linear, untrained counterpart of the AE on the same input."""

    def __init__(self, codec: Any, layout: CanvasLayout):
        self.codec, self.layout = codec, layout

    def encode(self, x: Named) -> bytes:
        return self.codec.encode(lora_canvas_from_adapter(x, self.layout))

    def decode(self, blob: bytes) -> Named:
        return adapter_from_lora_canvas(self.codec.decode(blob), self.layout)


def data_bytes(blob: bytes) -> int:
    """Bytes of a payload's section region (as stored), i.e. without prelude, header and checksum."""
    return wire.read_header(blob).stored_payload_len


def _add(acc: dict, x: Mapping[str, torch.Tensor], w: float = 1.0) -> None:
    for k, v in x.items():
        acc[k] = acc[k] + w * v.double() if k in acc else w * v.double()


def evaluate_uplink(make: Callable[[], Uplink], records: Sequence[Mapping], representation: str = "update") -> dict[str, float]:
    """Run `make()` (one codec object per client) over `records` (capture records, in upload order)."""
    codecs: dict[int, Uplink] = {}
    cos, rel, energy, err_energy, sizes, data = [], [], 0.0, 0.0, [], []
    cum_true: dict[int, dict] = defaultdict(dict)
    cum_dec: dict[int, dict] = defaultdict(dict)
    rounds: dict[int, list] = defaultdict(list)
    for rec in records:
        codec = codecs.setdefault(rec["client"], make())
        update = rec["update"]
        blob = codec.encode(dict(rec[representation]))
        decoded = codec.decode(blob)
        if representation == "state":  # the server subtracts the global adapter it sent
            decoded = {k: decoded[k] - (rec["state"][k] - update[k]) for k in update}
        d = distortion(update, decoded)
        cos.append(d["cosine"])
        rel.append(d["rel_l2"])
        e = sum(float(v.double().square().sum()) for v in update.values())
        energy += e
        err_energy += e * d["rel_l2"] ** 2
        sizes.append(len(blob))
        data.append(data_bytes(blob))
        _add(cum_true[rec["client"]], update)
        _add(cum_dec[rec["client"]], decoded)
        rounds[rec["round"]].append((rec.get("num_examples", 1), update, decoded))
    avg_cos = []
    for uploads in rounds.values():
        total = sum(w for w, _, _ in uploads)
        true, dec = {}, {}
        for w, u, dd in uploads:
            _add(true, u, w / total)
            _add(dec, dd, w / total)
        avg_cos.append(distortion(true, dec)["cosine"])
    n = len(records)
    return {
        "uploads": n,
        "bytes": sum(sizes) / n,
        "data_bytes": sum(data) / n,
        "cosine": sum(cos) / n,
        "rel_l2": sum(rel) / n,
        "snr_db": 10 * math.log10(energy / err_energy) if err_energy else math.inf,
        "cum_cosine": sum(distortion(cum_true[c], cum_dec[c])["cosine"] for c in cum_true) / len(cum_true),
        "avg_cosine": sum(avg_cos) / len(avg_cos),
    }


def match_bytes(make_for: Callable[[float], Uplink], target: float, sample: Named, lo: float, hi: float,
                integer: bool = False) -> float:
    """The parameter (in [lo, hi]) whose payload region on `sample` comes closest to `target` bytes
    from below, by bisection (payload size grows with the parameter); the smallest if none fits."""
    def size(p: float) -> int:
        return data_bytes(make_for(p).encode(sample))

    if size(lo) >= target:
        return lo
    for _ in range(40):
        mid = (lo + hi) / 2 if not integer else (lo + hi) // 2
        if integer and mid in (lo, hi):
            break
        lo, hi = (mid, hi) if size(mid) <= target else (lo, mid)
    return lo


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of evaluation rows (name, ratio, ef and the metrics of evaluate_uplink)."""
    head = "| codec | ratio | EF | bytes/upload | data bytes | cosine | rel. L2 | SNR dB | cum. cosine | avg. cosine |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r.get('ratio', '')} | {'yes' if r.get('ef') else 'no'} | {r['bytes']:.0f} | "
            f"{r['data_bytes']:.0f} | {r['cosine']:.3f} | {r['rel_l2']:.3f} | {r['snr_db']:.2f} | "
            f"{r['cum_cosine']:.3f} | {r['avg_cosine']:.3f} |"
        )
    return "\n".join(lines)


def evaluation_rows(model, records: Sequence[Mapping], residual: float = 0.01, baselines: bool = False,
                    progress: Callable[[dict], None] | None = None) -> list[dict]:
    """The rows of one AE (its representation as trained): cgfed (int8 and int4 latents) without and with
    error feedback, with the residual stage, and, with `baselines`, top-k (per tensor and over the whole
    canvas, int8 and int4 values) and PowerSGD of the canvas matched to its bytes."""
    from .. import api

    rep = model.training.get("representation", "update")
    ratio = f"1/{round(1 / model.config.ratio)}"
    name = f"cgfed {model.config.arch} ({rep})"
    rows: list[dict] = []

    def add(label: str, make: Callable[[], Uplink], ef: bool, representation: str = "update") -> dict:
        row = {"name": label, "ratio": ratio, "ef": ef, **evaluate_uplink(make, records, representation)}
        rows.append(row)
        if progress:
            progress(row)
        return row

    base = add(name, lambda: api.get_codec("cgfed", model=model), False, rep)
    if rep != "update":
        return rows
    add(f"{name}, int4 latent", lambda: api.get_codec("cgfed", model=model, bits=4), False)
    if model.decoder is not None:
        add(name, lambda: api.get_codec("cgfed", model=model, error_feedback=True), True)
        if residual:
            add(f"{name} + top-k {residual} residual", lambda: api.get_codec("cgfed", model=model, residual=residual,
                                                                               error_feedback=True), True)
    if baselines:
        sample, target = dict(records[0]["update"]), base["data_bytes"]
        layout = CanvasLayout.of(sample)
        r = match_bytes(lambda p: api.get_codec(f"topk:ratio={p!r}|int8"), target, sample, 1e-5, 0.5)
        for ef in (False, True):
            add(f"topk:ratio={r:.4g}|int8", lambda: api.get_codec(f"topk:ratio={r!r}|int8", error_feedback=ef), ef)
        # one top-k over the whole canvas: no per-tensor minimum of one kept value and its section overhead;
        # with int4 values, the "int4 at the same bytes" of this budget
        for values in ("int8", "int4"):
            rc = match_bytes(lambda p: CanvasCodec(api.get_codec(f"topk:ratio={p!r}|{values}"), layout), target, sample,
                             1e-5, 0.5)
            for ef in (False, True):
                add(f"topk:ratio={rc:.4g}|{values} of the canvas",
                    lambda: CanvasCodec(api.get_codec(f"topk:ratio={rc!r}|{values}", error_feedback=ef), layout), ef)
        k = int(match_bytes(lambda p: CanvasCodec(api.get_codec(f"powersgd:rank={int(p)}|int8"), layout), target,
                            sample, 1, 256, integer=True))
        add(f"powersgd:rank={k}|int8 of the canvas", lambda: CanvasCodec(api.get_codec(f"powersgd:rank={k}|int8"), layout),
            False)
    return rows


def reference_rows(records: Sequence[Mapping], progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Classic codecs at their smallest useful settings, whatever the bytes: per-tensor PowerSGD rank 1, int4."""
    from .. import api

    rows = []
    for spec in ("powersgd:rank=1|int8", "int4"):
        for ef in (False, True):
            row = {"name": spec, "ratio": "-", "ef": ef,
                   **evaluate_uplink(lambda: api.get_codec(spec, error_feedback=ef), records)}
            rows.append(row)
            if progress:
                progress(row)
    return rows
