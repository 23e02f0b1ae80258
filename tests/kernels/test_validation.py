"""Bad inputs raise ValueError / TypeError naming the argument, on every backend (checked before dispatch)."""

from __future__ import annotations

import pytest
import torch

import kernels

from .common import backends

BACKENDS = backends()
X = torch.randn(4, 3, 5)


def _bad_calls():
    x, v = X, torch.randn(4, 3, 5)
    s, sn = torch.full((4,), 0.5), torch.full((4,), 0.4)
    return [
        # (call, exception, argument named in the message)
        (lambda: kernels.euler_step(x, torch.randn(4, 3, 6), s, sn), ValueError, "v"),
        (lambda: kernels.euler_step(x, v, torch.full((3,), 0.5), sn), ValueError, "sigma"),
        (lambda: kernels.euler_step(x.long(), v, s, sn), TypeError, "x"),
        (lambda: kernels.euler_step(torch.randn(4), torch.randn(4), s, sn), ValueError, "x"),
        (lambda: kernels.euler_step(x, v, s, torch.full((4,), 0.6)), ValueError, "sigma_next"),
        (lambda: kernels.euler_step(x, v, s, s), ValueError, "sigma_next"),
        (
            lambda: kernels.euler_step(x, v, s, torch.full((4,), 0.4, dtype=torch.float64).long()),
            TypeError,
            "sigma_next",
        ),
        (lambda: kernels.interpolate(x, v, True), TypeError, "t"),
        (lambda: kernels.sde_step(x, v, s, sn, noise_level=-0.1, noise=v), ValueError, "noise_level"),
        (lambda: kernels.sde_step(x, v, s, sn, noise_level=0.7), ValueError, "noise / prev_sample"),
        (
            lambda: kernels.sde_step(x, v, s, sn, noise_level=0.7, noise=v, prev_sample=v),
            ValueError,
            "noise / prev_sample",
        ),
        (
            lambda: kernels.sde_step(x, v, torch.ones(4), sn, noise_level=0.7, noise=v),
            ValueError,
            "sigma_max",
        ),
        (
            lambda: kernels.sde_step(x, v, s, sn, noise_level=0.7, prev_sample=v.half()),
            TypeError,
            "prev_sample",
        ),
        (
            lambda: kernels.cps_step(x, v, s, sn, noise_level=0.7, noise=torch.randn(4, 3)),
            ValueError,
            "noise",
        ),
        (lambda: kernels.ddim_step(x, v, 0.5, 0.4, eta=1.0, noise=v), ValueError, "alpha_bar_prev"),
        (lambda: kernels.ddim_step(x, v, 0.5, 0.6, eta=-1.0, noise=v), ValueError, "eta"),
        (lambda: kernels.dpm2_step(x, v, s, sn, x0_prev=v), ValueError, "x0_prev / sigma_prev"),
        (lambda: kernels.gaussian_log_prob(x, v, -1.0), ValueError, "std"),
        (lambda: kernels.gaussian_log_prob(x, v, 1.0, reduce="max"), ValueError, "reduce"),
        (lambda: kernels.gaussian_kl(x, 0.0, v, 1.0), ValueError, "std_p"),
        (lambda: kernels.nft_loss(x, v, x, v, 0.5, 0.5, beta=0.0), ValueError, "beta"),
        (lambda: kernels.nft_loss(x, v, x, v, 0.5, 0.5, beta=-1.0), ValueError, "beta"),
        (lambda: kernels.nft_loss(x, v, x, v, 0.5, 1.5, beta=1.0), ValueError, "r"),
        (lambda: kernels.nft_loss(x, v, x, v, 0.5, 0.5, beta=1.0, weighting="sq"), ValueError, "weighting"),
        (lambda: kernels.nft_loss(x, v, x, v, 0.5, 0.5, beta=1.0, kl_coef=0.1), ValueError, "v_ref"),
    ]


CASES = _bad_calls()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(CASES)))
def test_bad_input_raises_naming_the_argument(backend, index):
    call, exc, name = CASES[index]
    with kernels.use_backend(backend), pytest.raises(exc, match=f"^{name}:") as info:
        call()
    assert "expected" in str(info.value) and "got" in str(info.value)


def test_different_devices_rejected_via_meta():
    """A tensor on another device is refused (``meta`` stands in for a GPU on a CPU-only machine)."""
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="^v: .*meta"):
        kernels.euler_step(x, torch.empty(2, 3, device="meta"), 0.5, 0.4)
    with pytest.raises(ValueError, match="^sigma: "):
        kernels.euler_step(x, x, torch.full((2,), 0.5, device="meta"), 0.4)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_meta_tensors_give_shapes_through_the_fake_kernels():
    x = torch.empty(4, 3, 5, device="meta", dtype=torch.bfloat16)
    with kernels.use_backend("triton"):
        prev, log_prob, mean, std = kernels.sde_step(x, x, 0.5, 0.4, noise_level=0.7, noise=x)
        loss = kernels.nft_loss(x, x, x, x, 0.5, 0.5, beta=1.0)
    assert prev.shape == x.shape and prev.dtype == torch.bfloat16 and prev.device.type == "meta"
    assert log_prob.shape == (4,) and log_prob.dtype == torch.float32
    assert mean.dtype == torch.float32 and std.shape == (4,)
    assert loss.shape == () and loss.dtype == torch.float32
