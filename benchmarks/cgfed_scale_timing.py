"""cgfed shared AE: CPU encode/decode of LLaMA-scale adapters against a copy of the same bytes, side by side
(each repeat times every op once; minimum of `repeats`), plus the model files' sizes. docs/results/cgfed-scale.md.

    python benchmarks/cgfed_scale_timing.py [repeats] [threads] [--baseline DIR]

--baseline DIR also times another gradcodec's cgfed on the same model and inputs in the same loop, and
checks that its payloads and decoded tensors equal ours. DIR holds that version as a package named
gradcodec_old, e.g. the commit before the fast shared-AE paths:

    git archive b390b56 gradcodec kernels | tar -x -C /tmp/gcb && mkdir -p /tmp/base
    cp -r /tmp/gcb/gradcodec /tmp/base/gradcodec_old && cp -r /tmp/gcb/kernels /tmp/base/gradcodec_old/kernels
    sed -i 's/"gradcodec\.codecs/"gradcodec_old.codecs/g' /tmp/base/gradcodec_old/registry.py
"""
import json, sys, time, math, os, resource, tempfile
import torch
import gradcodec
from gradcodec.integrations.fedlora.presets import lora_shapes, ALL_LINEAR
from gradcodec.learned.canvas import CanvasLayout
from gradcodec.learned.model import AEConfig, build_encoder, build_decoder
from gradcodec.learned.modelfile import LearnedModel

args = sys.argv[1:]
Baseline = None
if "--baseline" in args:
    at = args.index("--baseline")
    sys.path.insert(0, args[at + 1])
    del args[at:at + 2]
    from gradcodec_old.codecs.learned import CGFedCodec as Baseline
torch.set_num_threads(int(args[1]) if len(args) > 1 else 1)
repeats = int(args[0]) if args else 7
rows = []


def timed(fns):
    """Per op: the minimum time of `repeats` calls (interleaved: each repeat times every op once), and the
    minor page faults per call (a fresh allocation's pages: what makes the copies' times swing)."""
    best, faults = {k: math.inf for k in fns}, {k: 0 for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter(); f(); best[k] = min(best[k], time.perf_counter() - t)
            faults[k] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return best, {k: v // repeats for k, v in faults.items()}


for name, preset, rank, targets in [("llama-2-7b q/k/v/o r8", "llama-2-7b", 8, None),
                                    ("llama-3.2-1b all-linear r16", "llama-3.2-1b", 16, ALL_LINEAR),
                                    ("llama-3-8b all-linear r16", "llama-3-8b", 16, ALL_LINEAR)]:
    shapes = lora_shapes(preset, rank, targets) if targets else lora_shapes(preset, rank)
    layout = CanvasLayout.for_shapes(shapes)
    cfg = AEConfig.shared(layout)
    torch.manual_seed(0)
    model = LearnedModel.trained(cfg, build_encoder(cfg), build_decoder(cfg))
    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
    codec = gradcodec.get_codec("cgfed", model=model)
    blob = codec.encode(x)
    check = {}
    if Baseline is not None:
        model_dir = tempfile.TemporaryDirectory()
        model.save(f"{model_dir.name}/m.safetensors")
        base = Baseline(model=f"{model_dir.name}/m.safetensors")
        base_blob = base.encode(x)
        ours, theirs = codec.decode(blob), base.decode(base_blob)
        check = {"baseline payload identical": base_blob == blob,
                 "baseline decoded identical": all(torch.equal(ours[k], theirs[k]) for k in x)}
        del ours, theirs
    flat = torch.cat([v.view(-1) for v in x.values()])
    def copy_enc(): torch.cat([v.view(-1) for v in x.values()])
    def copy_dec():
        outs = [torch.empty_like(v) for v in x.values()]
        at = 0
        for o in outs:
            o.view(-1).copy_(flat[at:at + o.numel()]); at += o.numel()
    kept = [torch.empty_like(v) for v in x.values()]
    def copy_kept():  # the same copy into tensors that already exist: no allocation, no page faults
        at = 0
        for o in kept:
            o.view(-1).copy_(flat[at:at + o.numel()]); at += o.numel()
    fns = {"copy (encode side)": copy_enc, "encode": lambda: codec.encode(x),
           "copy (decode side)": copy_dec, "decode": lambda: codec.decode(blob), "copy into kept tensors": copy_kept}
    if Baseline is not None:
        fns["baseline encode"] = lambda: base.encode(x)
        fns["baseline decode"] = lambda: base.decode(base_blob)
    best, faults = timed(fns)
    with tempfile.TemporaryDirectory() as d:
        model.save(f"{d}/e.safetensors", parts=("encoder",)); model.save(f"{d}/d.safetensors", parts=("decoder",))
        files = {"encoder_file_bytes": os.path.getsize(f"{d}/e.safetensors"), "decoder_file_bytes": os.path.getsize(f"{d}/d.safetensors")}
    if preset == "llama-2-7b":  # today's block AE (64x1 tiles) on the same adapter, same run
        bcfg = AEConfig.block(layout, 1 / 64, 64, 1)
        bmodel = LearnedModel.trained(bcfg, build_encoder(bcfg), build_decoder(bcfg))
        bcodec = gradcodec.get_codec("cgfed", model=bmodel); bblob = bcodec.encode(x)
        fns["block 64x1 encode"] = lambda: bcodec.encode(x)
        fns["block 64x1 decode"] = lambda: bcodec.decode(bblob)
        best, faults = timed(fns)
        files["block_64x1_encoder_params"] = sum(p.numel() for p in bmodel.encoder.parameters())
    enc_params = sum(p.numel() for p in model.encoder.parameters())
    row = {**files, **check, "adapter": name, "values": layout.numel, "fp32_bytes": layout.numel * 4, "payload_bytes": len(blob),
           "encoder_params": enc_params, "encoder_fp32_bytes": enc_params * 4,
           **{f"{k} ms": round(v * 1e3, 2) for k, v in best.items()},
           **{f"{k} page faults": v for k, v in faults.items()},
           **{f"{k} / copy": round(v / best["copy (encode side)" if "encode" in k else "copy (decode side)"], 2)
              for k, v in best.items() if not k.startswith("copy")},
           **{f"{k} / copy into kept": round(v / best["copy into kept tensors"], 2)
              for k, v in best.items() if not k.startswith("copy")}}
    rows.append(row); print(json.dumps(row), flush=True)
    del x, codec, model, flat
    if Baseline is not None:
        del base, base_blob
        model_dir.cleanup()
print(json.dumps({"repeats": repeats, "threads": torch.get_num_threads(), "rows": rows}))
