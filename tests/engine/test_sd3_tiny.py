"""End to end through a real (tiny, random) diffusers SD3 transformer behind a minimal denoiser adapter."""

import pytest
import torch

import kernels
from engine import SOLVERS, rollout
from models.conditioning import Conditioning

diffusers = pytest.importorskip("diffusers")

SHAPE = (4, 8, 8)


class TinySD3Denoiser(torch.nn.Module):
    """``denoiser(x, timestep = 1000 sigma, cond) -> velocity`` over ``SD3Transformer2DModel``."""

    def __init__(self, prediction_type="flow"):
        super().__init__()
        torch.manual_seed(0)
        self.transformer = diffusers.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=16,
            pos_embed_max_size=8,
        ).eval()
        self.prediction_type = prediction_type
        self.calls = 0

    def graph_key(self):
        return ("tiny-sd3", self.prediction_type)

    def forward(self, x, timestep, cond: Conditioning):
        self.calls += 1
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_embeds,
            timestep=timestep,
            return_dict=False,
        )[0]


def _cond(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(batch, 5, 16, generator=g), torch.randn(batch, 16, generator=g))


@pytest.mark.parametrize("solver", SOLVERS)
def test_tiny_sd3_rollout_every_solver(solver):
    den = TinySD3Denoiser("epsilon" if solver == "ddim" else "flow")
    stochastic = solver in ("flow-sde", "cps", "ddim")
    out = rollout(
        den,
        _cond(3, 1),
        num_steps=4,
        latent_shape=SHAPE,
        solver=solver,
        seed=[1, 2, 3],
        return_trajectory=True,
        return_log_probs=stochastic,
    )
    assert den.calls == 4
    assert out.x0.shape == (3, *SHAPE) and bool(torch.isfinite(out.x0).all())
    assert out.trajectory.shape == (3, 5, *SHAPE)
    assert not torch.allclose(out.x0, out.trajectory[:, 0], atol=1e-2)  # the model moved the state
    again = rollout(den, _cond(3, 1), num_steps=4, latent_shape=SHAPE, solver=solver, seed=[1, 2, 3])
    assert torch.equal(again.x0, out.x0)
    if stochastic:
        assert out.log_probs.shape == (3, 4) and bool(torch.isfinite(out.log_probs).all())


def test_tiny_sd3_cfg_and_exact_rescoring():
    den = TinySD3Denoiser()
    cond, uncond = _cond(2, 1), _cond(2, 2)
    guided = rollout(
        den,
        cond,
        num_steps=4,
        latent_shape=SHAPE,
        solver="flow-sde",
        seed=[5, 6],
        guidance_scale=4.0,
        uncond=uncond,
        return_trajectory=True,
        return_log_probs=True,
    )
    plain = rollout(
        den,
        cond,
        num_steps=4,
        latent_shape=SHAPE,
        solver="flow-sde",
        seed=[5, 6],
        return_trajectory=True,
        return_log_probs=True,
    )
    assert not torch.allclose(guided.x0, plain.x0, atol=1e-3)
    # re-score the CFG-free rollout's transitions the way Flow-GRPO training does: ratio exactly 1
    with torch.no_grad():
        for i in range(4):
            x = plain.trajectory[:, i]
            v = den(x, plain.timesteps[i].expand(2), cond)
            _, lp, _, _ = kernels.sde_step(
                x,
                v,
                plain.sigmas[i],
                plain.sigmas[i + 1],
                noise_level=0.7,
                sigma_max=plain.sigmas[1],
                prev_sample=plain.trajectory[:, i + 1],
            )
            assert torch.equal(lp, plain.log_probs[:, i])
