"""Every op against ``kernels/reference.py``, forward and backward, on each backend.

On a CPU-only machine the ``triton`` backend runs the Triton kernels in Triton's interpreter (the root
conftest sets ``TRITON_INTERPRET=1`` before ``kernels`` is imported).  The interpreter rounds fp32 -> bf16 by
truncation (the GPU rounds to nearest even), which the bf16 tolerance (two bf16 steps) absorbs.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import reference as ref

from .common import DTYPES, SHAPES, assert_close, backends, forward_backward, make

BACKENDS = backends()


def _sigmas(b, *, with_one=False):
    sigma = torch.linspace(0.9, 0.35, b)
    sigma_next = sigma - torch.linspace(0.05, 0.3, b)
    if with_one:
        sigma[0] = 1.0
    return sigma, sigma_next


def _run(backend, api_fn, ref_fn, tensors, grad_names, dtype, out_dtypes=None):
    with kernels.use_backend(backend):
        outs, grads = forward_backward(api_fn, tensors, grad_names)
    exp_outs, exp_grads = forward_backward(ref_fn, tensors, grad_names)
    assert len(outs) == len(exp_outs)
    for i, (o, e) in enumerate(zip(outs, exp_outs, strict=False)):
        # fp32 outputs computed from storage-dtype states (log-probs, means) inherit the storage rounding.
        assert_close(o, e, dtype, name=f"output {i}")
    for k in grad_names:
        if exp_grads[k] is None:
            assert grads[k] is None or float(grads[k].abs().max()) == 0.0, f"grad {k}: expected none"
            continue
        assert grads[k] is not None, f"grad {k}: missing"
        assert_close(grads[k], exp_grads[k], dtype, name=f"grad {k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_interpolate(backend, dtype, shape):
    b = shape[0]
    t = torch.linspace(0.0, 1.0, b)
    tensors = {"x0": make(shape, dtype, seed=1), "noise": make(shape, dtype, seed=2)}
    _run(
        backend,
        lambda x0, noise: kernels.interpolate(x0, noise, t),
        lambda x0, noise: ref.interpolate(x0, noise, t),
        tensors,
        ["x0", "noise"],
        dtype,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paired_interpolate(backend, dtype):
    shape = SHAPES[0]
    t = torch.rand(shape[0])
    tensors = {
        "x0_w": make(shape, dtype, seed=1),
        "x0_l": make(shape, dtype, seed=3),
        "noise": make(shape, dtype, seed=2),
    }
    _run(
        backend,
        lambda x0_w, x0_l, noise: kernels.paired_interpolate(x0_w, x0_l, noise, t.view(-1, 1, 1, 1)),
        lambda x0_w, x0_l, noise: ref.paired_interpolate(x0_w, x0_l, noise, t),
        tensors,
        ["x0_w", "x0_l", "noise"],
        dtype,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_euler_step(backend, dtype, shape):
    sigma, sigma_next = _sigmas(shape[0])
    tensors = {"x": make(shape, dtype, seed=1), "v": make(shape, dtype, seed=2)}
    _run(
        backend,
        lambda x, v: kernels.euler_step(x, v, sigma, sigma_next),
        lambda x, v: ref.euler_step(x, v, sigma, sigma_next),
        tensors,
        ["x", "v"],
        dtype,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", ["first", "second"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_dpm2_step(backend, dtype, order, shape):
    b = shape[0]
    sigma, sigma_next = _sigmas(b)
    sigma_next[-1] = 0.0  # last step: first order
    tensors = {"x": make(shape, dtype, seed=1), "v": make(shape, dtype, seed=2)}
    names = ["x", "v"]
    if order == "second":
        sigma_prev = torch.clamp(sigma + 0.05, max=1.0)
        sigma_prev[0] = 1.0  # a step from sigma_prev == 1: first order
        tensors["x0_prev"] = make(shape, dtype, seed=3)
        names.append("x0_prev")

        def api(x, v, x0_prev):
            return kernels.dpm2_step(x, v, sigma, sigma_next, x0_prev=x0_prev, sigma_prev=sigma_prev)

        def expected(x, v, x0_prev):
            return ref.dpm2_step(x, v, sigma, sigma_next, x0_prev, sigma_prev)
    else:

        def api(x, v):
            return kernels.dpm2_step(x, v, sigma, sigma_next)

        def expected(x, v):
            return ref.dpm2_step(x, v, sigma, sigma_next)

    _run(backend, api, expected, tensors, names, dtype)


def _transition_case(kind, b, *, noise_level=0.7):
    """``(api(x, v, noise=None, prev_sample=None), ref(...))`` for one of the three transitions."""
    if kind == "sde":
        sigma, sigma_next = _sigmas(b, with_one=True)
        sigma_max = 0.95

        def api(x, v, **kw):
            return kernels.sde_step(
                x, v, sigma, sigma_next, noise_level=noise_level, sigma_max=sigma_max, **kw
            )

        def expected(x, v, **kw):
            return ref.sde_step(
                x, v, sigma, sigma_next, noise_level=noise_level, sigma_max=torch.full((b,), sigma_max), **kw
            )
    elif kind.startswith("cps"):
        # "cps": flow_grpo's log-prob -mean (prev - mean)^2 (the default); "cps-gaussian": the Gaussian one
        form = "gaussian" if kind == "cps-gaussian" else "reference"
        sigma, sigma_next = _sigmas(b)
        sigma_next[-1] = 0.0  # last CPS step: std 0, a point mass (log-prob 0)

        def api(x, v, **kw):
            if form == "gaussian":
                kw["log_prob_form"] = form
            return kernels.cps_step(x, v, sigma, sigma_next, noise_level=noise_level, **kw)

        def expected(x, v, **kw):
            return ref.cps_step(x, v, sigma, sigma_next, noise_level=noise_level, log_prob_form=form, **kw)
    else:
        ab = torch.linspace(0.2, 0.7, b)
        abp = ab + torch.linspace(0.05, 0.25, b)

        def api(x, v, **kw):
            return kernels.ddim_step(x, v, ab, abp, eta=noise_level, **kw)

        def expected(x, v, **kw):
            return ref.ddim_step(x, v, ab, abp, eta=noise_level, **kw)

    return api, expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["sample", "score"])
@pytest.mark.parametrize("kind", ["sde", "cps", "cps-gaussian", "ddim"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_transition(backend, dtype, mode, kind, shape):
    api, expected = _transition_case(kind, shape[0])
    x, v, z = make(shape, dtype, seed=1), make(shape, dtype, seed=2), make(shape, dtype, seed=3)
    if mode == "sample":
        tensors, names = {"x": x, "v": v, "noise": z}, ["x", "v", "noise"]
        _run(
            backend,
            lambda x, v, noise: api(x, v, noise=noise),
            lambda x, v, noise: expected(x, v, noise=noise),
            tensors,
            names,
            dtype,
        )
    else:
        # score a stored state: the reference's own sample, perturbed so the log-prob gradient is not tiny
        prev = (expected(x, v, noise=z)[0].float() + 0.1 * make(shape, torch.float32, seed=4)).to(dtype)
        tensors, names = {"x": x, "v": v, "prev_sample": prev}, ["x", "v", "prev_sample"]
        _run(
            backend,
            lambda x, v, prev_sample: api(x, v, prev_sample=prev_sample),
            lambda x, v, prev_sample: expected(x, v, prev_sample=prev_sample),
            tensors,
            names,
            dtype,
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sde", "cps", "cps-gaussian", "ddim"])
def test_transition_zero_noise_level_is_a_point_mass(backend, kind):
    """noise_level / eta = 0: deterministic step, std 0, log-prob 0 by convention, no gradient from it."""
    shape = SHAPES[0]
    api, expected = _transition_case(kind, shape[0], noise_level=0.0)
    x, v, z = (
        make(shape, torch.float32, seed=1),
        make(shape, torch.float32, seed=2),
        make(shape, torch.float32),
    )
    tensors = {"x": x, "v": v, "noise": z}
    _run(
        backend,
        lambda x, v, noise: api(x, v, noise=noise),
        lambda x, v, noise: expected(x, v, noise=noise),
        tensors,
        ["x", "v", "noise"],
        torch.float32,
    )
    with kernels.use_backend(backend):
        prev, log_prob, mean, std = api(x, v, noise=z)
    assert torch.equal(std, torch.zeros_like(std)) and torch.equal(log_prob, torch.zeros_like(log_prob))
    assert torch.equal(prev, mean)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gaussian_log_prob(backend, reduce, dtype, shape):
    b = shape[0]
    std = torch.linspace(0.3, 1.5, b)
    std[-1] = 0.0  # point mass -> 0
    tensors = {"x": make(shape, dtype, seed=1), "mean": make(shape, dtype, seed=2)}
    n = math.prod(shape[1:])
    scale = None if reduce == "mean" else float(n)  # sums: absolute error grows with the row length

    def check(o, e, dt, name=""):
        assert_close(o, e, dt, name=name, scale=scale)

    with kernels.use_backend(backend):
        outs, grads = forward_backward(
            lambda x, mean: kernels.gaussian_log_prob(x, mean, std, reduce), tensors, ["x", "mean"]
        )
    exp, exp_grads = forward_backward(
        lambda x, mean: ref.gaussian_log_prob(x, mean, std, reduce), tensors, ["x", "mean"]
    )
    check(outs[0], exp[0], dtype, "log_prob")
    assert float(outs[0][-1]) == 0.0
    for k in ("x", "mean"):
        assert_close(grads[k], exp_grads[k], dtype, name=f"grad {k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_gaussian_kl(backend, reduce, dtype, shape):
    b = shape[0]
    std_p, std_q = torch.linspace(0.3, 1.5, b), torch.linspace(1.2, 0.4, b)
    tensors = {"mean_p": make(shape, dtype, seed=1), "mean_q": make(shape, dtype, seed=2)}
    scale = None if reduce == "mean" else float(math.prod(shape[1:]))
    with kernels.use_backend(backend):
        outs, grads = forward_backward(
            lambda mean_p, mean_q: kernels.gaussian_kl(mean_p, std_p, mean_q, std_q, reduce),
            tensors,
            ["mean_p", "mean_q"],
        )
    exp, exp_grads = forward_backward(
        lambda mean_p, mean_q: ref.gaussian_kl(mean_p, std_p, mean_q, std_q, reduce),
        tensors,
        ["mean_p", "mean_q"],
    )
    assert_close(outs[0], exp[0], dtype, name="kl", scale=scale)
    for k in ("mean_p", "mean_q"):
        assert_close(grads[k], exp_grads[k], dtype, name=f"grad {k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighting,kl", [("adaptive", 0.0), ("adaptive", 0.3), ("none", 0.0), ("none", 0.3)])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_nft_loss(backend, dtype, weighting, kl, shape):
    b = shape[0]
    t, r = torch.linspace(0.1, 0.95, b), torch.linspace(1.0, 0.0, b)
    tensors = {
        "v": make(shape, dtype, seed=1),
        "v_old": make(shape, dtype, seed=2),
        "x0": make(shape, dtype, seed=3),
        "noise": make(shape, dtype, seed=4),
        "v_ref": make(shape, dtype, seed=5),
    }

    def api(v, v_old, x0, noise, v_ref):
        return kernels.nft_loss(
            v,
            v_old,
            x0,
            noise,
            t,
            r,
            beta=0.7,
            adv_clip_max=5.0,
            weighting=weighting,
            v_ref=v_ref,
            kl_coef=kl,
        )

    def expected(v, v_old, x0, noise, v_ref):
        return ref.nft_loss(
            v,
            v_old,
            x0,
            noise,
            t,
            r,
            beta=0.7,
            adv_clip_max=5.0,
            weighting=weighting,
            v_ref=v_ref,
            kl_coef=kl,
        )

    _run(backend, api, expected, tensors, ["v"], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nft_loss_gradient_flows_to_v_only(backend):
    shape = SHAPES[0]
    b = shape[0]
    v, v_old, v_ref = (make(shape, torch.float32, seed=s).requires_grad_() for s in (1, 2, 5))
    x0, noise = make(shape, torch.float32, seed=3), make(shape, torch.float32, seed=4)
    with kernels.use_backend(backend):
        loss = kernels.nft_loss(
            v, v_old, x0, noise, torch.rand(b), torch.rand(b), beta=1.0, v_ref=v_ref, kl_coef=1e-4
        )
    loss.backward()
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert v.grad is not None and float(v.grad.abs().max()) > 0
    assert v_old.grad is None and v_ref.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Transposed / sliced inputs give the same results as their contiguous copies."""
    base = make((5, 19, 17, 3), torch.float32, seed=1)
    x = base.permute(0, 3, 2, 1)  # [5, 3, 17, 19], non-contiguous
    v = make((5, 3, 17, 38), torch.float32, seed=2)[..., ::2]
    assert not x.is_contiguous() and not v.is_contiguous()
    sigma, sigma_next = _sigmas(5)
    with kernels.use_backend(backend):
        a = kernels.sde_step(x, v, sigma, sigma_next, noise_level=0.7, noise=v)
        c = kernels.sde_step(
            x.contiguous(), v.contiguous(), sigma, sigma_next, noise_level=0.7, noise=v.contiguous()
        )
        e1 = kernels.euler_step(x, v, sigma, sigma_next)
        e2 = kernels.euler_step(x.contiguous(), v.contiguous(), sigma, sigma_next)
    for p, q in zip(a, c, strict=False):
        assert torch.equal(p, q)
    assert torch.equal(e1, e2)


