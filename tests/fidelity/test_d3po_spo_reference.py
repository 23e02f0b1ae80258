"""D3PO's and SPO's loss and selection functions against transcriptions of the reference code.

Transcribed (our own code, faithful to theirs):
* yk7333/d3po@40d31758 scripts/rm/train_d3po.py: ``compare`` (the preference from the rewards) and the loss
  lines (``ratio = torch.clamp(torch.exp(total_prob - total_ref_prob), 1 - eps, 1 + eps)``, ``loss =
  -torch.log(torch.sigmoid(beta * log(ratio_0) * human_prefer[:, 0] + beta * log(ratio_1) *
  human_prefer[:, 1])).mean()``);
* RockeyCoss/SPO@27a86428 spo_training_and_inference/spo/preference_models/compare_funcs.py
  ``preference_score_compare``, the tuple gathering of spo/custom_diffusers/multi_sample_pipeline.py, and the
  loss line of train_scripts/train_spo.py (``-torch.log(torch.sigmoid(beta * log(ratio_0) - beta *
  log(ratio_1))).mean()``, sample 0 the winner);
* RockeyCoss/SPO@27a86428 spo_training_and_inference/spo/custom_diffusers/ddim_seperate.py
  ``ddim_step_fetch_x0`` (epsilon prediction: ``pred_original_sample = (sample - beta_prod_t ** 0.5 *
  model_output) / alpha_prod_t ** 0.5``), the ``x0_hat`` the step-aware scorer reads (train.spo_scorer
  ``predict_x0``); the flow-model counterpart ``x_t - sigma v`` is diffusers' FlowMatchEulerDiscreteScheduler
  step to sigma 0.
"""

from types import SimpleNamespace

import torch

from train.d3po import d3po_loss, d3po_preference
from train.spo import spo_select
from train.spo_scorer import predict_x0


# --- transcriptions -----------------------------------------------------------------------------------------
def ref_compare(a, b):
    if len(a.shape) == 1:
        a = a[..., None]
        b = b[..., None]
    a_dominates = torch.logical_and(torch.all(a <= b, dim=1), torch.any(a < b, dim=1))
    b_dominates = torch.logical_and(torch.all(b <= a, dim=1), torch.any(b < a, dim=1))
    c = torch.zeros([a.shape[0], 2], dtype=torch.float, device=a.device)
    c[a_dominates] = torch.tensor([-1.0, 1.0], device=a.device)
    c[b_dominates] = torch.tensor([1.0, -1.0], device=a.device)
    return c


def ref_d3po_loss(p0, ref0, p1, ref1, r0, r1, beta, eps):
    human_prefer = ref_compare(r0, r1)
    ratio_0 = torch.clamp(torch.exp(p0 - ref0), 1 - eps, 1 + eps)
    ratio_1 = torch.clamp(torch.exp(p1 - ref1), 1 - eps, 1 + eps)
    return -torch.log(
        torch.sigmoid(
            beta * (torch.log(ratio_0)) * human_prefer[:, 0]
            + beta * (torch.log(ratio_1)) * human_prefer[:, 1]
        )
    ).mean()


def ref_preference_score_compare(scores, threshold):
    scores, indices = torch.sort(scores, dim=0, descending=True)
    indices = indices[[0, -1], :]
    scores = scores[[0, -1], :]
    scores = scores.softmax(dim=0)
    valid_samples = scores[0] - scores[1] > threshold
    return indices, valid_samples


def ref_gather_tuples(all_prev_latents, indices, valid_samples):
    return torch.gather(
        all_prev_latents,
        dim=0,
        index=indices.unsqueeze(-1).unsqueeze(-1).unsqueeze(-1).expand(-1, -1, *all_prev_latents.shape[2:]),
    )[
        valid_samples.unsqueeze(0)
        .unsqueeze(-1)
        .unsqueeze(-1)
        .unsqueeze(-1)
        .expand(2, -1, *all_prev_latents.shape[2:])
    ].reshape(2, -1, *all_prev_latents.shape[2:])


