"""Shared launch helpers for the Triton ops (layer 2 of CONVENTIONS.md "An op, in four layers").

Layout every kernel shares: a ``[B, ...]`` tensor is viewed as ``B`` rows of ``N = numel / B`` contiguous
elements.  Grids put the column blocks (or reduction chunks) of a row on axis 0 and the rows on axes 1 and 2
(``row = pid1 + pid2 * num_programs(1)``: CUDA caps axes 1 and 2 at 65535 programs each); programs past the
last row are masked out.  Program ids and element offsets are int64 (``row * N`` can pass 2^31).

Reductions are two-stage and deterministic: stage 1 writes one fp32 partial per ``(row, chunk)`` where the
chunk partition of a row depends only on ``N`` (``CHUNK`` elements, fixed), stage 2 runs one program per row
and sums that row's partials in a fixed order.  No atomics; a row's result does not depend on the batch it is
computed in, on the device's SM count or on any autotuning.
"""

from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

BLOCK = 1024  # elements per program for element-wise kernels, and per loop iteration in reductions
CHUNK = (
    4096  # elements of one row reduced by one stage-1 program (a multiple of BLOCK); fixed for determinism
)
PBLOCK = 128  # partials summed per loop iteration by a stage-2 program
MAX_GRID_1 = 65535  # CUDA's limit on grid axes 1 and 2
NUM_WARPS = 4


def rows(x: torch.Tensor) -> tuple[int, int]:
    """``(B, N)``: batch size and elements per row of a ``[B, ...]`` tensor."""
    b = x.shape[0]
    return b, (x.numel() // b if b else 0)


def contig(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


def _row_axes(b: int) -> tuple[int, int]:
    """Rows over grid axes 1 and 2: ``row = pid1 + pid2 * num_programs(1)`` (CUDA caps both at 65535)."""
    return min(b, MAX_GRID_1), triton.cdiv(b, MAX_GRID_1)


def elementwise_grid(b: int, n: int) -> tuple[int, int, int]:
    return (triton.cdiv(n, BLOCK), *_row_axes(b))


def chunk_grid(b: int, n: int) -> tuple[int, int, int]:
    return (triton.cdiv(n, CHUNK), *_row_axes(b))


def n_chunks(n: int) -> int:
    return triton.cdiv(n, CHUNK)


def n_iter(n: int) -> int:
    """Loop trip count of ``row_sum`` over ``n`` partials: a ``constexpr`` (a loop bounded by a runtime int
    trips older Triton interpreters), 1 for every row shorter than ``CHUNK * PBLOCK`` = 512K elements."""
    return max(1, triton.cdiv(n, PBLOCK))


@triton.jit
def row_sum(ptr, n, NITER: tl.constexpr, PBLOCK: tl.constexpr):
    """``sum(ptr[0:n])`` in a fixed order: lane ``k`` adds items ``k, k + PBLOCK, ...``, then one tree."""
    acc = tl.zeros([PBLOCK], dtype=tl.float32)
    for it in range(NITER):
        idx = it * PBLOCK + tl.arange(0, PBLOCK)
        acc += tl.load(ptr + idx, mask=idx < n, other=0.0)
    return tl.sum(acc, axis=0)


def row_grid(b: int) -> tuple[int]:
    return (b,)


def scalar_f32(s: torch.Tensor) -> torch.Tensor:
    """A per-sample ``[B]`` scalar as a contiguous fp32 buffer the kernels ``tl.load``."""
    return s.to(torch.float32).contiguous()


def empty_grad() -> torch.Tensor:
    return torch.empty(0)


# ----------------------------------------------------------------------------------------------------------
# Layer 3: the custom op, and its eager fast path
# ----------------------------------------------------------------------------------------------------------
_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
_functorch_stack = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)

# Tests switch this off to compare the eager fast path with the dispatcher path on the same tensors.
EAGER_FAST_PATH = True


def _needs_dispatcher(args) -> bool:
    """Whether a call must go through ``torch.library``: ``torch.compile`` tracing, a ``TorchDispatchMode``
    (fake tensors, functionalization, ...), a ``torch.func`` transform, a tensor subclass (DTensor ...) or a
    meta tensor (the fake kernel gives its shapes)."""
    if not EAGER_FAST_PATH or torch.compiler.is_compiling():
        return True
    if _dispatch_stack_len is None or _dispatch_stack_len():
        return True
    if _functorch_stack is not None and _functorch_stack() is not None:
        return True
    return any(isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSORS or a.is_meta) for a in args)


class CustomOp:
    """A ``torch.library.custom_op`` (``self.op``: fake kernel, autograd, ``torch.compile``, ``opcheck``)
    whose eager calls skip the dispatcher.

    The dispatcher costs 80-200 us of host time per call (torch 2.11-2.13, with autograd), more than the
    Triton launch itself; the H200 profile of the SD3.5-M train step with the DiT fast path had about 1350
    such calls, each 10-40 us of GPU time (``docs/results.md``).  Called eagerly on plain tensors, this runs
    the same launcher directly, through a ``torch.autograd.Function`` with the same ``setup_context`` and
    backward where a gradient is needed, so the numbers are those of the op bit for bit (the launchers are
    the same functions).  Anything that needs the dispatcher (see ``_needs_dispatcher``) calls ``self.op``.
    Positional arguments only, as every launcher here takes them.
    """

    def __init__(self, name, op, impl):
        self.name = name
        self.op = op
        self._impl = impl
        self._function = None
        self.__doc__ = impl.__doc__
        # Defaults filled in as the dispatcher does, so setup_context and backward see every input.
        self._defaults = tuple(p.default for p in inspect.signature(impl).parameters.values())

    def register_fake(self, fn):
        return self.op.register_fake(fn)

    def register_autograd(self, backward, *, setup_context):
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self._impl

        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        self._function = type(
            "Eager_" + self.name.replace("::", "_"),
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args):
        if _needs_dispatcher(args):
            return self.op(*args)
        if len(args) < len(self._defaults):
            args = (*args, *self._defaults[len(args) :])
            if any(a is inspect.Parameter.empty for a in args):
                raise TypeError(f"{self.name}: expected {len(self._defaults)} positional arguments")
        if (
            self._function is not None
            and torch.is_grad_enabled()
            and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        ):
            return self._function.apply(*args)
        return self._impl(*args)


def custom_op(name: str):
    """``@custom_op("nft_kernels::name")``: ``torch.library.custom_op(name, mutates_args=())`` wrapped in
    ``CustomOp`` (``register_fake`` / ``register_autograd`` as on the op itself)."""

    def wrap(fn):
        return CustomOp(name, torch.library.custom_op(name, mutates_args=())(fn), fn)

    return wrap
