"""Root pytest configuration, loaded before any test or benchmark module imports ``kernels``.

Triton decides at decoration time whether a ``@triton.jit`` function runs compiled or in its CPU
interpreter, so the interpreter switch must be set before ``kernels`` is first imported.  Without CUDA we
turn the interpreter on, so the Triton kernels themselves are exercised on the CPU (CONVENTIONS.md,
Dispatch); with CUDA nothing changes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
