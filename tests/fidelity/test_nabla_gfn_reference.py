"""train.nabla_gfn against the reference, lzzcd001/nabla-gfn@6b74d4ce, on identical tensors:

* the residual Nabla-DB loss of a batch of transitions (train_nablagfn.py, the block from
  ``score_pf_target = ...`` to ``losses = (losses_forward + reverse_loss_scale * losses_backward +
  loss_terminal).mean()`` plus ``unet_reg_scale * unetreg.mean()``), value and gradients;
* the DDIM-eta forward score ``-(x' - mean) / std^2`` and the reverse score ``-grad_{x_t} sum (x' - mean)^2 /
  (2 std^2)`` of lib/diffusion/inference_step.py ``inference_step`` (DDIMScheduler branch, eta 1, SD1.5's
  scheduler, 50 steps) against kernels.ddim_step on the engine's DDIM schedule;
* the reward-gradient weight (``reward_adaptive_mode`` squared / sqrt: ``alphas_cumprod[t]`` or its root,
  lib/diffusion/inference_step.py ``get_alpha_prod_t``) and the transition subset (``low_var_subsampling``).

The reference functions are transcribed here (our code, faithful to theirs)."""

import pytest
import torch

import kernels
from engine.schedules import SD15_SCHEDULER_CONFIG, ddim_alpha_bars
from train.nabla_gfn import nabla_db_loss, reward_weight, step_score, transition_subset


# ----------------------------------------------------------------------------------------- transcriptions
def ref_losses(
    score_pf,
    score_pf_ref,
    res_logflow_next,
    score_r_next,
    end_mask,
    score_pf_reverse,
    score_pf_ref_reverse,
    res_logflow,
    score_r,
    noise_pred,
    unet_outputs,
    reverse_loss_scale=1.0,
    unet_reg_scale=1e3,
):
    """train_nablagfn.py (6b74d4ce), lines 'score_pf_target = ...' to 'loss = torch.mean(losses)'."""
    unetdiff = (noise_pred - unet_outputs).pow(2)
    unetreg = torch.mean(unetdiff, dim=(1, 2, 3))
    score_pf_target = (score_pf_ref.float() + res_logflow_next + score_r_next).float()
    score_pf_target[end_mask] = (score_pf_ref[end_mask].float() + score_r_next[end_mask].float()).detach()
    score_pf_reverse_target = (score_pf_ref_reverse.float() - res_logflow - score_r.detach()).float()
    score_pf_reverse_target[end_mask] = torch.zeros_like(score_pf_reverse_target[end_mask])
    loss_terminal = (res_logflow_next.pow(2).mean(dim=[1, 2, 3]) * end_mask.float()).sum() / (
        end_mask.float().sum() + 1e-6
    )
    losses_forward = (score_pf - score_pf_target).pow(2)
    losses_backward = (score_pf_reverse - score_pf_reverse_target).pow(2)
    losses = (losses_forward + reverse_loss_scale * losses_backward + loss_terminal).mean()
    losses = losses + unet_reg_scale * unetreg.mean()
    return torch.mean(losses)


def ref_ddim_inference_step(sched, model_output, timestep, sample, prev_sample, eta=1.0, reverse_grad=False):
    """lib/diffusion/inference_step.py ``inference_step``, DDIMScheduler branch (epsilon, no clipping)."""

    def bc(t, shape):
        return t.reshape(t.shape + (1,) * (len(shape) - t.ndim)).broadcast_to(shape)

    prev_timestep = timestep - sched.config.num_train_timesteps // sched.num_inference_steps
    prev_timestep = torch.clamp(prev_timestep, 0, sched.config.num_train_timesteps - 1)
    alpha_prod_t = sched.alphas_cumprod.gather(0, timestep.cpu())
    alpha_prod_t_prev = torch.where(
        prev_timestep.cpu() >= 0,
        sched.alphas_cumprod.gather(0, prev_timestep.cpu()),
        sched.final_alpha_cumprod,
    )
    alpha_prod_t = bc(alpha_prod_t, sample.shape)
    alpha_prod_t_prev = bc(alpha_prod_t_prev, sample.shape)
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    pred_epsilon = model_output
    a_t = sched.alphas_cumprod.gather(0, timestep.cpu())
    a_p = torch.where(
        prev_timestep.cpu() >= 0,
        sched.alphas_cumprod.gather(0, prev_timestep.cpu()),
        sched.final_alpha_cumprod,
    )
    variance = ((1 - a_p) / (1 - a_t)) * (1 - a_t / a_p)
    std_dev_t = bc(eta * variance ** (0.5), sample.shape)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    if reverse_grad:
        target = ((prev_sample.detach() - prev_sample_mean) ** 2).sum()
        grad = torch.autograd.grad(target, sample)[0]
        return -grad / (2 * (std_dev_t**2))
    return -(prev_sample.detach() - prev_sample_mean) / (std_dev_t**2)