def test_reference_math_against_closed_forms():
    """The reference itself against independent formulas (so the comparisons above are against the truth)."""
    shape = (4, 3, 5, 7)
    x, m = make(shape, torch.float64, seed=1), make(shape, torch.float64, seed=2)
    std = torch.tensor([0.5, 1.0, 2.0, 0.7], dtype=torch.float64)
    lp = ref.gaussian_log_prob(x, m, std, "sum")
    exp = torch.distributions.Normal(m, std.view(-1, 1, 1, 1)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lp, exp)
    kl = ref.gaussian_kl(x, std, m, std.flip(0), "sum")
    p = torch.distributions.Normal(x, std.view(-1, 1, 1, 1))
    q = torch.distributions.Normal(m, std.flip(0).view(-1, 1, 1, 1))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(p, q).flatten(1).sum(1))
    # the SDE with noise_level 0 is the Euler step
    s, sn = torch.tensor([0.9, 0.8, 0.5, 0.3]), torch.tensor([0.8, 0.6, 0.4, 0.0])
    xf, vf = x.float(), m.float()
    prev, _, _, _ = ref.sde_step(xf, vf, s, sn, noise_level=0.0, sigma_max=torch.zeros(4), noise=vf)
    torch.testing.assert_close(prev, ref.euler_step(xf, vf, s, sn))
    # CPS: the reference form is -mean (prev - mean)^2, the Gaussian form the Normal log-density; both 0 at
    # the point mass (sigma_next = 0)
    z = make(shape, torch.float32, seed=3)
    prev, lp, mean, sd = ref.cps_step(xf, vf, s, sn, noise_level=0.7, noise=z)
    sq = -((prev - mean) ** 2).flatten(1).mean(1)
    assert float(sd[-1]) == 0.0 and float(lp[-1]) == 0.0
    torch.testing.assert_close(lp[:-1], sq[:-1])
    _, lp_g, _, _ = ref.cps_step(xf, vf, s, sn, noise_level=0.7, prev_sample=prev, log_prob_form="gaussian")
    normal = torch.distributions.Normal(mean[:-1], sd[:-1].view(-1, 1, 1, 1)).log_prob(prev[:-1])
    torch.testing.assert_close(lp_g[:-1], normal.flatten(1).mean(1))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
