"""Test-suite set-up shared by every test module."""
import os
import sys
import tempfile
from pathlib import Path

import torch

# Triton kernels run on CPU tensors in Triton's interpreter; it must be chosen before any kernel is
# defined, so it is set here, before test modules import gradcodec.kernels' Triton modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest imports this package without putting the repository root on sys.path (pytest.ini:
# --import-mode=importlib), so that the top-level kernels/ folder cannot shadow the PyPI package
# `kernels`. Child processes that tests start (DDP workers by torch.multiprocessing.spawn, Ray's
# simulation workers) unpickle functions of these modules by name, so they must find `tests` too: a
# directory holding nothing but a link to this package goes on sys.path (which multiprocessing's spawn
# hands to its children) and on PYTHONPATH (for everything else).
_TESTS_ONLY = Path(tempfile.mkdtemp(prefix="gradcodec-tests-path-"))
(_TESTS_ONLY / "tests").symlink_to(Path(__file__).resolve().parent, target_is_directory=True)
sys.path.append(str(_TESTS_ONLY))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_TESTS_ONLY), os.environ.get("PYTHONPATH")) if p)
