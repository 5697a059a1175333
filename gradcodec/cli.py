"""The `gradcodec` console script.

Each subcommand lives with the code it fronts and registers itself here: `bench` (gradcodec.bench),
`inspect` (below), and, with the [fl] extra installed, the federated and learned-codec commands.
Registering only defines arguments; heavy imports happen when a command runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from . import api
from .errors import GradcodecError

# modules with a `register(subparsers)` function; a missing optional dependency skips the module
SUBCOMMAND_MODULES = (
    "gradcodec.bench.cli",
    "gradcodec.learned.cli",
    "gradcodec.integrations.fedlora.cli",
)


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = api.inspect(Path(args.payload).read_bytes())
    print(f"codec       {info.codec}\nversion     {info.version}")
    print(f"fingerprint {info.fingerprint or '-'}\ncompressed  {info.compressed}")
    print(f"size        {info.payload_bytes} bytes, decodes to {info.original_bytes} bytes ({info.ratio:.1f}x)")
    for t in info.tensors:
        print(f"  {t.name or '(tensor)'}  {tuple(t.shape)}  {str(t.dtype).replace('torch.', '')}  {t.payload_bytes} bytes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradcodec", description="Gradient and LoRA-update compression.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("gradcodec"):
                continue  # that part of gradcodec is not present in this installation
            raise
        module.register(sub)
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
