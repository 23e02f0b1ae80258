"""The engine's flow sigmas and model timesteps against diffusers' own (math.md §0, issue 20 item 1).

Every reference method samples and trains on the model's diffusers scheduler as its pipeline drives it:
flow_grpo (yifan123/flow_grpo@ac4c86e8 flow_grpo/diffusers_patch/sd3_pipeline_with_logprob.py) and
DiffusionNFT (NVlabs/DiffusionNFT@24af5554 flow_grpo/diffusers_patch/pipeline_with_logprob.py, step 5) call
diffusers' ``retrieve_timesteps(scheduler, N, device, sigmas=None)`` for SD3, and for FLUX
``sigmas = np.linspace(1.0, 1 / N, N)`` with ``mu = calculate_shift(image_seq_len, ...)``, as diffusers'
``FluxPipeline.__call__`` does.  The expected values here are diffusers' themselves: its scheduler, or its
pipelines run on tiny random pipelines saved with ``save_pretrained`` (stopped at the first transformer call:
the schedule is set by then).  Before 2026-12 the engine used ``shift(1 - i/N)`` and every comparison here
failed (max difference 0.24 at N = 10).
"""

import logging

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

import models
import train.policy
from engine import rollout, scheduler_sigmas, sd3_sigmas, timesteps_from_sigmas
from models.conditioning import Conditioning
from models.loader import FLUX_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG, load_scheduler_config
from tests.models.test_text_vae import T5_LEN, _flux_pipeline, _sd3_pipeline
from train.policy import ModelConfig, build_policy, check_schedule

SD35M = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def _diffusers(config, n, **kwargs):
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(n, **kwargs)
    return sched.sigmas, sched.timesteps


class _Stop(Exception):
    pass


def _pipeline_schedule(pipe, height, width, n):
    """``(sigmas, timesteps, first timestep the transformer got)`` of ``pipe(...)`` at ``height x width``:
    the pipeline sets its schedule, then stops at the first transformer call."""
    seen = {}

    def hook(module, args, kwargs):
        seen["timestep"] = kwargs["timestep"].detach().clone()
        raise _Stop

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(_Stop):
            pipe(
                prompt="a red cat",
                height=height,
                width=width,
                num_inference_steps=n,
                guidance_scale=1.0,
                max_sequence_length=T5_LEN,
                output_type="latent",
            )
    finally:
        handle.remove()
    return pipe.scheduler.sigmas.clone(), pipe.scheduler.timesteps.clone(), seen["timestep"]


class _Zero:
    prediction_type = "flow"

    def __call__(self, x, timestep, cond):
        return torch.zeros_like(x)


def _cond(b=1):
    return Conditioning(torch.zeros(b, 2, 4), torch.zeros(b, 4))


# ---------------------------------------------------------------------------------------------- configs alone
@pytest.mark.parametrize("n", [1, 10, 25, 40])
def test_sd3_config_sigmas_and_timesteps_are_diffusers(n):
    want_sigmas, want_t = _diffusers(SD35M, n)
    assert torch.equal(scheduler_sigmas(SD35M, n), want_sigmas)
    assert torch.equal(sd3_sigmas(n, 3.0), want_sigmas)
    assert torch.equal(timesteps_from_sigmas(want_sigmas[:-1]), want_t)
    # engine.rollout with only shift=3: the same schedule and model timesteps
    out = rollout(_Zero(), _cond(), num_steps=n, latent_shape=(1, 2, 2), solver="euler", shift=3.0)
    assert torch.equal(out.sigmas, want_sigmas) and torch.equal(out.timesteps, want_t)


def test_sd3_values_at_ten_steps():
    """math.md §0's numbers, and how far the hand-made ``shift(1 - i/N)`` schedule was from them."""
    got = sd3_sigmas(10, 3.0)
    assert [round(v, 4) for v in got.tolist()] == [
        1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.278, 0.0089, 0.0
    ]
    s = 1.0 - torch.arange(11, dtype=torch.float64) / 10
    old = (3 * s / (1 + 2 * s)).float()
    assert 0.23 < float((got - old).abs().max()) < 0.25


