"""GPU-only checks of the compiled Triton kernels (skipped cleanly without CUDA).

The same comparisons as the CPU tests on CUDA tensors in fp32 / fp16 / bf16, the bit-exact identities with
the compiled kernels (where FMA contraction and real bf16 rounding apply), no host synchronisation, CUDA
graph capture and replay with new seeds / sigmas held in device tensors, and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference as ref

from .common import DTYPES, assert_close, forward_backward

pytestmark = pytest.mark.gpu
DEV = "cuda"
SHAPES = [(5, 3, 17, 19), (4, 16, 64, 64)]
OPS = [
    "interpolate",
    "paired_interpolate",
    "euler_step",
    "dpm2_step",
    "sde_step",
    "cps_step",
    "ddim_step",
    "gaussian_log_prob",
    "gaussian_kl",
    "nft_loss",
]


def _make(shape, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(shape, generator=g, device=DEV).to(dtype)


def _cases(b):
    sigma = torch.linspace(0.95, 0.3, b, device=DEV)
    sigma_next = sigma - 0.1
    sigma_prev = torch.clamp(sigma + 0.05, max=1.0)
    t = torch.linspace(0.1, 0.9, b, device=DEV)
    ab = torch.linspace(0.2, 0.7, b, device=DEV)
    smax = torch.full((b,), 0.97, device=DEV)
    return {
        "interpolate": (
            lambda a, b_, c: kernels.interpolate(a, b_, t),
            lambda a, b_, c: ref.interpolate(a, b_, t),
        ),
        "paired_interpolate": (
            lambda a, b_, c: kernels.paired_interpolate(a, b_, c, t),
            lambda a, b_, c: ref.paired_interpolate(a, b_, c, t),
        ),
        "euler_step": (
            lambda a, b_, c: kernels.euler_step(a, b_, sigma, sigma_next),
            lambda a, b_, c: ref.euler_step(a, b_, sigma, sigma_next),
        ),
        "dpm2_step": (
            lambda a, b_, c: kernels.dpm2_step(a, b_, sigma, sigma_next, x0_prev=c, sigma_prev=sigma_prev),
            lambda a, b_, c: ref.dpm2_step(a, b_, sigma, sigma_next, c, sigma_prev),
        ),
        "sde_step": (
            lambda a, b_, c: kernels.sde_step(
                a, b_, sigma, sigma_next, noise_level=0.7, sigma_max=smax, noise=c
            ),
            lambda a, b_, c: ref.sde_step(a, b_, sigma, sigma_next, noise_level=0.7, sigma_max=smax, noise=c),
        ),
        "cps_step": (
            lambda a, b_, c: kernels.cps_step(a, b_, sigma, sigma_next, noise_level=0.7, noise=c),
            lambda a, b_, c: ref.cps_step(a, b_, sigma, sigma_next, noise_level=0.7, noise=c),
        ),
        "ddim_step": (
            lambda a, b_, c: kernels.ddim_step(a, b_, ab, ab + 0.1, eta=1.0, noise=c),
            lambda a, b_, c: ref.ddim_step(a, b_, ab, ab + 0.1, eta=1.0, noise=c),
        ),
        "gaussian_log_prob": (
            lambda a, b_, c: kernels.gaussian_log_prob(a, b_, t + 0.2),
            lambda a, b_, c: ref.gaussian_log_prob(a, b_, t + 0.2),
        ),
        "gaussian_kl": (
            lambda a, b_, c: kernels.gaussian_kl(a, t + 0.2, b_, 1.2 - t),
            lambda a, b_, c: ref.gaussian_kl(a, t + 0.2, b_, 1.2 - t),
        ),
        "nft_loss": (
            lambda a, b_, c: kernels.nft_loss(a, b_, c, b_ * 0.5, t, t, beta=0.7, v_ref=c, kl_coef=0.1),
            lambda a, b_, c: ref.nft_loss(a, b_.detach(), c, b_ * 0.5, t, t, beta=0.7, v_ref=c, kl_coef=0.1),
        ),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_cuda_matches_reference(op, shape, dtype):
    api, expected = _cases(shape[0])[op]
    tensors = {"a": _make(shape, dtype, 1), "b_": _make(shape, dtype, 2), "c": _make(shape, dtype, 3)}
    names = ["a"] if op == "nft_loss" else ["a", "b_", "c"]
    if op in ("gaussian_log_prob", "gaussian_kl", "interpolate", "euler_step"):
        names = ["a", "b_"]
    assert kernels.active_backend(tensors["a"]) == "triton"
    outs, grads = forward_backward(api, tensors, names)
    exp, exp_grads = forward_backward(expected, tensors, names)
    for i, (o, e) in enumerate(zip(outs, exp, strict=True)):
        assert_close(o, e, dtype, name=f"{op} output {i}")
    for k in names:
        if exp_grads[k] is not None:
            assert_close(grads[k], exp_grads[k], dtype, name=f"{op} grad {k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["sde", "cps", "ddim"])
def test_cuda_rollout_log_prob_equals_training_log_prob(kind, dtype):
    shape = (8, 16, 64, 64)
    x, v, z = _make(shape, dtype, 1), _make(shape, dtype, 2), _make(shape, dtype, 3)
    sigma = torch.linspace(0.95, 0.3, 8, device=DEV)

    def step(rows, **kw):
        if kind == "sde":
            return kernels.sde_step(x[rows], v[rows], sigma[rows], sigma[rows] - 0.1, noise_level=0.7, **kw)
        if kind == "cps":
            return kernels.cps_step(x[rows], v[rows], sigma[rows], sigma[rows] - 0.1, noise_level=0.7, **kw)
        return kernels.ddim_step(x[rows], v[rows], sigma[rows] * 0.5, sigma[rows] * 0.5 + 0.2, eta=1.0, **kw)

    prev, log_prob, _, _ = step(slice(0, 8), noise=z)
    parts = [step(s, prev_sample=prev[s])[1] for s in (slice(0, 3), slice(3, 8))]
    assert torch.equal(torch.cat(parts), log_prob)
    rows = [step(slice(i, i + 1), noise=z[i : i + 1])[1] for i in range(8)]
    assert torch.equal(torch.cat(rows), log_prob)


def test_cuda_no_host_sync():
    """No op synchronises the host with the device (CUDA-graph capturable, no stream stalls)."""
    b, shape = 4, (4, 16, 32, 32)
    x, v, z = (
        _make(shape, torch.bfloat16, 1),
        _make(shape, torch.bfloat16, 2),
        _make(shape, torch.bfloat16, 3),
    )
    sigma = torch.linspace(0.9, 0.4, b, device=DEV)
    seed = torch.tensor(3, device=DEV)
    for f in _cases(b).values():  # warm up: compile every kernel first
        f[0](x, v, z)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for f in _cases(b).values():
            f[0](x, v, z)
        kernels.randn(shape, seed, offset=seed, dtype=torch.bfloat16)
        kernels.sde_step(x, v, sigma, sigma - 0.1, noise_level=0.7, noise=z)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_replay_with_new_seed_and_sigma():
    """Every op captured in one CUDA graph; replays with new seeds / sigmas written into the device tensors
    give what eager calls give (the per-step scalars are read in-kernel, never baked into the graph)."""
    shape = (4, 16, 32, 32)
    x, v = _make(shape, torch.bfloat16, 1), _make(shape, torch.bfloat16, 2)
    seed = torch.tensor(11, dtype=torch.int64, device=DEV)
    offset = torch.tensor(0, dtype=torch.int64, device=DEV)
    sigma = torch.full((4,), 0.9, device=DEV)
    sigma_next = torch.full((4,), 0.8, device=DEV)
    x0_prev = _make(shape, torch.bfloat16, 3)
    sigma_prev = torch.full((4,), 0.95, device=DEV)

    def body():
        z = kernels.randn(shape, seed, offset, dtype=torch.bfloat16)
        prev, log_prob, mean, std = kernels.sde_step(x, v, sigma, sigma_next, noise_level=0.7, noise=z)
        x_next, d = kernels.dpm2_step(prev, v, sigma, sigma_next, x0_prev=x0_prev, sigma_prev=sigma_prev)
        lp = kernels.gaussian_log_prob(prev, mean, std)
        kl = kernels.gaussian_kl(mean, std, mean * 0.5, std * 2)
        xt = kernels.interpolate(x, z, sigma)
        xw, xl = kernels.paired_interpolate(x, v, z, sigma)
        xe = kernels.euler_step(x, v, sigma, sigma_next)
        cps = kernels.cps_step(x, v, sigma, sigma_next, noise_level=0.7, noise=z)
        ddim = kernels.ddim_step(x, v, sigma_next * 0.5, sigma_next * 0.5 + 0.2, eta=1.0, noise=z)
        score = kernels.ddim_step(
            x, v, sigma_next * 0.5, sigma_next * 0.5 + 0.2, eta=1.0, prev_sample=ddim[0]
        )
        loss = kernels.nft_loss(v, x, x0_prev, z, sigma, sigma_next, beta=1.0, v_ref=x, kl_coef=0.1)
        return (z, prev, log_prob, x_next, d, lp, kl, xt, xw, xl, xe, *cps, *ddim, score[1], loss)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = body()
    for new_seed, new_sigma in ((12, 0.7), (99, 0.5)):
        seed.fill_(new_seed)
        offset.fill_(new_seed * 1000)
        sigma.fill_(new_sigma)
        sigma_next.fill_(new_sigma - 0.2)
        graph.replay()
        eager = body()
        for s, e in zip(static, eager, strict=True):
            assert torch.equal(s, e)
    assert not torch.equal(static[0], kernels.randn(shape, 11, 0, device=DEV, dtype=torch.bfloat16))


def test_cuda_torch_compile_fullgraph():
    shape = (4, 16, 32, 32)
    x, v, z = (_make(shape, torch.bfloat16, s).requires_grad_() for s in (1, 2, 3))
    sigma = torch.linspace(0.9, 0.4, 4, device=DEV)

    def step(x, v, z, sigma):
        prev, log_prob, mean, std = kernels.sde_step(x, v, sigma, sigma - 0.1, noise_level=0.7, noise=z)
        loss = kernels.nft_loss(v, x.detach(), prev.detach(), z.detach(), sigma, sigma, beta=1.0)
        return prev, log_prob, loss

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(x, v, z, sigma)
    exp = step(x, v, z, sigma)
    for g, e in zip(got, exp, strict=True):
        assert torch.equal(g, e)
    (got[1].sum() + got[2]).backward()
    assert x.grad is not None and v.grad is not None
