"""Solvers against closed-form answers on Gaussian data (see ``_analytic.py``)."""

import math

import numpy as np
import pytest
import torch

from engine import rollout
from engine.schedules import ddim_alpha_bars

from ._analytic import GaussianEpsDenoiser, GaussianFlowDenoiser, assert_moments, dummy_cond, flow_marginal

SHAPE = (1, 4, 4)
MU = torch.linspace(-1.0, 1.0, 16).reshape(SHAPE)  # a different mean per dim catches dim mix-ups
S = 0.6
BATCH = 2000  # 32k values per statistic: se(std) ~ 0.0024


def smooth_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """``shift(1 - i/N)``, i = 0..N: a fixed smooth reparametrisation of time, refined as N grows.

    The solvers' accuracy and order are measured on it, not on the models' diffusers schedule: that one keeps
    its last non-zero sigma at ``shift(shift(1/1000))`` = 0.0089 for every N, so DPM-Solver++(2M)'s
    second-to-last step extrapolates over ``h / h_last`` = 4.6 at N = 10 (4.1 at N = 20, 3.4 at N = 40) and
    overshoots the data's std (measured on this Gaussian: +0.25 at N = 10, +0.13 at N = 20, +0.04 at N = 40;
    Euler -0.15 / -0.07 / -0.04); the references sample with the same step on the same schedule.
    """
    s = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    return (shift * s / (1.0 + (shift - 1.0) * s)).float()


@pytest.mark.parametrize("solver,num_steps,schedule", [("euler", 200, "model"), ("dpm2", 20, "smooth")])
def test_ode_solvers_reproduce_the_data(solver, num_steps, schedule):
    """Euler on the model schedule (SD3's diffusers one), DPM-Solver++(2M) on :func:`smooth_sigmas`."""
    out = rollout(
        GaussianFlowDenoiser(MU, S),
        dummy_cond(BATCH),
        num_steps=num_steps,
        latent_shape=SHAPE,
        solver=solver,
        sigmas=smooth_sigmas(num_steps) if schedule == "smooth" else None,
        seed=11,
    )
    # Euler's O(1/N) bias at N=200 is ~0.008 on the std (exact recursion); allow it explicitly.
    slack = 1.0 / num_steps if solver == "euler" else 0.0
    assert_moments(out.x0, MU, S, slack=slack, what=solver)
    per_dim_mean = out.x0.double().mean(0)
    assert float((per_dim_mean - MU).abs().max()) < 5 * S / math.sqrt(BATCH)


def test_flow_sde_marginals_match_the_ode():
    """Flow-GRPO's SDE keeps the ODE's marginals (math.md §3): checked at the end and along the trajectory."""
    n, batch = 100, 1000
    den = GaussianFlowDenoiser(MU, S)
    sde = rollout(
        den,
        dummy_cond(batch),
        num_steps=n,
        latent_shape=SHAPE,
        solver="flow-sde",
        noise_level=0.7,
        seed=3,
        return_trajectory=True,
    )
    ode = rollout(den, dummy_cond(batch), num_steps=n, latent_shape=SHAPE, solver="euler", seed=3)
    assert not torch.allclose(sde.x0, ode.x0, atol=1e-2)  # the SDE really injected noise
    slack = 1.0 / n  # first-order discretisation of both samplers
    assert_moments(sde.x0, MU, S, slack=slack, what="flow-sde x0")
    assert abs(float(sde.x0.std()) - float(ode.x0.std())) < 0.02
    sigmas = sde.sigmas.tolist()
    for i in range(0, n + 1, 10):
        mean, std = flow_marginal(MU, S, sigmas[i])
        # Near sigma = 1 the sigma_max-regularised first steps overshoot the variance (~0.05, decaying as the
        # SDE contracts); from sigma <= 0.75 on the marginal agrees within 1/N.
        extra = 0.0 if sigmas[i] <= 0.75 else 0.06
        assert_moments(sde.trajectory[:, i], mean, std, slack=slack + extra, what=f"flow-sde step {i}")


def test_cps_is_marginal_exact_for_a_point_mass_and_keeps_the_mean():
    """CPS (math.md §1) keeps the noise coefficient of x_t at sigma: exact marginals when x0_hat is exact."""
    n = 10
    point = rollout(
        GaussianFlowDenoiser(MU, 0.0),
        dummy_cond(BATCH),
        num_steps=n,
        latent_shape=SHAPE,
        solver="cps",
        noise_level=0.7,
        seed=5,
        return_trajectory=True,
    )
    for i, sigma in enumerate(point.sigmas.tolist()[:-1]):
        mean, std = flow_marginal(MU, 0.0, sigma)
        assert_moments(point.trajectory[:, i], mean, std, what=f"cps point-mass step {i}")
    assert torch.allclose(point.x0, MU.expand_as(point.x0), atol=1e-5)
    # Gaussian data: the mean of every marginal is exact (the variance is not: x0_hat shrinks towards mu).
    gauss = rollout(
        GaussianFlowDenoiser(MU, S),
        dummy_cond(BATCH),
        num_steps=n,
        latent_shape=SHAPE,
        solver="cps",
        noise_level=0.7,
        seed=5,
        return_trajectory=True,
    )
    for i, sigma in enumerate(gauss.sigmas.tolist()):
        mean, std = flow_marginal(MU, S, sigma)
        z = (gauss.trajectory[:, i].double() - (1 - sigma) * MU).flatten()
        assert abs(float(z.mean())) < 5 * std / math.sqrt(z.numel()), f"cps mean at step {i}"


