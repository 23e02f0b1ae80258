import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from engine.schedules import (
    ddim_alpha_bars,
    ddim_timesteps,
    ddpm_alpha_bars,
    scheduler_sigmas,
    sd3_sigmas,
    timesteps_from_sigmas,
)


@pytest.mark.parametrize("num_steps", [1, 4, 10, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_sd3_sigmas_formula(num_steps, shift):
    """math.md §0 written out: ``sigma_min = shift(1/1000)``, ``s = linspace(1, sigma_min, N)``, ``shift(s)``,
    then 0 (fp32 from diffusers' float64 arithmetic: 1e-6)."""
    sigmas = sd3_sigmas(num_steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (num_steps + 1,)

    def sh(v):
        return shift * v / (1.0 + (shift - 1.0) * v)

    s = torch.linspace(1.0, sh(1.0 / 1000), num_steps, dtype=torch.float64)
    expected = torch.cat([sh(s), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(sigmas.double(), expected, rtol=0, atol=1e-6)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_sd3_sigmas_shift_one_is_linear_to_one_thousandth():
    want = torch.cat([torch.linspace(1.0, 1e-3, 8, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(sd3_sigmas(8, 1.0).double(), want, rtol=0, atol=1e-7)


def test_sd3_sigmas_shift_three_values():
    # SD3.5-M at 10 steps (math.md §0): the hand-made shift(1 - i/N) ended 0.5625, 0.4286, 0.25, 0
    want = [1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]
    torch.testing.assert_close(sd3_sigmas(10, 3.0), torch.tensor(want), rtol=0, atol=6e-5)


def test_timesteps_are_not_truncated():
    sigmas = sd3_sigmas(10, 3.0)
    ts = timesteps_from_sigmas(sigmas)
    assert torch.equal(ts, sigmas * 1000.0)
    assert not torch.equal(ts, ts.round())  # math.md §0: floats, e.g. 960.1293...


FLUX_DEV = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def test_flux_schedule_depends_on_image_size():
    small = scheduler_sigmas(FLUX_DEV, 10, family="flux", image_seq_len=256)
    large = scheduler_sigmas(FLUX_DEV, 10, family="flux", image_seq_len=4096)
    for s in (small, large):
        assert s.shape == (11,) and float(s[0]) == 1.0 and float(s[-1]) == 0.0
        assert bool((s[1:] < s[:-1]).all())
    assert bool((large[1:-1] > small[1:-1]).all())  # more tokens: shifted towards noise (mu grows)


def test_scheduler_object_is_read_not_modified():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    before = sched.sigmas.clone()
    assert torch.equal(scheduler_sigmas(sched, 10), sd3_sigmas(10, 3.0))
    assert torch.equal(sched.sigmas, before)


def test_shift_overrides_a_static_config():
    assert torch.equal(scheduler_sigmas({"shift": 3.0}, 10, shift=1.5), sd3_sigmas(10, 1.5))


def test_scheduler_sigmas_bad_input():
    with pytest.raises(ValueError, match="image_seq_len"):
        scheduler_sigmas(FLUX_DEV, 10, family="flux")
    with pytest.raises(ValueError, match="image_seq_len"):
        scheduler_sigmas(FLUX_DEV, 10, family="sd3")  # dynamic shifting needs the token count too
    with pytest.raises(ValueError, match="shift: .*dynamic"):
        scheduler_sigmas(FLUX_DEV, 10, family="flux", image_seq_len=1024, shift=3.0)
    with pytest.raises(ValueError, match="family"):
        scheduler_sigmas({"shift": 3.0}, 10, family="sdxl")
    with pytest.raises(ValueError, match="_class_name 'DDIMScheduler'"):
        scheduler_sigmas({"_class_name": "DDIMScheduler"}, 10)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        scheduler_sigmas({"num_train_timesteps": 500}, 10)
    with pytest.raises(ValueError, match="scheduler: expected"):
        scheduler_sigmas([3.0], 10)


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
    # set_alpha_to_one=False: the last step goes to alphas_cumprod[0] = 1 - beta_0, not 1 (math.md §1)
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
