"""Test-suite set-up shared by every test module."""
import os

import torch

# Triton kernels run on CPU tensors in Triton's interpreter; it must be chosen before any kernel is
# defined, so it is set here, before test modules import gradcodec.kernels' Triton modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
