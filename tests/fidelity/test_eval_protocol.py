"""The held-out evaluation protocol (issue 20 item 7): ``--eval.solver / --eval.num-steps / --eval.cfg-scale``
drive the evaluation of the policy, ``--eval.base-cfg-scale`` the one-off base-model evaluation, the protocol
is logged beside the scores, and the real-model presets evaluate as the references do.

References (values transcribed from their configs and eval functions):
- Flow-GRPO, yifan123/flow_grpo@ac4c86e8 scripts/train_sd3.py ``eval``: ``pipeline_with_logprob(...,
  num_inference_steps=config.sample.eval_num_steps, guidance_scale=config.sample.guidance_scale,
  noise_level=0)``; config/grpo.py: ``eval_num_steps = 40``, ``guidance_scale = 4.5``.  The SDE step at noise
  level 0 is the Euler step (math.md §1).
- DiffusionNFT, NVlabs/DiffusionNFT@24af5554 scripts/train_nft_sd3.py ``eval_fn``:
  ``pipeline_with_logprob(..., num_inference_steps=config.sample.eval_num_steps,
  guidance_scale=config.sample.guidance_scale, deterministic=True, solver="flow")``; config/nft.py
  ``_get_config``: ``eval_num_steps = 40``, ``guidance_scale = 1.0``; flow_grpo/diffusers_patch/solver.py
  ``flow_grpo_step`` with ``eta = 0`` is Euler.
Before this change every loop evaluated CFG-free with the rollout solver (DPM-Solver++ 2M) and
``--eval.cfg-scale`` only set the base model's CFG: every test here failed.
"""

import contextlib

import pytest
import torch

import train.ddpo as ddpo
import train.grpo as grpo
import train.nft as nft
from train import common
from train.evaluation import EvalConfig, Evaluator

FLOW_GRPO_EVAL = {"solver": "euler", "num_steps": 40, "cfg_scale": 4.5}
DIFFUSION_NFT_EVAL = {"solver": "euler", "num_steps": 40, "cfg_scale": 1.0}


def _protocol(cfg: EvalConfig) -> dict:
    return {"solver": cfg.solver, "num_steps": cfg.num_steps, "cfg_scale": cfg.cfg_scale}


def test_real_model_presets_evaluate_as_the_references():
    assert _protocol(grpo.preset_sd35m().eval) == FLOW_GRPO_EVAL
    assert _protocol(grpo.preset_sd35m_fast().eval) == FLOW_GRPO_EVAL
    assert _protocol(nft.preset_sd35m().eval) == DIFFUSION_NFT_EVAL


def test_embedded_presets_stay_cfg_free():
    for cfg in (nft.preset_tiny(), grpo.preset_tiny(), ddpo.preset_tiny()):
        assert cfg.eval.cfg_scale == 1.0 and cfg.eval.solver == "dpm2"
    assert ddpo.preset_sd15().eval.base_cfg_scale == 5.0 and ddpo.preset_sd15().eval.cfg_scale == 1.0


class _Policy:
    """What Evaluator touches of a train.policy.Policy; records each sample call's sampler and adapter."""

    class denoiser:  # noqa: N801 - attribute-like
        prediction_type = "flow"

    def __init__(self):
        self.test_prompts = ["a", "b", "c"]
        self.calls, self.mode = [], None

    prompt_text = staticmethod(str)

    @contextlib.contextmanager
    def _mode(self, name):
        self.mode = name
        yield
        self.mode = None

    def adapter(self, name):
        return self._mode(name)

    def adapters_disabled(self):
        return self._mode("base")

    def eval_weights(self):
        return contextlib.nullcontext()

    def sample(self, prompts, seeds, **kw):
        self.calls.append({"mode": self.mode, **kw})
        return torch.zeros(len(prompts), 3, 4, 4)

    def decode(self, x0):
        return x0


def _reward(images, prompts):
    return torch.full((len(prompts),), 0.5), {}


def test_evaluator_samples_the_policy_at_cfg_scale_and_the_base_at_base_cfg_scale(tmp_path):
    cfg = EvalConfig(solver="euler", num_steps=7, cfg_scale=3.0, base_cfg_scale=6.0)
    ev = Evaluator(cfg, seed=0, reward=_reward)
    (tmp_path / "samples").mkdir()
    policy = _Policy()
    ev.run(policy, 0, tmp_path)
    ev.run(policy, 0, tmp_path, base_cfg=True)
    (pol,), (base,) = policy.calls[:1], policy.calls[1:]
    assert pol["mode"] == "default" and pol["guidance_scale"] == 3.0
    assert base["mode"] == "base" and base["guidance_scale"] == 6.0
    assert pol["solver"] == base["solver"] == "euler" and pol["num_steps"] == base["num_steps"] == 7
    assert ev.protocol(policy) == "euler 7 steps, CFG 3"
    assert ev.protocol(policy, base_cfg=True) == "euler 7 steps, CFG 6"
    assert Evaluator(EvalConfig(), seed=0, reward=_reward).protocol(policy) == "dpm2 10 steps, CFG-free"


def test_protocol_is_logged_with_the_metrics(tmp_path, capsys):
    argv = ["--run-dir", str(tmp_path / "r"), "--max-iters", "1", "--eval.num-prompts", "2"]
    argv += ["--sample.prompts-per-iter", "1", "--sample.images-per-prompt", "2", "--sample.num-steps", "2"]
    argv += ["--train.steps-per-iter", "1"]
    argv += ["--eval.solver", "euler", "--eval.num-steps", "3", "--eval.cfg-scale", "2"]
    argv += ["--log.progress", "false"]
    assert nft.main(argv) == 0
    row = [r for r in common.read_metrics(tmp_path / "r") if "eval/score" in r][0]  # iteration 0's
    assert row["protocol/eval"] == "euler 3 steps, CFG 2"
    assert row["protocol/base_cfg"] == "euler 3 steps, CFG 4.5"
    assert "| euler 3 steps, CFG 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--eval.cfg-scale", "-1"], "--eval.cfg-scale: expected a finite value >= 0"),
        (["--eval.base-cfg-scale", "inf"], "--eval.base-cfg-scale: expected a finite number, got inf"),
        (["--eval.num-steps", "0"], "--eval.num-steps: expected an integer >= 1, got 0"),
        (["--eval.solver", "flow-sde"], "--eval.solver: expected a deterministic ODE solver"),
        (["--sample.shift", "0"], "--sample.shift: expected a value > 0, got 0.0"),
    ],
)
def test_bad_eval_options_fail_before_work(tmp_path, capsys, argv, needle):
    assert nft.main(["--run-dir", str(tmp_path / "r"), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