def _order(solver, steps):
    """Slope of log(error) vs log(N) for the deterministic map at fixed initial noise, against the exact
    probability-flow solution ``x0 = mu + s z``, on :func:`smooth_sigmas`."""
    den = GaussianFlowDenoiser(MU, S)
    cond = dummy_cond(64)
    errors = []
    for n in steps:
        out = rollout(
            den,
            cond,
            num_steps=n,
            latent_shape=SHAPE,
            solver=solver,
            sigmas=smooth_sigmas(n),
            seed=7,
            return_trajectory=True,
        )
        exact = MU + S * out.trajectory[:, 0].double()
        errors.append(float((out.x0.double() - exact).abs().max()))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return slope, errors


def test_dpm2_is_second_order_and_euler_first_order():
    steps = [4, 8, 16, 32]
    dpm2_slope, dpm2_err = _order("dpm2", steps)
    euler_slope, euler_err = _order("euler", steps)
    assert -2.4 < dpm2_slope < -1.7, (dpm2_slope, dpm2_err)
    assert -1.25 < euler_slope < -0.8, (euler_slope, euler_err)
    # the same check against a 1000-step DPM-Solver++ reference instead of the closed form
    den = GaussianFlowDenoiser(MU, S)
    ref = rollout(
        den, dummy_cond(64), num_steps=1000, latent_shape=SHAPE, solver="dpm2", sigmas=smooth_sigmas(1000),
        seed=7,
    ).x0.double()
    errs = [
        float(
            (
                rollout(
                    den,
                    dummy_cond(64),
                    num_steps=n,
                    latent_shape=SHAPE,
                    solver="dpm2",
                    sigmas=smooth_sigmas(n),
                    seed=7,
                ).x0.double()
                - ref
            )
            .abs()
            .max()
        )
        for n in steps
    ]
    assert -2.4 < np.polyfit(np.log(steps), np.log(errs), 1)[0] < -1.7, errs


def _ddim_moments(mu, s, num_steps, eta):
    """Exact (mean, var) per dim of the DDIM chain started from N(0, 1) with the exact eps model: each step
    is affine in x plus independent noise (math.md §1 formulas), so Gaussian moments propagate exactly."""
    ts, ab = ddim_alpha_bars(num_steps)
    ab = ab.double().tolist()
    m, v = torch.zeros_like(mu, dtype=torch.float64), torch.ones_like(mu, dtype=torch.float64)
    mu = mu.double()
    for i in range(num_steps):
        a, ap = ab[i], ab[i + 1]
        var_x = a * s**2 + 1 - a
        k_eps = math.sqrt(1 - a) / var_x  # eps_hat = k_eps (x - sqrt(a) mu)
        var = (1 - ap) / (1 - a) * (1 - a / ap)
        std = eta * math.sqrt(max(var, 0.0))
        dir_coef = math.sqrt(max(1 - ap - std**2, 0.0))
        # x0_hat = (x - sqrt(1-a) eps_hat) / sqrt(a); mean = sqrt(ap) x0_hat + dir_coef eps_hat
        k = (math.sqrt(ap) / math.sqrt(a)) * (1 - math.sqrt(1 - a) * k_eps) + dir_coef * k_eps
        c = (math.sqrt(ap) / math.sqrt(a)) * math.sqrt(1 - a) * k_eps * math.sqrt(
            a
        ) * mu - dir_coef * k_eps * math.sqrt(a) * mu
        m, v = k * m + c, k * k * v + std**2
    return m, v.sqrt()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_reproduces_the_data(eta):
    mu, s, n = MU * 0.5, 0.6, 50
    out = rollout(
        GaussianEpsDenoiser(mu, s),
        dummy_cond(BATCH),
        num_steps=n,
        latent_shape=SHAPE,
        solver="ddim",
        eta=eta,
        seed=2,
        return_log_probs=True,
    )
    m, sd = _ddim_moments(mu, s, n, eta)
    # The sampled chain has exactly the moments the docs/math.md formulas predict ...
    z = (out.x0.double() - m) / sd
    assert_moments(z, 0.0, 1.0, what=f"ddim eta={eta}")
    # ... and those converge to the data at O(1/N) (0.024 / 0.049 low on the std at N=50 for eta 0 / 1); the
    # mean keeps a ~0.02 offset: the chain starts from N(0, 1), not from N(sqrt(ab_T) mu, ...), ab_T = 0.0047.
    assert float((m - mu).abs().max()) < 0.03 and float((sd - s).abs().max()) < 3.0 / n
    m_fine, sd_fine = _ddim_moments(mu, s, 500, eta)
    assert float((m_fine - mu).abs().max()) < 0.03 and float((sd_fine - s).abs().max()) < 0.01
    assert_moments(out.x0, mu, s, slack=0.03 + 3.0 / n, what=f"ddim eta={eta} vs data")
    if eta == 0.0:
        assert torch.equal(out.log_probs, torch.zeros_like(out.log_probs))  # point masses (math.md §1)
    else:
        assert bool((out.log_probs[:, :-1] != 0).all())
