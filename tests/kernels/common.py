"""Helpers shared by the kernel tests: per-dtype tolerances and a forward+backward runner."""

from __future__ import annotations

import torch

import kernels

# (rtol, atol) per storage dtype.  fp32 math is the same formula in a different order (tight); fp16 / bf16
# outputs may differ by one rounding step of the storage type where the fp32 values straddle a boundary.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# rank 4 odd shape (one reduction chunk per row), rank 2 long rows (3 chunks), rank 5
SHAPES = [(5, 3, 17, 19), (3, 9000), (2, 3, 4, 5, 6)]


def assert_close(actual, expected, dtype, name="", scale=None):
    """``|a - e| <= atol * scale + rtol * |e|`` with ``scale`` the magnitude of ``expected`` (>= 1)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    rtol, atol = TOLERANCES[dtype]
    e = expected.float()
    if scale is None:
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    torch.testing.assert_close(actual.float(), e, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


def make(shape, dtype, *, lo=None, hi=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if lo is None:
        return torch.randn(shape, generator=g).to(dtype)
    return (lo + (hi - lo) * torch.rand(shape, generator=g)).to(dtype)


def forward_backward(fn, tensors: dict, grad_names, *, upstream_seed=1234):
    """Run ``fn(**tensors)``; backprop random upstream grads of every float output into ``grad_names``.

    Returns ``(outputs, grads)``: outputs as a tuple (detached), grads as a dict (None where unused).
    """
    leaves = {
        k: (v.detach().clone().requires_grad_(k in grad_names) if isinstance(v, torch.Tensor) else v)
        for k, v in tensors.items()
    }
    outs = fn(**leaves)
    if isinstance(outs, torch.Tensor):
        outs = (outs,)
    g = torch.Generator().manual_seed(upstream_seed)
    loss = 0.0
    for o in outs:
        if o.requires_grad:
            loss = loss + (o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum()
    grads = {}
    if grad_names and isinstance(loss, torch.Tensor):
        got = torch.autograd.grad(loss, [leaves[k] for k in grad_names], allow_unused=True)
        grads = dict(zip(grad_names, got, strict=False))
    return tuple(o.detach() for o in outs), grads


def backends():
    """The backends every op is tested on: the reference always, Triton (interpreted on CPU) if importable."""
    out = ["reference"]
    if kernels._dispatch.HAS_TRITON and (kernels._dispatch.KERNELS_INTERPRETED or torch.cuda.is_available()):
        out.append("triton")
    return out
