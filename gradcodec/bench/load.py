"""`gradcodec bench --load N`: N CPU-bound helper processes beside the timing, the contended case on demand.

Codecs run beside training on the same cores; a busy neighbour is what broke torch's many small
parallel regions (docs/results/cpu-contention.md). Each helper is a Python process spinning on one
core. They are stopped when the `cpu_load` block ends, by an exception or Ctrl-C too, and a helper
whose parent dies without that (SIGKILL) notices its new parent and exits within a fraction of a second.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

# spins until the process that started it is gone
_SPIN = "import os, sys\nparent = int(sys.argv[1])\nwhile os.getppid() == parent:\n    for _ in range(200_000):\n        pass\n"


@contextlib.contextmanager
def cpu_load(n: int) -> Iterator[list[subprocess.Popen]]:
    """Run n spinning helper processes for the duration of the block; n = 0 starts nothing."""
    if n < 0:
        raise ValueError(f"--load must be 0 or more helper processes, got {n}")
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", _SPIN, str(os.getpid())],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
