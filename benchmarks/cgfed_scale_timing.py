"""cgfed shared AE: CPU encode/decode of LLaMA-scale adapters against a copy of the same bytes, side by side
(each repeat times every op once; minimum of `repeats`), plus the model files' sizes. docs/results/cgfed-scale.md.

    python benchmarks/cgfed_scale_timing.py [repeats] [threads]
"""
import json, sys, time, math
import torch
import gradcodec
from gradcodec.integrations.fedlora.presets import lora_shapes, ALL_LINEAR
from gradcodec.learned.canvas import CanvasLayout
from gradcodec.learned.model import AEConfig, build_encoder, build_decoder
from gradcodec.learned.modelfile import LearnedModel

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 7
rows = []
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
    flat = torch.cat([v.view(-1) for v in x.values()])
    def copy_enc(): torch.cat([v.view(-1) for v in x.values()])
    def copy_dec():
        outs = [torch.empty_like(v) for v in x.values()]
        at = 0
        for o in outs:
            o.view(-1).copy_(flat[at:at + o.numel()]); at += o.numel()
    fns = {"copy (encode side)": copy_enc, "encode": lambda: codec.encode(x),
           "copy (decode side)": copy_dec, "decode": lambda: codec.decode(blob)}
    best = {k: math.inf for k in fns}
    for _ in range(repeats):  # interleaved: each repeat times every op once
        for k, f in fns.items():
            t = time.perf_counter(); f(); best[k] = min(best[k], time.perf_counter() - t)
    import os, tempfile
    with tempfile.TemporaryDirectory() as d:
        model.save(f"{d}/e.safetensors", parts=("encoder",)); model.save(f"{d}/d.safetensors", parts=("decoder",))
        files = {"encoder_file_bytes": os.path.getsize(f"{d}/e.safetensors"), "decoder_file_bytes": os.path.getsize(f"{d}/d.safetensors")}
    if preset == "llama-2-7b":  # today's block AE (64x1 tiles) on the same adapter, same run
        bcfg = AEConfig.block(layout, 1 / 64, 64, 1)
        bmodel = LearnedModel.trained(bcfg, build_encoder(bcfg), build_decoder(bcfg))
        bcodec = gradcodec.get_codec("cgfed", model=bmodel); bblob = bcodec.encode(x)
        fns["block 64x1 encode"] = lambda: bcodec.encode(x)
        fns["block 64x1 decode"] = lambda: bcodec.decode(bblob)
        best = {k: math.inf for k in fns}
        for _ in range(repeats):
            for k, f in fns.items():
                t = time.perf_counter(); f(); best[k] = min(best[k], time.perf_counter() - t)
        files["block_64x1_encoder_params"] = sum(p.numel() for p in bmodel.encoder.parameters())
    enc_params = sum(p.numel() for p in model.encoder.parameters())
    row = {**files, "adapter": name, "values": layout.numel, "fp32_bytes": layout.numel * 4, "payload_bytes": len(blob),
           "encoder_params": enc_params, "encoder_fp32_bytes": enc_params * 4,
           **{f"{k} ms": round(v * 1e3, 2) for k, v in best.items()},
           **{f"{k} / copy": round(v / best["copy (encode side)" if "encode" in k else "copy (decode side)"], 2)
              for k, v in best.items() if not k.startswith("copy")}}
    rows.append(row); print(json.dumps(row), flush=True)
    del x, codec, model, flat
print(json.dumps({"repeats": repeats, "threads": torch.get_num_threads(), "rows": rows}))
