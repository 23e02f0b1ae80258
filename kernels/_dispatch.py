"""Backend choice for every op: the Triton kernels or the PyTorch references (CONVENTIONS.md, Dispatch).

``auto`` (the default): CUDA tensors run the Triton kernels; CPU tensors run the reference, unless the
environment variable ``TRITON_INTERPRET=1`` is set *when the op is called*, in which case the Triton kernels
run in Triton's CPU interpreter (that is how CI exercises kernel code without a GPU).  Any other device
(``meta``, ``mps`` ...) runs the reference.

``reference`` / ``triton`` force a backend, process-wide (``set_backend``) or for a ``with`` block
(``use_backend``).  Forcing ``triton`` on CPU tensors needs the kernels to have been *decorated* by the
interpreter: Triton decides interpret-vs-compile when ``@triton.jit`` runs, i.e. when ``kernels`` is first
imported, so ``TRITON_INTERPRET=1`` must be set before that import.

Triton is optional: where it is not installed (macOS, a CPU-only wheel) every op runs the reference.
"""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "reference", "triton")

try:  # Triton is optional (no wheel on macOS / Windows): everything then runs the reference.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    HAS_TRITON = False

# Decided when the ``@triton.jit`` decorators ran (at ``import kernels``): interpreter or compiled kernels.
KERNELS_INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

_backend = "auto"


def _check_name(name) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide backend: ``"auto"`` (default), ``"reference"`` or ``"triton"``."""
    global _backend
    _backend = _check_name(name)


def get_backend() -> str:
    """The backend set by ``set_backend`` / the innermost ``use_backend`` block."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """``with kernels.use_backend("reference"): ...`` forces a backend inside the block, then restores it."""
    global _backend
    previous = _backend
    _backend = _check_name(name)
    try:
        yield
    finally:
        _backend = previous


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _require_triton_for(device: torch.device) -> None:
    if not HAS_TRITON:
        raise RuntimeError(
            "backend 'triton': triton is not installed; install it (Linux) or use "
            "kernels.use_backend('reference')"
        )
    if device.type == "cpu" and not KERNELS_INTERPRETED:
        raise RuntimeError(
            "backend 'triton' on CPU tensors: the Triton kernels were compiled for the GPU because "
            "TRITON_INTERPRET was not '1' when kernels was imported; set TRITON_INTERPRET=1 before importing "
            "kernels to run them in Triton's interpreter, or use kernels.use_backend('reference')"
        )


def active_backend(tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"``: which implementation an op given ``tensor`` runs now.

    Raises ``RuntimeError`` where Triton is asked for (forced, or ``TRITON_INTERPRET=1`` on CPU) but
    cannot run.
    """
    return backend_for_device(tensor.device)


def backend_for_device(device: torch.device) -> str:
    """``active_backend`` for an op whose outputs live on ``device``."""
    device = torch.device(device)
    if _backend == "reference":
        return "reference"
    if _backend == "triton":
        if device.type in ("cuda", "cpu"):
            _require_triton_for(device)
        return "triton"
    # auto
    if device.type == "cuda":
        return "triton" if HAS_TRITON else "reference"
    if device.type == "cpu" and _interpret_requested():
        _require_triton_for(device)
        return "triton"
    return "reference"
