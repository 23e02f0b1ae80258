"""``kernels.preference_loss`` against the public reference losses, on identical tensors.

Transcribed (our own code, faithful to theirs; the models' predictions are given tensors here):
- SalesforceAIResearch/DiffusionDPO@5233e759 train.py, the ``train_method == 'dpo'`` branch of the loss
  (``model_losses = (model_pred - target).pow(2).mean(dim=[1,2,3])`` ...
  ``scale_term = -0.5 * args.beta_dpo``, ``loss = -1 * F.logsigmoid(inside_term).mean()``,
  ``implicit_acc``), ``--beta_dpo`` default 5000, epsilon target ``noise`` shared by the two halves of the
  batch;
- yifan123/flow_grpo@ac4c86e8 scripts/train_sd3_dpo.py (``theta_mse`` / ``ref_mse`` on ``target = noise -
  model_input``, ``inside_term = -0.5 * config.train.beta * w_l_diff``, ``loss = torch.mean(-logsigmoid)``),
  config/dpo.py ``beta = 100``;
- huggingface/diffusers@071190da examples/research_projects/diffusion_dpo/train_diffusion_dpo.py
  (``logits = ref_diff - model_diff``, ``loss_type == 'sigmoid'``: ``-1 * F.logsigmoid(args.beta_dpo *
  logits).mean()``), ``--beta_dpo`` default 2500;
- mapo-t2i/mapo@374b3d3d utils.py ``compute_loss`` (``F.mse_loss(model_pred.float(), target.float())``
  per sample, ``log_odds = s e_w / (exp(s e_w) - 1) - s e_l / (exp(s e_l) - 1)``, ``ratio =
  F.logsigmoid(log_odds * noise_scheduler.config.num_train_timesteps)``, ``loss = model_losses_w.mean() -
  (args.beta_mapo * ratio).mean()``), args.py ``--beta_mapo 0.1``, ``--snr_value 0.5``; SDXL's DDPM
  scheduler has ``num_train_timesteps = 1000``.

Deliberate difference (MaPO): the reference evaluates ``s e / (exp(s e) - 1)`` in fp32, which loses about
``eps_fp32 / (s e)`` of relative precision to the cancellation in ``exp(s e) - 1`` (at realistic errors
``e ~ 0.05`` about 1e-4 of ``f``, i.e. ~0.02 in the logit after the factor 1000) and is NaN at ``e = 0``;
``kernels.preference_loss`` evaluates ``f`` without the cancellation.  The tests below therefore compare the
engine with the transcription run in float64 (``.float()`` replaced by ``.double()``: the same expression)
tightly, and with the faithful fp32 transcription within that transcription's own rounding bound.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kernels

BACKENDS = (
    ["reference", "triton"]
    if kernels._dispatch.KERNELS_INTERPRETED or torch.cuda.is_available()
    else ["reference"]
)


# ------------------------------------------------------------------------------------- the transcriptions
def salesforce_dpo_loss(model_pred, ref_pred, target, beta_dpo=5000.0):
    """DiffusionDPO train.py: first half of the batch preferred (y_w), second half unpreferred."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_losses = (ref_pred.detach() - target).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    loss = -1 * F.logsigmoid(inside_term).mean()
    return loss, implicit_acc


