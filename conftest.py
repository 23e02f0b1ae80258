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


def pytest_xdist_make_scheduler(config, log):
    """``-n auto`` (xdist's default distribution, ``load``): work stealing instead.  ``load`` hands out fixed
    chunks and keeps two tests queued per worker, so the suite could end with one worker idle while the
    other still holds a queue of one- and two-minute learning tests; ``worksteal`` splits the collection
    in two and an idle worker takes half of the other's queue.  Another ``--dist`` is left alone."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import WorkStealingScheduling

    return WorkStealingScheduling(config, log)
