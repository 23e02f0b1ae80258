"""Closed-form denoisers for Gaussian data, where every rollout statistic has an exact answer.

Flow (math.md §0): ``x_t = (1 - t) x0 + t eps`` with ``x0 ~ N(mu, s^2)`` per dim; ``var_t = (1-t)^2 s^2 +
t^2``,
``E[x0|x_t] = mu + (1-t) s^2 r / var_t`` and ``E[eps|x_t] = t r / var_t`` with ``r = x_t - (1-t) mu``;
the exact velocity is ``E[eps|x_t] - E[x0|x_t]``.  The probability-flow ODE maps the initial noise ``z`` to
``x0 = mu + s z`` (the monotone map between the two Gaussians).

VP / epsilon (math.md §1 DDIM): ``x_t = sqrt(ab) x0 + sqrt(1-ab) eps``; ``var = ab s^2 + 1 - ab``,
``E[eps|x_t] = sqrt(1-ab) (x_t - sqrt(ab) mu) / var``.
"""

from __future__ import annotations

import math

import torch

from engine.schedules import ddpm_alpha_bars
from models.conditioning import Conditioning


class GaussianFlowDenoiser:
    """Exact rectified-flow velocity for ``x0 ~ N(mu, s^2 I)``; ``mu`` a float or a ``[C, H, W]`` tensor."""

    prediction_type = "flow"

    def __init__(self, mu, s: float):
        self.mu = mu
        self.s = float(s)
        self.calls = 0

    def __call__(self, x, timestep, cond):
        self.calls += 1
        t = (timestep.double() / 1000.0).reshape(-1, 1, 1, 1)
        mu = torch.as_tensor(self.mu, dtype=torch.float64)
        var = (1 - t) ** 2 * self.s**2 + t**2
        r = x.double() - (1 - t) * mu
        x0_mean = mu + (1 - t) * self.s**2 * r / var
        eps_mean = t * r / var
        return (eps_mean - x0_mean).to(x.dtype)


class GaussianEpsDenoiser:
    """Exact noise prediction for ``x0 ~ N(mu, s^2 I)`` under the SD1.5 DDPM schedule (integer timesteps)."""

    prediction_type = "epsilon"

    def __init__(self, mu, s: float):
        self.mu = mu
        self.s = float(s)
        self.alpha_bars = ddpm_alpha_bars().double()

    def __call__(self, x, timestep, cond):
        if not torch.equal(timestep, timestep.round()):
            raise AssertionError(f"epsilon model expects integer DDPM timesteps, got {timestep}")
        ab = self.alpha_bars[timestep.long()].reshape(-1, 1, 1, 1)
        mu = torch.as_tensor(self.mu, dtype=torch.float64)
        var = ab * self.s**2 + 1 - ab
        return (torch.sqrt(1 - ab) * (x.double() - torch.sqrt(ab) * mu) / var).to(x.dtype)


def dummy_cond(batch: int, *, seed: int = 0, length: int = 3, dim: int = 4) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(batch, length, dim, generator=g), torch.randn(batch, dim, generator=g))


def flow_marginal(mu, s: float, sigma: float):
    """Exact ``(mean, std)`` of ``x_sigma`` for Gaussian data."""
    return (1 - sigma) * mu, math.sqrt((1 - sigma) ** 2 * s**2 + sigma**2)


def assert_moments(
    x: torch.Tensor, mean, std: float, *, n_se: float = 5.0, slack: float = 0.0, what: str = ""
):
    """Pooled over samples and dims, ``x - mean`` has mean 0 and std ``std`` within ``n_se`` standard errors.

    ``x`` is ``[B, ...]`` with i.i.d. rows and independent dims; ``mean`` broadcasts against a row.
    """
    z = (x.double() - torch.as_tensor(mean, dtype=torch.float64)).flatten()
    n = z.numel()
    se_mean = std / math.sqrt(n)
    se_std = std / math.sqrt(2 * n)
    got_mean, got_std = float(z.mean()), float(z.std())
    assert abs(got_mean) < n_se * se_mean + slack, f"{what}: mean off by {got_mean:.5f} (se {se_mean:.5f})"
    assert abs(got_std - std) < n_se * se_std + slack, (
        f"{what}: std {got_std:.5f}, expected {std:.5f} (se {se_std:.5f})"
    )
