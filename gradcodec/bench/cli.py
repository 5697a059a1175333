"""`gradcodec bench`: the command-line front of gradcodec.bench."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="compression ratio, error and speed per codec")
    b.add_argument("--codecs", default="default", help="specs and/or sets (default, sweep), separated by ';' or ','")
    b.add_argument("--workload", default="gaussian", help="gaussian, heavy, lowrank, lora7b, file:PATH (comma-separated)")
    b.add_argument("--size", default="16M",
                   help="elements of a synthetic workload, e.g. 16M, or a comma-separated list: 64K,1M,16M,64M")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--load", type=int, default=0, metavar="N",
                   help="run N CPU-bound helper processes while timing (the contended case), stopped after")
    b.add_argument("--peers", nargs="?", const="all", metavar="LIST",
                   help="also measure what a user would pick instead, where installed: all (default) or some of "
                        "bnb:int8, bnb:nf4, bnb:fp4, nvflare:adaquant, torch:powersgd, torch:fp16, torch:bf16")
    b.add_argument("--json", help="write every measurement to this JSON file")
    b.add_argument("--plot", help="write rate-distortion curves to this PNG file")
    b.add_argument("--verbose", action="store_true", help="print each row as it is measured")
    b.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from . import load, peers, report, runner, workloads

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    specs = runner.expand_codecs(args.codecs)
    sizes = workloads.parse_sizes(args.size)
    peer_list, skipped = [], []
    if args.peers:
        peer_list, skipped = peers.build(peers.parse(args.peers), peers.powersgd_rank(specs), args.seed)
    rows = []
    with load.cpu_load(args.load):  # the helpers stop when the block ends, also on an error or Ctrl-C
        for name in (w.strip() for w in args.workload.split(",")):
            # lora7b and files have their own size: measured once, whatever the size list
            for size in sizes if name in workloads.SIZED else sizes[:1]:
                x = workloads.make_workload(name, size, seed=args.seed, device=args.device)
                copy = runner.copy_timing(x, args.repeats)  # each (workload, size) gets its own yardstick
                for item in specs + peer_list:
                    if isinstance(item, str):
                        rows.append(runner.bench_codec(item, x, name, args.repeats, copy, seed=args.seed))
                    else:
                        rows.append(runner.bench_peer(item, x, name, args.repeats, copy))
                    if args.verbose:
                        print(report.table(rows[-1:]), flush=True)
                del x
    command = "gradcodec " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"# {command}\n# {report.machine(args.load)}\n")
    if skipped:
        print(f"# peers not installed here, skipped: {', '.join(skipped)}\n")
    print(report.table(rows))
    if args.json:
        report.write_json(rows, Path(args.json), command, args.load, skipped)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(rows, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0
