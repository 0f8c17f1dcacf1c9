"""Kernel tests run the Triton kernels on CPU through the interpreter when there is no GPU.

`@triton.jit` reads TRITON_INTERPRET when a kernel is defined, so it is set here, before any test module
imports a kernel module (moe_runtime.kernels itself imports them lazily, see kernels/backends.py).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
