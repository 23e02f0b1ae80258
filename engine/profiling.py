"""NVTX ranges for Nsight Systems timelines (rollout, reward, train phases).

``nvtx_range(name)`` pushes an NVTX range with the ``nvtx`` package; without the package it is a no-op.
With no profiler attached NVTX calls return at once (the NVTX library only records once a tool injects
itself), so the ranges stay in production code.  ``NFT_NVTX=0`` turns them off entirely.
"""

from __future__ import annotations

import contextlib
import os

try:  # optional dependency
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - exercised only where the package is missing
    _nvtx = None

__all__ = ["nvtx_range", "nvtx_available", "DOMAIN"]

DOMAIN = "nft_engine"


def nvtx_available() -> bool:
    """True when ranges are really emitted (package present and ``NFT_NVTX`` not ``0``)."""
    return _nvtx is not None and os.environ.get("NFT_NVTX", "1") != "0"


@contextlib.contextmanager
def nvtx_range(name: str, color: str | None = None):
    """An NVTX push/pop range named ``name`` in the ``nft_engine`` domain (a no-op without ``nvtx``)."""
    if not nvtx_available():
        yield
        return
    _nvtx.push_range(message=name, color=color, domain=DOMAIN)
    try:
        yield
    finally:
        _nvtx.pop_range(domain=DOMAIN)
