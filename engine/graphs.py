"""CUDA-graph capture of one rollout step (denoiser forward + fused solver step), after stable-fast's
graphs.py.

A step is a function ``fn(inputs: dict[str, Tensor]) -> dict[str, Tensor]`` that reads every per-step value
(state, sigma, sigma_next, timestep, seeds, noise offset, solver state, conditioning) from its ``inputs``.
:class:`GraphCache` captures it once per key into static input/output buffers, so one graph serves every
step of every rollout with the same key; each call copies the inputs in, replays, and copies the outputs
out.  Keys carry the caller's part (solver kind, CFG flag, adapter, ...) plus every input's shape, strides,
dtype and device.  One memory pool is shared by all graphs, warm-up runs on a side stream before capture,
the number of graphs is capped (LRU eviction), a failed capture falls back to eager with one warning, and
``NFT_CUDA_GRAPHS=0`` turns graphs off.  CPU inputs always run eagerly through the same ``fn``.

Sharing the pool is safe because every replay's outputs are cloned before any other graph runs: a later
graph may reuse the pool memory behind an earlier graph's static outputs, never the static inputs (those are
allocated outside capture).  Graphs read parameters by address, so in-place optimizer / EMA updates of the
weights are seen at replay; replacing a parameter tensor, or changing Python-level control flow inside the
denoiser without changing its ``graph_key()``, needs ``GraphCache.clear()``.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from .profiling import nvtx_range

__all__ = ["GraphCache", "graphs_enabled_by_env", "max_graphs_from_env"]

StepFn = Callable[[dict], dict]


def graphs_enabled_by_env() -> bool:
    """``NFT_CUDA_GRAPHS=0`` (or ``false``/``off``) disables capture; anything else leaves it on."""
    return os.environ.get("NFT_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "off", "no")


def max_graphs_from_env() -> int:
    """``NFT_MAX_GRAPHS`` (default 16): the most graphs one cache keeps."""
    raw = os.environ.get("NFT_MAX_GRAPHS", "16")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"NFT_MAX_GRAPHS: expected an int >= 1, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"NFT_MAX_GRAPHS: expected an int >= 1, got {n}")
    return n


def _signature(inputs: dict) -> tuple:
    return tuple(
        (name, tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))
        for name, t in sorted(inputs.items())
    )


class _Entry:
    __slots__ = ("graph", "static_in", "static_out", "owner_ref", "last_src")

    def __init__(self, graph, static_in, static_out, owner_ref):
        self.graph = graph
        self.static_in = static_in
        self.static_out = static_out
        self.owner_ref = owner_ref
        # Inputs constant over a rollout (conditioning, seeds) are copied only when the source tensor changes.
        self.last_src: dict[str, tuple] = {}


class GraphCache:
    """LRU cache of captured step graphs sharing one memory pool.

    ``enabled=None`` and ``max_graphs=None`` read ``NFT_CUDA_GRAPHS`` and ``NFT_MAX_GRAPHS``.
    ``warmup_iters`` eager runs on a side stream precede each capture
    (they also compile / autotune Triton kernels).
    """

    def __init__(self, *, enabled: bool | None = None, max_graphs: int | None = None, warmup_iters: int = 2):
        self.enabled = graphs_enabled_by_env() if enabled is None else bool(enabled)
        self.max_graphs = max_graphs_from_env() if max_graphs is None else int(max_graphs)
        if self.max_graphs < 1:
            raise ValueError(f"max_graphs: expected an int >= 1, got {self.max_graphs}")
        self.warmup_iters = int(warmup_iters)
        self._graphs: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._failed: set[Hashable] = set()
        self._pool = None
        self._warned = False
        self.captures = 0  # number of successful captures (evictions make it exceed len(self))
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph (and with them the pool's blocks once nothing else holds them)."""
        self._graphs.clear()
        self._failed.clear()

    def active(self, inputs: dict) -> bool:
        """Graphs apply when enabled, on CUDA, with every input a CUDA tensor, and outside another capture."""
        if not self.enabled or not torch.cuda.is_available():
            return False
        if not all(t.is_cuda for t in inputs.values()):
            return False
        return not torch.cuda.is_current_stream_capturing()

    def run(self, key: Hashable, fn: StepFn, inputs: dict, owner=None) -> dict:
        """``fn(inputs)`` through a graph captured for ``(key, input signature)``, or eagerly.

        ``owner`` (the denoiser) is held weakly: a graph whose owner died is never replayed for a new object
        that happens to reuse its ``id``.  Returned tensors are fresh copies, not the static buffers.
        """
        if not self.active(inputs):
            return fn(inputs)
        full_key = (key, _signature(inputs))
        if full_key in self._failed:
            return fn(inputs)
        entry = self._graphs.get(full_key)
        if entry is not None and owner is not None and entry.owner_ref() is not owner:
            del self._graphs[full_key]
            entry = None
        if entry is None:
            entry = self._capture(full_key, fn, inputs, owner)
            if entry is None:
                return fn(inputs)
        else:
            self._graphs.move_to_end(full_key)
        self._copy_in(entry, inputs)
        entry.graph.replay()
        return {name: t.clone() for name, t in entry.static_out.items()}

    @staticmethod
    def _copy_in(entry: _Entry, inputs: dict) -> None:
        for name, src in inputs.items():
            stamp = (id(src), src._version, src.data_ptr())
            if entry.last_src.get(name, (None,))[0] is src and entry.last_src[name][1] == stamp:
                continue
            entry.static_in[name].copy_(src)
            # Keep ``src`` alive so that ``id`` cannot be reused while it is the remembered source.
            entry.last_src[name] = (src, stamp)

    def _capture(self, full_key, fn: StepFn, inputs: dict, owner) -> _Entry | None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        static_in = {name: t.clone() for name, t in inputs.items()}
        try:
            with nvtx_range("cuda_graph/capture"):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(self.warmup_iters):
                        fn(static_in)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    static_out = fn(static_in)
            if not isinstance(static_out, dict) or not all(
                isinstance(t, torch.Tensor) for t in static_out.values()
            ):
                raise TypeError("step function: expected a dict of tensors")
        except Exception as exc:  # any capture failure: eager from now on for this key
            self._failed.add(full_key)
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"CUDA graph capture failed ({type(exc).__name__}: {exc}); running this step eagerly. "
                    "Set NFT_CUDA_GRAPHS=0 to silence this by turning graphs off.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return None
        owner_ref = weakref.ref(owner) if owner is not None else (lambda: None)
        entry = _Entry(graph, static_in, static_out, owner_ref)
        self._graphs[full_key] = entry
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
            self.evictions += 1
        # ``static_in`` already holds this call's inputs: record them so they are not copied again.
        for name, src in inputs.items():
            entry.last_src[name] = (src, (id(src), src._version, src.data_ptr()))
        return entry
