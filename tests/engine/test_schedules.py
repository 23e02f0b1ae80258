import pytest
import torch

from engine.schedules import (
    ddim_alpha_bars,
    ddim_timesteps,
    ddpm_alpha_bars,
    sd3_sigmas,
    timesteps_from_sigmas,
)


@pytest.mark.parametrize("num_steps", [1, 4, 10, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_sd3_sigmas_formula(num_steps, shift):
    sigmas = sd3_sigmas(num_steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (num_steps + 1,)
    for i in range(num_steps + 1):
        s = 1.0 - i / num_steps
        expected = shift * s / (1.0 + (shift - 1.0) * s)
        assert abs(float(sigmas[i]) - expected) < 1e-6
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_sd3_sigmas_shift_one_is_linear():
    assert torch.allclose(sd3_sigmas(8, 1.0), torch.linspace(1.0, 0.0, 9), atol=1e-7)


def test_sd3_sigmas_shift_three_values():
    # SD3.5-M, 4 steps: s = 0.75 -> 2.25 / 2.5 = 0.9, s = 0.5 -> 1.5 / 2 = 0.75, s = 0.25 -> 0.75 / 1.5 = 0.5.
    assert torch.allclose(sd3_sigmas(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]), atol=1e-7)


def test_timesteps_are_not_truncated():
    sigmas = sd3_sigmas(10, 3.0)
    ts = timesteps_from_sigmas(sigmas)
    assert torch.equal(ts, sigmas * 1000.0)
    assert not torch.equal(ts, ts.round())  # SPEC §0: floats, e.g. 964.2857...


def test_ddpm_scaled_linear_alpha_bars():
    ab = ddpm_alpha_bars()
    assert ab.shape == (1000,)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert abs(float(ab[0]) - (1 - 0.00085)) < 1e-7
    assert abs(float(ab[-1]) - float(torch.prod(1 - betas))) < 1e-6
    assert 0.004 < float(ab[-1]) < 0.006  # the well-known SD1.5 terminal alpha_bar (~0.0047)
    assert bool((ab[1:] < ab[:-1]).all())


def test_ddim_spacing_and_alpha_bars():
    ts = ddim_timesteps(50)
    assert ts.tolist()[:3] == [981, 961, 941] and ts.tolist()[-1] == 1
    ts2, ab = ddim_alpha_bars(50)  # SD1.5's scheduler config (diffusers' DDIMScheduler computes it)
    assert torch.equal(ts, ts2)
    # set_alpha_to_one=False: the last step goes to alphas_cumprod[0] = 1 - beta_0, not 1 (SPEC §1)
    assert ab.shape == (51,) and float(ab[-1]) == pytest.approx(1 - 0.00085, abs=1e-7)
    torch.testing.assert_close(ab[:-1], ddpm_alpha_bars()[ts], rtol=1e-5, atol=0)
    _, ab_one = ddim_alpha_bars(50, scheduler_config={"set_alpha_to_one": True, "clip_sample": False})
    assert float(ab_one[-1]) == 1.0


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_steps(bad):
    with pytest.raises(ValueError, match="num_steps"):
        sd3_sigmas(bad)


def test_bad_shift():
    with pytest.raises(ValueError, match="shift"):
        sd3_sigmas(4, shift=0.0)