# ------------------------------------------------------------------------------------------------- tests
def _tensors(b=5, shape=(4, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(b, *shape, generator=g)  # noqa: E731
    return {k: r() for k in ("s", "sr", "phin", "gn", "srev", "srrev", "phic", "gc", "pred", "old")}


@pytest.mark.parametrize("n_end", [0, 2, 5])
def test_loss_matches_reference_value_and_gradients(n_end):
    t = _tensors()
    end = torch.zeros(5, dtype=torch.bool)
    end[:n_end] = True
    leaves = {k: t[k].clone().requires_grad_(True) for k in ("s", "phin", "phic", "pred")}
    ref = ref_losses(
        leaves["s"],
        t["sr"],
        leaves["phin"],
        t["gn"],
        end,
        t["srev"],
        t["srrev"],
        leaves["phic"],
        t["gc"],
        leaves["pred"],
        t["old"],
    )
    ref_g = torch.autograd.grad(ref, list(leaves.values()))
    ours_leaves = {k: t[k].clone().requires_grad_(True) for k in leaves}
    ours, _ = nabla_db_loss(
        ours_leaves["s"],
        t["sr"],
        ours_leaves["phin"],
        t["gn"],
        end,
        s_theta_rev=t["srev"],
        s_ref_rev=t["srrev"],
        phi_cur=ours_leaves["phic"],
        g_cur=t["gc"],
        reverse_scale=1.0,
        pred=ours_leaves["pred"],
        pred_old=t["old"],
        reg_scale=1e3,
    )
    ours_g = torch.autograd.grad(ours, list(ours_leaves.values()))
    # fp32 (the reference casts its targets with .float()), same terms, reductions in another order
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    for a, b in zip(ours_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    if n_end == 5:  # every transition terminal: the forward target is detached, phi only gets L_term
        assert float(ours_g[1].abs().sum()) > 0


@pytest.mark.parametrize("step", [0, 17, 49])
def test_ddim_scores_match_reference_inference_step(step):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    sched.set_timesteps(50)
    timesteps, alpha_bars = ddim_alpha_bars(50)
    assert torch.equal(timesteps, sched.timesteps)
    b, shape = 3, (4, 8, 8)
    g = torch.Generator().manual_seed(step)
    x = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    prev = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    w = torch.randn(8, 8, generator=g, dtype=torch.float64) / 8
    t = torch.full((b,), int(timesteps[step]), dtype=torch.long)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()

    def eps_of(xx):  # a prediction that depends on x, so the reverse score has a Jacobian term
        return torch.tanh(xx @ w)

    xr = x.clone().requires_grad_(True)
    ref_fwd = ref_ddim_inference_step(sched, eps_of(xr), t, xr, prev)
    ref_rev = ref_ddim_inference_step(sched, eps_of(xr), t, xr, prev, reverse_grad=True)
    with kernels.use_backend("reference"):
        xo = x.float().clone().requires_grad_(True)
        ab = alpha_bars[step].expand(b)
        abp = alpha_bars[step + 1].expand(b)
        _, _, mean, std = kernels.ddim_step(
            xo, eps_of(xo.double()).float(), ab, abp, eta=1.0, prev_sample=prev.float()
        )
        ours_fwd = step_score(prev.float(), mean, std)
        sq = ((prev.float() - mean) ** 2).sum()
        ours_rev = -torch.autograd.grad(sq, xo)[0] / (2 * std.reshape(-1, 1, 1, 1) ** 2)
    # fp32 engine vs fp64 reference; the score is a difference over std^2 (~1e-3 at the last step)
    scale = ref_fwd.detach().abs().max()
    torch.testing.assert_close(ours_fwd.double(), ref_fwd.detach(), rtol=1e-4, atol=1e-5 * float(scale))
    rscale = ref_rev.abs().max()
    torch.testing.assert_close(ours_rev.double(), ref_rev, rtol=1e-3, atol=1e-4 * float(rscale))


def test_reward_weight_is_the_references_alpha_prod():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    sched.set_timesteps(50)
    timesteps, alpha_bars = ddim_alpha_bars(50)
    ref = sched.alphas_cumprod.gather(0, timesteps)  # get_alpha_prod_t at the step's timestep
    torch.testing.assert_close(reward_weight("ddim", alpha_bars[:-1], "squared"), ref.float())
    torch.testing.assert_close(reward_weight("ddim", alpha_bars[:-1], "sqrt"), ref.float().sqrt())
    # x' of the last step (t' = 0): the reference gathers alphas_cumprod[0]; the schedule's last alpha_bar
    torch.testing.assert_close(reward_weight("ddim", alpha_bars[-1:], "squared"), sched.alphas_cumprod[:1])
    # flow (derived): the signal coefficient 1 - sigma plays sqrt(alpha_bar)
    sig = torch.tensor([1.0, 0.5, 0.0])
    torch.testing.assert_close(reward_weight("flow-sde", sig, "squared"), torch.tensor([0.0, 0.25, 1.0]))


def test_transition_subset_is_low_var_subsampling():
    """train_nablagfn.py ``low_var_subsampling``: perms = [N-1] + one pick per trunk, trunks reversed;
    the first ``int(N * fraction) + 1`` are trained."""
    g = torch.Generator().manual_seed(0)
    sub = transition_subset(50, 5, 400, g)
    assert sub.shape == (400, 6)
    assert (sub[:, 0] == 49).all()
    for j in range(1, 6):
        block = 5 - j  # trunk order reversed(range(n_trunks))
        assert ((sub[:, j] >= block * 10) & (sub[:, j] < block * 10 + 10)).all()
        assert len(set(sub[:, j].tolist())) == 10  # uniform within the block: every step drawn