def flow_grpo_dpo_loss(model_pred, model_pred_ref, noise, model_input, bsz, beta=100.0):
    """flow_grpo scripts/train_sd3_dpo.py (flow target ``noise - model_input``)."""
    target = noise - model_input
    theta_mse = ((model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    ref_mse = (
        ((model_pred_ref.detach().float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    )
    model_w_err = theta_mse[:bsz]
    model_l_err = theta_mse[bsz:]
    ref_w_err = ref_mse[:bsz]
    ref_l_err = ref_mse[bsz:]
    w_diff = model_w_err - ref_w_err
    l_diff = model_l_err - ref_l_err
    w_l_diff = w_diff - l_diff
    inside_term = -0.5 * beta * w_l_diff
    loss = -F.logsigmoid(inside_term)
    return torch.mean(loss), model_w_err, model_l_err, ref_w_err, ref_l_err


def diffusers_dpo_loss(model_pred, ref_preds, target, beta_dpo=2500.0):
    """diffusers train_diffusion_dpo.py, ``loss_type == 'sigmoid'``."""
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_loss = F.mse_loss(ref_preds.detach().float(), target.float(), reduction="none")
        ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
        ref_losses_w, ref_losses_l = ref_loss.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    logits = ref_diff - model_diff
    return -1 * F.logsigmoid(beta_dpo * logits).mean()


def mapo_compute_loss(args, noise_scheduler, model_pred, target, cast=torch.Tensor.float):
    """mapo utils.py ``compute_loss``; ``cast`` is ``.float()`` there (``.double()`` for the float64 run)."""
    model_losses = F.mse_loss(cast(model_pred), cast(target), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    log_odds = (args.snr_value * model_losses_w) / (torch.exp(args.snr_value * model_losses_w) - 1) - (
        args.snr_value * model_losses_l
    ) / (torch.exp(args.snr_value * model_losses_l) - 1)
    ratio = F.logsigmoid(log_odds * noise_scheduler.config.num_train_timesteps)
    ratio_losses = args.beta_mapo * ratio
    loss = model_losses_w.mean() - ratio_losses.mean()
    return loss, model_losses_w, model_losses_l, ratio_losses


MAPO_ARGS = SimpleNamespace(snr_value=0.5, beta_mapo=0.1)
SDXL_SCHEDULER = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))


# ------------------------------------------------------------------------------------------------ tensors
def _batch(b=6, shape=(4, 16, 16), err=0.25, seed=0, drift=None):
    """A paired batch as the references lay it out: ``[2B, ...]``, winners first.  The reference model is off
    the target by ``err`` per element; the policy by ``err`` with a per-sample spread (MaPO), or, given
    ``drift``, is the reference model plus ``drift`` per element (DPO: a policy near its reference, so the
    logits are O(1) as in training)."""
    g = torch.Generator().manual_seed(seed)
    full = (2 * b, *shape)
    x0 = torch.randn(full, generator=g)
    noise = torch.randn((b, *shape), generator=g).repeat(2, 1, 1, 1)  # paired noise, as all of them do
    spread = torch.linspace(0.85, 1.2, 2 * b)[torch.randperm(2 * b, generator=g)].reshape(-1, 1, 1, 1)
    off_pred = err * spread * torch.randn(full, generator=g)
    off_ref = err * torch.randn(full, generator=g)
    if drift is not None:
        off_pred = off_ref + drift * torch.randn(full, generator=g)
    return x0, noise, off_pred, off_ref


def _api(pred, target, ref=None, backend="reference", **kw):
    b = pred.shape[0] // 2
    refs = {"ref_w": ref[:b], "ref_l": ref[b:]} if ref is not None else {}
    with kernels.use_backend(backend):
        return kernels.preference_loss(pred[:b], pred[b:], target[:b], target[b:], **refs, **kw)


def _dpo_atol(temp, *errs):
    """fp32 summation order moves each error by a few ``eps * err``; ``Delta`` adds four of them, the logit
    multiplies by ``temp`` and ``-logsigmoid`` is 1-Lipschitz."""
    eps = torch.finfo(torch.float32).eps
    return 16.0 * temp * eps * max(float(e.detach().abs().max()) for e in errs)


def _grad(loss, pred):
    (g,) = torch.autograd.grad(loss, pred)
    return g


@pytest.mark.parametrize("backend", BACKENDS)
def test_salesforce_diffusion_dpo(backend):
    x0, noise, off_pred, off_ref = _batch(drift=0.01)
    target = noise  # epsilon prediction
    pred = (target + off_pred).requires_grad_()
    ref_pred = target + off_ref
    loss_ref, acc_ref = salesforce_dpo_loss(pred, ref_pred, target)
    out = _api(pred, target, ref_pred, backend, form="dpo")  # defaults: Salesforce convention, beta 5000
    assert 0.05 < float(loss_ref.detach()) < 5.0  # not saturated: the comparison means something
    torch.testing.assert_close(out.loss, loss_ref, rtol=0, atol=_dpo_atol(2500.0, out.err_w, out.err_l))
    torch.testing.assert_close(_grad(out.loss, pred), _grad(loss_ref, pred), rtol=1e-3, atol=1e-9)
    delta = (out.err_w - out.err_w_ref) - (out.err_l - out.err_l_ref)
    assert float((delta < 0).float().mean()) == float(acc_ref)  # implicit reward accuracy from our errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_grpo_sd3_dpo(backend):
    x0, noise, off_pred, off_ref = _batch(err=0.5, seed=1, drift=0.2)
    target = noise - x0  # flow target: winner and loser differ through x0
    pred = (target + off_pred).requires_grad_()
    pred_ref = target + off_ref
    b = pred.shape[0] // 2
    loss_ref, w_err, l_err, w_ref, l_ref = flow_grpo_dpo_loss(pred, pred_ref, noise, x0, b)
    out = _api(pred, target, pred_ref, backend, form="dpo", beta=100.0)
    assert 0.05 < float(loss_ref.detach()) < 5.0
    torch.testing.assert_close(out.loss, loss_ref, rtol=0, atol=_dpo_atol(50.0, out.err_w, out.err_l))
    for ours, theirs in (
        (out.err_w, w_err),
        (out.err_l, l_err),
        (out.err_w_ref, w_ref),
        (out.err_l_ref, l_ref),
    ):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(_grad(out.loss, pred), _grad(loss_ref, pred), rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_diffusers_diffusion_dpo_and_the_convention(backend):
    """diffusers' ``-logsigmoid(beta' (ref_diff - model_diff))`` with beta' 2500 is our ``dpo_convention=
    "diffusers"`` with the same beta, and the Salesforce convention with twice the beta."""
    x0, noise, off_pred, off_ref = _batch(seed=2, drift=0.01)
    pred = (noise + off_pred).requires_grad_()
    ref_pred = noise + off_ref
    loss_ref = diffusers_dpo_loss(pred, ref_pred, noise)
    g_ref = _grad(loss_ref, pred)
    for kw in (
        {"dpo_convention": "diffusers"},
        {"dpo_convention": "diffusers", "beta": 2500.0},
        {"beta": 5000.0},
    ):
        out = _api(pred, noise, ref_pred, backend, form="dpo", **kw)
        torch.testing.assert_close(out.loss, loss_ref, rtol=0, atol=_dpo_atol(2500.0, out.err_w, out.err_l))
        torch.testing.assert_close(_grad(out.loss, pred), g_ref, rtol=1e-3, atol=1e-9)


def _rounding_bound(err_w, err_l, s=0.5, t=1000.0, beta=0.1):
    """Bound on the fp32 transcription's own error in the MaPO loss: ``f`` loses ~``eps / x`` (relative) to
    ``exp(x) - 1``; the logit multiplies it by ``T``, ``logsigmoid`` is 1-Lipschitz, the loss by ``beta``."""
    eps = torch.finfo(torch.float32).eps
    x_w, x_l = s * err_w.double(), s * err_l.double()
    return float(4.0 * beta * t * eps * (1.0 / x_w + 1.0 / x_l).mean())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("err", [0.2, 0.35, 1.6], ids=["err0.04", "err0.12", "err2.6"])
def test_mapo_compute_loss(backend, err):
    x0, noise, off_pred, _ = _batch(err=err, seed=3)
    target = noise  # SDXL epsilon prediction
    pred = (target + off_pred).requires_grad_()
    # the same expression in float64: the exact value the fp32 reference approximates
    loss64, w64, l64, _ = mapo_compute_loss(MAPO_ARGS, SDXL_SCHEDULER, pred, target, cast=torch.Tensor.double)
    loss32, w32, l32, _ = mapo_compute_loss(MAPO_ARGS, SDXL_SCHEDULER, pred, target)
    out = _api(pred, target, None, backend, form="mapo")
    torch.testing.assert_close(out.err_w, w32.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.err_l, l32.detach(), rtol=1e-6, atol=0)
    # ours is the exact expression to fp32 precision
    torch.testing.assert_close(out.loss.double(), loss64.detach(), rtol=2e-6, atol=1e-7)
    g64 = _grad(loss64, pred).float()
    torch.testing.assert_close(_grad(out.loss, pred), g64, rtol=1e-4, atol=1e-4 * float(g64.abs().max()))
    # the faithful fp32 transcription agrees within its own rounding (tight where s err >= 0.5)
    bound = _rounding_bound(w32.detach(), l32.detach())
    loss32, loss64, loss = float(loss32.detach()), float(loss64.detach()), float(out.loss.detach())
    assert abs(loss32 - loss64) <= bound
    assert abs(loss - loss32) <= bound + 1e-6
    if err > 1.0:
        assert abs(loss - loss32) <= 1e-5 * abs(loss32)


def test_mapo_reference_is_nan_at_zero_error_ours_is_not():
    """A prediction equal to its target: the reference's ``0 / (exp(0) - 1)`` is NaN, ``f(0) = 1`` here."""
    x0, noise, off_pred, _ = _batch(b=2, seed=4)
    pred = noise + off_pred
    pred[0] = noise[0]  # the first winner is exact
    loss32, *_ = mapo_compute_loss(MAPO_ARGS, SDXL_SCHEDULER, pred, noise)
    assert torch.isnan(loss32)
    leaf = pred.clone().requires_grad_()
    for backend in BACKENDS:
        out = _api(leaf, noise, None, backend, form="mapo")
        assert torch.isfinite(out.loss) and bool(torch.isfinite(_grad(out.loss, leaf)).all())