def ref_spo_loss(p0, ref0, p1, ref1, beta, eps):
    ratio_0 = torch.clamp(torch.exp(p0 - ref0), 1 - eps, 1 + eps)
    ratio_1 = torch.clamp(torch.exp(p1 - ref1), 1 - eps, 1 + eps)
    return -torch.log(torch.sigmoid(beta * (torch.log(ratio_0)) - beta * (torch.log(ratio_1)))).mean()


# --- comparisons --------------------------------------------------------------------------------------------
def _logps(n, scale, seed):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(n, 4, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    return lp


def test_d3po_preference_matches_compare():
    g = torch.Generator().manual_seed(0)
    r0 = torch.randint(0, 3, (64,), generator=g).double()
    r1 = torch.randint(0, 3, (64,), generator=g).double()
    c = ref_compare(r0, r1)
    w = d3po_preference(r0, r1)
    assert torch.equal(w == 0, c[:, 0] == 1) and torch.equal(w == 1, c[:, 1] == 1)
    assert torch.equal(w == -1, (c == 0).all(1))  # ties: no preference
    assert (w == -1).any() and (w == 0).any() and (w == 1).any()


def test_d3po_loss_and_gradient_match_reference():
    """The engine's loss over the untied pairs (winner first) equals the reference's over the same pairs;
    the gradients with respect to every log-prob agree; a tie's reference gradient is exactly 0."""
    n = 48
    # deviations from 0 to beyond the clamp (|log 1.1| ~ 0.095): both the linear and the clamped regime
    lp = _logps(n, 0.08, 1)
    g = torch.Generator().manual_seed(2)
    r = torch.randint(0, 3, (n, 2), generator=g).double()
    beta, eps = 0.1, 0.1
    p0, ref0, p1, ref1 = lp[:, 0], lp[:, 1], lp[:, 2], lp[:, 3]
    loss_ref = ref_d3po_loss(p0, ref0, p1, ref1, r[:, 0], r[:, 1], beta, eps)
    (grad_ref,) = torch.autograd.grad(loss_ref, lp)
    w = d3po_preference(r[:, 0], r[:, 1])
    keep = w >= 0
    idx = torch.arange(n)[keep]
    wk = w[keep]
    lpw = torch.where(wk == 0, p0[idx], p1[idx])
    lprw = torch.where(wk == 0, ref0[idx], ref1[idx])
    lpl = torch.where(wk == 0, p1[idx], p0[idx])
    lprl = torch.where(wk == 0, ref1[idx], ref0[idx])
    loss, q_w, q_l = d3po_loss(lpw, lprw, lpl, lprl, beta=beta, eps=eps)
    (grad,) = torch.autograd.grad(loss, lp)
    # the reference's mean runs over every pair (ties add the constant log 2): rescale to the untied mean
    n_tie = int((~keep).sum())
    assert n_tie > 0
    expect = (loss_ref * n - n_tie * torch.log(torch.tensor(2.0, dtype=torch.float64))) / keep.sum()
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad * keep.sum() / n, grad_ref, rtol=1e-10, atol=1e-14)
    assert torch.count_nonzero(grad_ref[~keep]) == 0
    # some ratios are clamped (zero gradient), some are not
    hi, lo = (
        torch.log(torch.tensor(1 + eps, dtype=torch.float64)),
        torch.log(torch.tensor(1 - eps, dtype=torch.float64)),
    )
    clamped = (q_w >= hi - 1e-9) | (q_w <= lo + 1e-9)
    assert clamped.any() and (~clamped).any()


def test_spo_select_matches_preference_score_compare():
    g = torch.Generator().manual_seed(3)
    for k in (2, 4):
        scores = torch.randn(k, 200, generator=g) * 2.0
        scores[:, :10] = 0.5  # equal candidates: never kept
        for thr in (0.0, 0.3, 0.6):
            (win_r, lose_r), valid_r = ref_preference_score_compare(scores, thr)
            win, lose, valid = spo_select(scores, thr)
            assert torch.equal(win, win_r) and torch.equal(lose, lose_r) and torch.equal(valid, valid_r)
            assert valid.any() and (~valid).any()


