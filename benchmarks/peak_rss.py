"""Run a command and record the peak resident memory of it and of every process it starts.

    python benchmarks/peak_rss.py --json peaks.json -- gradcodec fedtrain ...

Flower's simulation runs the ServerApp in the command's own process and each virtual client in a Ray
worker process, so one number for the command would hide where the memory goes. Every `--every`
seconds this reads /proc/<pid>/status of the command's descendants and keeps each one's VmHWM (the
kernel's own high-water mark of that process's resident set, so a short peak between two samples is
still counted; only a process that starts and ends between two samples is missed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(root: int) -> list[int]:
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += tree.get(pid, [])
    return out


def _status(pid: int) -> tuple[str, int] | None:
    """(command line, VmHWM in bytes) of `pid`, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return cmd, int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--every", type=float, default=1.0)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    t0 = time.perf_counter()
    proc = subprocess.Popen(command)
    peaks: dict[int, dict] = {}
    while proc.poll() is None:
        for pid in _descendants(proc.pid):
            status = _status(pid)
            if status is not None and status[1] >= peaks.get(pid, {}).get("vm_hwm_bytes", 0):
                peaks[pid] = {"pid": pid, "cmdline": status[0][:300], "vm_hwm_bytes": status[1]}
        time.sleep(args.every)
    wall = time.perf_counter() - t0
    top = sorted(peaks.values(), key=lambda r: -r["vm_hwm_bytes"])
    with open(args.json, "w") as f:
        json.dump({"command": command, "returncode": proc.returncode, "wall_s": wall, "processes": top}, f, indent=1)
    for r in top[:8]:
        print(f"peak RSS {r['vm_hwm_bytes'] / 2**30:6.2f} GiB  pid {r['pid']}  {r['cmdline'][:100]}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