@pytest.mark.parametrize("shift", [1.0, 2.0, 5.0])
def test_rollout_shift_is_the_scheduler_shift(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(10)
    out = rollout(_Zero(), _cond(), num_steps=10, latent_shape=(1, 2, 2), solver="dpm2", shift=shift)
    assert torch.equal(out.sigmas, sched.sigmas) and torch.equal(out.timesteps, sched.timesteps)


@pytest.mark.parametrize("height,width", [(256, 256), (512, 512), (1024, 1024), (768, 1360), (2048, 2048)])
@pytest.mark.parametrize("n", [10, 28])
def test_flux_config_sigmas_follow_the_flux_pipeline(height, width, n):
    """FluxPipeline.__call__ step 5 transcribed (diffusers@0.42 pipelines/flux/pipeline_flux.py): latents of
    ``2 (H // 16) x 2 (W // 16)`` packed into ``(H // 16) (W // 16)`` tokens,
    ``sigmas = linspace(1, 1/N, N)``,
    ``mu = calculate_shift(seq, base_image_seq_len, max_image_seq_len, base_shift, max_shift)``."""
    seq = (height // 16) * (width // 16)
    sched = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG)
    mu = calculate_shift(
        seq,
        sched.config.get("base_image_seq_len", 256),
        sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5),
        sched.config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(sched, n, "cpu", sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    got = scheduler_sigmas(FLUX_SCHEDULER_CONFIG, n, family="flux", image_seq_len=seq)
    assert torch.equal(got, sched.sigmas)
    assert torch.equal(timesteps_from_sigmas(got[:-1]), timesteps)


def test_flux_schnell_config_ignores_the_size():
    """A FLUX scheduler without dynamic shifting (FLUX.1-schnell: shift 1): linspace(1, 1/N, N) as passed."""
    schnell = {**FLUX_SCHEDULER_CONFIG, "shift": 1.0, "use_dynamic_shifting": False}
    a = scheduler_sigmas(schnell, 4, family="flux", image_seq_len=256)
    b = scheduler_sigmas(schnell, 4, family="flux", image_seq_len=4096)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


# ------------------------------------------------------------------------------ tiny pipelines saved on disk
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny random SD3 (shift 3 and shift 5) and FLUX (FLUX.1-dev's scheduler) pipelines saved with
    diffusers, bare SD3 and FLUX transformer folders, and a prompt file."""
    tmp = tmp_path_factory.mktemp("pipes")
    parts = _sd3_pipeline(tmp).components
    sd3 = StableDiffusion3Pipeline(**{**parts, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)})
    sd3.save_pretrained(tmp / "sd3")
    sd3_5 = StableDiffusion3Pipeline(**{**parts, "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0)})
    sd3_5.save_pretrained(tmp / "sd3_shift5")
    flux = _flux_pipeline(tmp)
    flux = FluxPipeline(
        **{**flux.components, "scheduler": FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG)}
    )
    flux.save_pretrained(tmp / "flux")
    sd3.transformer.save_pretrained(tmp / "bare_sd3")
    flux.transformer.save_pretrained(tmp / "bare_flux")
    (tmp / "prompts.txt").write_text("a red cat\ntwo blue dogs\n")
    return {"root": tmp, "sd3": sd3, "sd3_shift5": sd3_5, "flux": flux}


def _policy(path, prompts, resolution):
    return build_policy(
        ModelConfig(resolution=resolution, lora_rank=2, lora_alpha=2.0),
        preset="x",
        model_path=str(path),
        device=torch.device("cpu"),
        seed=0,
        prompts=str(prompts),
    )


@pytest.mark.parametrize("name", ["sd3", "sd3_shift5"])
def test_saved_sd3_pipeline_schedule(saved, name):
    root = saved["root"]
    assert load_scheduler_config(root / name)["shift"] == (3.0 if name == "sd3" else 5.0)
    policy = _policy(root / name, root / "prompts.txt", resolution=16)
    for n in (1, 10, 25):
        sigmas, timesteps, first = _pipeline_schedule(saved[name], 16, 16, n)
        assert torch.equal(policy.sigmas(n), sigmas)
        assert torch.equal(timesteps_from_sigmas(policy.sigmas(n)[:-1]), timesteps)
        assert float(first[0]) == float(timesteps[0])  # the pipeline's model input: 1000 sigma, a float


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_saved_flux_pipeline_schedule_with_the_image_size(saved, resolution, monkeypatch):
    """The policy reads FLUX.1-dev's dynamic shifting from the saved pipeline and passes its image token
    count (``(H/2)(W/2)`` packed tokens of its latent): its sigmas, and those its rollouts run on, are the
    pipeline's at that resolution."""
    root = saved["root"]
    policy = _policy(root / "flux", root / "prompts.txt", resolution=resolution)
    _, h, w = policy.latent_shape
    assert policy.schedule_family == "flux" and policy.image_seq_len == (h // 2) * (w // 2)
    sigmas, timesteps, first = _pipeline_schedule(saved["flux"], resolution, resolution, 10)
    assert torch.equal(policy.sigmas(10), sigmas)
    assert torch.equal(timesteps_from_sigmas(sigmas[:-1]), timesteps)
    torch.testing.assert_close(first, timesteps[:1] / 1000)  # FluxPipeline feeds timestep / 1000

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(train.policy, "rollout", spy)
    with pytest.raises(_Stop):
        policy.sample(["a red cat"], [0], solver="euler", num_steps=10)
    assert torch.equal(seen["sigmas"], sigmas)


def test_flux_sizes_give_different_schedules(saved):
    root = saved["root"]
    small = _policy(root / "flux", root / "prompts.txt", resolution=16).sigmas(10)
    large = _policy(root / "flux", root / "prompts.txt", resolution=64).sigmas(10)
    assert bool((large[1:-1] > small[1:-1]).all())


def test_bare_transformer_folder_falls_back_and_says_so_once(saved, caplog):
    root = saved["root"]
    with caplog.at_level(logging.WARNING, logger="models.loader"):
        assert load_scheduler_config(root / "bare_sd3") == SD3_SCHEDULER_CONFIG
        assert load_scheduler_config(root / "bare_sd3") == SD3_SCHEDULER_CONFIG
        assert load_scheduler_config(root / "bare_flux") == FLUX_SCHEDULER_CONFIG
    said = [r.getMessage() for r in caplog.records if "has no scheduler config" in r.getMessage()]
    assert len(said) == 2 and "bare_sd3" in said[0] and '"shift": 3.0' in said[0]
    assert "use_dynamic_shifting" in said[1]


def test_embedded_default_ships_sd3s_scheduler():
    from models.embedded import DEFAULT_DIR

    config = load_scheduler_config(DEFAULT_DIR)
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler" and config["shift"] == 3.0
    assert not config["use_dynamic_shifting"]
    assert torch.equal(scheduler_sigmas(config, 10), _diffusers(SD35M, 10)[0])


def test_sample_shift_is_checked_against_the_model(saved):
    root = saved["root"]
    check_schedule(None, None)
    check_schedule(str(root / "sd3"), 2.0)
    check_schedule(str(root / "flux"), None)
    with pytest.raises(ValueError, match=r"--sample\.shift: expected a float > 0"):
        check_schedule(str(root / "sd3"), 0.0)
    with pytest.raises(ValueError, match=r"--sample\.shift \(.*flux\): .*dynamic_shifting.*got 3\.0"):
        check_schedule(str(root / "flux"), 3.0)


def test_sample_shift_overrides_the_config(saved):
    root = saved["root"]
    policy = _policy(root / "sd3_shift5", root / "prompts.txt", resolution=16)
    assert torch.equal(policy.sigmas(10), sd3_sigmas(10, 5.0))
    assert torch.equal(policy.sigmas(10, 2.0), sd3_sigmas(10, 2.0))
    assert models.load_scheduler_config is load_scheduler_config