@pytest.mark.parametrize(
    "op,used",
    [
        ("sde_sample", (0,)),
        ("sde_sample", (1,)),
        ("sde_sample", (2,)),
        ("ddim_score", (1,)),
        ("ddim_score", (2,)),
        ("paired", (0,)),
        ("paired", (1,)),
        ("dpm2", (0,)),
        ("dpm2", (1,)),
    ],
)
def test_backward_when_only_some_outputs_are_used(op, used):
    """Unused outputs reach the hand-written backward as None (no zero-filled gradients are materialised)."""
    shape = (3, 2, 5, 7)
    b = shape[0]
    sigma, sigma_next = _sigmas(b)
    ab = torch.linspace(0.2, 0.6, b)
    x, v, z = (
        make(shape, torch.float32, seed=1),
        make(shape, torch.float32, seed=2),
        make(shape, torch.float32),
    )
    calls = {
        "sde_sample": lambda x, v, z, k: k.sde_step(x, v, sigma, sigma_next, noise_level=0.7, noise=z),
        "ddim_score": lambda x, v, z, k: k.ddim_step(x, v, ab, ab + 0.2, eta=1.0, prev_sample=z),
        "paired": lambda x, v, z, k: k.paired_interpolate(x, v, z, sigma),
        "dpm2": lambda x, v, z, k: k.dpm2_step(x, v, sigma, sigma_next, x0_prev=z, sigma_prev=sigma + 0.05),
    }

    def grads(backend):
        leaves = [t.clone().requires_grad_() for t in (x, v, z)]
        with kernels.use_backend(backend):
            outs = calls[op](*leaves, kernels)
        loss = sum((outs[i].float() * (i + 1.5)).sum() for i in used)
        return torch.autograd.grad(loss, leaves, allow_unused=True)

    for got, expected in zip(grads("triton"), grads("reference"), strict=True):
        if expected is None or float(expected.abs().max()) == 0.0:
            assert got is None or float(got.abs().max()) == 0.0
        else:
            assert_close(got, expected, torch.float32)
