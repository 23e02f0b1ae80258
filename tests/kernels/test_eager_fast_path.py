"""The custom ops' eager fast path (``kernels/ops/_common.py``, ``CustomOp``).

An eager call on plain tensors runs the launcher without the ``torch.library`` dispatcher and gives the
dispatcher path's numbers bit for bit (same process, same launchers); calls that need the dispatcher (fake
tensors, ``torch.compile``) get it.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
from tests.kernels.common import backends, make

pytestmark = pytest.mark.skipif("triton" not in backends(), reason="needs triton (interpreted on CPU)")


def _ops():
    return importlib.import_module("kernels.ops")


def _common():
    return importlib.import_module("kernels.ops._common")


def _all_custom_ops():
    found = {}
    for name in ("dit", "elementwise", "gaussian", "nft", "preference", "random", "transition"):
        module = importlib.import_module(f"kernels.ops.{name}")
        for value in vars(module).values():
            if isinstance(value, _common().CustomOp):
                found[value.name] = value
    return found


def _cases():
    ops = _ops()
    dit = importlib.import_module("kernels.ops.dit")
    x, v, z = (make((3, 2, 5), torch.float32, seed=s) for s in (1, 2, 3))
    s, sn, smax = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.4, 0.1]), torch.full((3,), 0.95)
    t = torch.tensor([0.2, 0.5, 0.9])
    h = make((2, 7, 3, 8), torch.float32, seed=4)
    angles = make((7, 8), torch.float32, seed=5)
    mod = make((2, 8), torch.float32, seed=6)
    tok = make((2, 7, 8), torch.float32, seed=7)
    return [
        ("interpolate", ops.interpolate_op, (x, z, t), (0, 1)),
        ("euler_step", ops.euler_step_op, (x, v, s, sn), (0, 1)),
        ("dpm2_step", ops.dpm2_step_op, (x, v, s, sn, z, torch.tensor([1.0, 0.7, 0.4])), (0, 1, 4)),
        ("sde_sample", ops.transition_sample_op, (x, v, s, sn, smax, z, ops.KIND_SDE, 0.7), (0, 1)),
        (
            "cps_score",
            ops.transition_score_op,
            (x, v, s, sn, smax, z, ops.KIND_CPS, 0.8, ops.LOGP_SQUARED),
            (0, 1, 5),
        ),
        ("log_prob", ops.gaussian_log_prob_op, (x, v, t, True), (0, 1)),
        ("nft_loss", ops.nft_loss_op, (x, v, z, z, t, t, v, 0.7, 5.0, True, 0.1), (0,)),
        (
            "mapo_loss",
            ops.preference_loss_op,
            (x, v, z, x * 0.5, None, None, ops.FORM_MAPO, 0.0, 0.1, 0.5, 1000.0),
            (0, 1),
        ),
        ("rms_norm", dit.rms_norm_op, (h, angles[0], 1e-6, torch.float32), (0, 1)),
        ("ada_layer_norm", dit.ada_layer_norm_op, (tok, mod, mod * 0.5, 1e-6), (0, 1, 2)),
        ("gated_residual", dit.gated_residual_op, (tok, tok * 2, mod), (0, 1, 2)),
        ("rotary_emb", dit.rotary_emb_op, (h, angles.cos(), angles.sin(), 1), (0,)),
    ]


def _run(op, args, grad_at):
    args = tuple(
        a.detach().clone().requires_grad_(i in grad_at) if isinstance(a, torch.Tensor) else a
        for i, a in enumerate(args)
    )
    outs = op(*args)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    g = torch.Generator().manual_seed(11)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs if o.requires_grad)
    grads = torch.autograd.grad(loss, [args[i] for i in grad_at], allow_unused=True)
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("case", range(12))
def test_eager_path_equals_dispatcher_path_bit_for_bit(case, monkeypatch):
    name, op, args, grad_at = _cases()[case]
    with kernels.use_backend("triton"):
        fast = _run(op, args, grad_at)
        monkeypatch.setattr(_common(), "EAGER_FAST_PATH", False)
        slow = _run(op, args, grad_at)
    for a, b in zip(fast[0] + fast[1], slow[0] + slow[1], strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), f"{name}: eager path differs from the dispatcher path"


def test_eager_calls_never_reach_the_dispatcher(monkeypatch):
    """Forward and backward of every differentiable case, with each op's dispatcher entry made to raise."""

    def refuse(*_args):
        raise AssertionError("the eager call went through torch.library")

    for op in _all_custom_ops().values():
        monkeypatch.setattr(op, "op", refuse)
    with kernels.use_backend("triton"):
        for _name, op, args, grad_at in _cases():
            _run(op, args, grad_at)
            with torch.no_grad():
                op(*args)
        kernels.randn((2, 3), seed=torch.tensor(4), offset=0)


def test_every_registered_op_is_a_custom_op():
    ops = _all_custom_ops()
    assert len(ops) >= 20, sorted(ops)
    assert all(name.startswith("nft_kernels::") for name in ops)


def test_fake_tensors_go_through_the_dispatcher():
    """Under a ``TorchDispatchMode`` (fake tensors here) the raw launcher would try to run a kernel on tensors
    without storage; the op's fake kernel answers instead."""
    ops = _ops()
    with kernels.use_backend("triton"), FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(3, 2, 5))
        t = mode.from_tensor(torch.rand(3))
        out = ops.interpolate_op(x, x, t)
    assert out.shape == (3, 2, 5)
    assert type(out).__name__ == "FakeTensor"


def test_missing_trailing_arguments_take_the_op_defaults():
    ops = _ops()
    x, v, z = (make((2, 9), torch.float32, seed=s) for s in (1, 2, 3))
    s, sn, smax = torch.tensor([0.9, 0.6]), torch.tensor([0.8, 0.4]), torch.full((2,), 0.95)
    with kernels.use_backend("triton"):
        short = _run(ops.transition_sample_op, (x, v, s, sn, smax, z, ops.KIND_SDE, 0.7), (0, 1))
        full = _run(
            ops.transition_sample_op, (x, v, s, sn, smax, z, ops.KIND_SDE, 0.7, ops.LOGP_GAUSSIAN), (0, 1)
        )
    for a, b in zip(short[0] + short[1], full[0] + full[1], strict=True):
        assert torch.equal(a, b)
