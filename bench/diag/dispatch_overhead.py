"""Host time of one custom-op call: through ``torch.library`` against the eager fast path (``CustomOp``).

    python -m bench.diag.dispatch_overhead            # CPU or GPU; prints microseconds per call

The body is replaced by the cheapest possible one (``empty_like`` outputs), so what is timed is the call
machinery alone: ``torch.library.custom_op`` with ``register_autograd`` (the dispatcher path), the same op
through ``kernels.ops._common.CustomOp`` (the eager fast path), and the bare body.  Each with gradients
enabled and an input that requires grad (a training call) and under ``torch.no_grad`` (a rollout call).
"""

from __future__ import annotations

import functools
import sys
import time

import torch

from kernels.ops import _common


def _body(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[0])


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])


def _backward(ctx, g, _g_stat):
    return g, None, None


@functools.cache  # an op name registers once per process
def build():
    op = _common.custom_op("nft_bench_diag::overhead")(_body)
    op.register_fake(lambda x, w, eps: (torch.empty_like(x), x.new_empty(x.shape[0])))
    op.register_autograd(_backward, setup_context=_setup)
    return op


def per_call_us(fn, n: int) -> float:
    for _ in range(max(10, n // 10)):
        fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def measure(n: int = 2000, device: str = "cpu") -> dict:
    op = build()
    x = torch.randn(4, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device)
    out = {}
    for grad in (True, False):
        tag = "grad" if grad else "no_grad"
        with torch.set_grad_enabled(grad):
            _common.EAGER_FAST_PATH = False
            try:
                out[f"dispatcher_{tag}"] = per_call_us(lambda: op(x, w, 1e-6), n)
            finally:
                _common.EAGER_FAST_PATH = True
            out[f"eager_{tag}"] = per_call_us(lambda: op(x, w, 1e-6), n)
            out[f"body_{tag}"] = per_call_us(lambda: _body(x, w, 1e-6), n)
    return {k: round(v, 1) for k, v in out.items()}


def main(argv=None) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = measure(device=device)
    print(f"host microseconds per call ({device}, torch {torch.__version__}):")
    for tag in ("grad", "no_grad"):
        d, e, b = (got[f"{path}_{tag}"] for path in ("dispatcher", "eager", "body"))
        print(f"  {tag:8s} dispatcher {d:7.1f}   eager fast path {e:7.1f}   body alone {b:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