def test_spo_tuples_and_loss_match_reference():
    """The kept (winner, loser) candidates as the reference gathers them, and its loss (winner first)."""
    g = torch.Generator().manual_seed(4)
    k, b = 4, 32
    cand = torch.randn(k, b, 3, 5, 5, generator=g)
    scores = torch.randn(k, b, generator=g) * 2.0
    (indices, valid_r) = ref_preference_score_compare(scores, 0.3)
    ref_pair = ref_gather_tuples(cand, indices, valid_r)  # [2, valid, ...]
    win, lose, valid = spo_select(scores, 0.3)
    ar = torch.arange(b)
    v = valid.nonzero().flatten()
    assert torch.equal(cand[win, ar][v], ref_pair[0]) and torch.equal(cand[lose, ar][v], ref_pair[1])
    lp = _logps(len(v), 0.02, 5)
    beta, eps = 10.0, 0.1
    loss_ref = ref_spo_loss(lp[:, 0], lp[:, 1], lp[:, 2], lp[:, 3], beta, eps)
    (grad_ref,) = torch.autograd.grad(loss_ref, lp)
    loss, _, _ = d3po_loss(lp[:, 0], lp[:, 1], lp[:, 2], lp[:, 3], beta=beta, eps=eps)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-14)


def test_overflowing_ratio_gives_zero_not_nan_gradient():
    """Deliberate difference (docs/math.md): where ``exp(logp - logp_ref)`` overflows the reference's
    ``log(clamp(exp(.)))`` has a NaN gradient (0 * inf); the engine's log-space clamp gives the same value and
    the zero gradient of a clamped ratio."""
    lp = torch.tensor(
        [[200.0, 0.0, 0.0, 0.0], [0.01, 0.0, -0.01, 0.0]], dtype=torch.float32, requires_grad=True
    )
    loss_ref = ref_spo_loss(lp[:, 0], lp[:, 1], lp[:, 2], lp[:, 3], 10.0, 0.1)
    (g_ref,) = torch.autograd.grad(loss_ref, lp)
    loss, _, _ = d3po_loss(lp[:, 0], lp[:, 1], lp[:, 2], lp[:, 3], beta=10.0, eps=0.1)
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(loss, loss_ref)
    assert torch.isnan(g_ref[0]).any() and torch.isfinite(g).all()
    assert torch.equal(g[0, :2], torch.zeros(2)) and torch.allclose(g[1], g_ref[1])


def ref_ddim_fetch_x0(model_output, alpha_prod_t, sample):
    beta_prod_t = 1 - alpha_prod_t
    return (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)


class _LinearDenoiser:
    """A fixed, input-dependent prediction ``0.3 x + 0.1 t`` (t broadcast per sample)."""

    def __call__(self, x, t, cond):
        return 0.3 * x + 0.1 * t.float().view(-1, *([1] * (x.ndim - 1)))


def test_predict_x0_matches_reference_ddim_and_flow_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    policy = SimpleNamespace(denoiser=_LinearDenoiser())
    ab = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    ddim = SimpleNamespace(
        num_steps=3, sigmas=None, alpha_bars=ab, timesteps=torch.tensor([900.0, 500.0, 100.0]),
        guidance_scale=1.0,
    )
    for step in range(3):
        eps = policy.denoiser(x, ddim.timesteps[step].expand(3), None)
        ref = ref_ddim_fetch_x0(eps, ab[step], x)  # predict_x0 computes in fp32
        torch.testing.assert_close(predict_x0(policy, ddim, x, step, None, None), ref, rtol=1e-6, atol=1e-6)
    assert predict_x0(policy, ddim, x, 3, None, None) is x  # the clean sample: scored as is (timestep 0)

    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.0], dtype=torch.float64)
    flow = SimpleNamespace(
        num_steps=3, sigmas=sigmas, alpha_bars=None, timesteps=sigmas[:-1] * 1000, guidance_scale=1.0
    )
    for step in range(3):
        v = policy.denoiser(x, flow.timesteps[step].expand(3), None)
        sch = FlowMatchEulerDiscreteScheduler()
        sch.set_timesteps(sigmas=[float(sigmas[step])])  # one Euler step from sigma to 0
        ref = sch.step(v, sch.timesteps[0], x).prev_sample
        torch.testing.assert_close(predict_x0(policy, flow, x, step, None, None), ref, rtol=1e-6, atol=1e-6)
