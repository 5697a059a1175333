"""The `gradcodec` console script: bench, inspect (and, with the [fl] extra, fedtrain, capture, train-ae)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import api
from .errors import GradcodecError


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import report, runner, workloads

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    specs = runner.expand_codecs(args.codecs)
    rows = []
    for name in args.workload.split(","):
        x = workloads.make_workload(name.strip(), workloads.parse_size(args.size), seed=args.seed, device=args.device)
        copy = runner.copy_timing(x, args.repeats)
        for spec in specs:
            try:
                rows.append(runner.bench_codec(spec, x, name.strip(), args.repeats, copy, seed=args.seed))
            except GradcodecError as e:
                print(f"{spec}: {e}", file=sys.stderr)
                return 2
            if args.verbose:
                print(report.table(rows[-1:]), flush=True)
    command = "gradcodec " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"# {command}\n# {report.machine()}\n")
    print(report.table(rows))
    if args.json:
        report.write_json(rows, Path(args.json), command)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(rows, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = api.inspect(Path(args.payload).read_bytes())
    print(f"codec      {info.codec}\nversion    {info.version}")
    print(f"fingerprint {info.fingerprint or '-'}\ncompressed {info.compressed}")
    print(f"size       {info.payload_bytes} bytes, decodes to {info.original_bytes} bytes ({info.ratio:.1f}x)")
    for t in info.tensors:
        print(f"  {t.name or '(tensor)'}  {tuple(t.shape)}  {str(t.dtype).replace('torch.', '')}  {t.payload_bytes} bytes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradcodec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="compression ratio, error and speed per codec")
    b.add_argument("--codecs", default="default", help="specs and/or sets (default, sweep), separated by ';' or ','")
    b.add_argument("--workload", default="gaussian", help="gaussian, heavy, lowrank, lora7b, file:PATH (comma-separated)")
    b.add_argument("--size", default="16M", help="elements of a synthetic workload, e.g. 64K, 16M")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", help="write every measurement to this JSON file")
    b.add_argument("--plot", help="write rate-distortion curves to this PNG file")
    b.add_argument("--verbose", action="store_true", help="print each row as it is measured")
    b.set_defaults(run=_cmd_bench)

    i = sub.add_parser("inspect", help="describe a payload file without decoding it")
    i.add_argument("payload")
    i.set_defaults(run=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (GradcodecError, FileNotFoundError, ValueError) as e:
        print(f"gradcodec {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
