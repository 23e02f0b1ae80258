"""Properties the engine relies on: batch-invariant reductions, rollout log-prob == training log-prob,
run-to-run determinism, refusal of unsupported gradients, and torch.compile / torch.library integration."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference as ref

from .common import DTYPES, backends, make

BACKENDS = backends()
SHAPE = (8, 3, 9, 11)


def _scalars(b):
    sigma = torch.linspace(0.95, 0.3, b)
    return sigma, sigma - 0.1


def _step(kind, x, v, rows, **kw):
    """Run a transition on a subset of rows; the per-sample scalars are sliced with the rows."""
    sigma, sigma_next = _scalars(SHAPE[0])
    if kind == "sde":
        return kernels.sde_step(x, v, sigma[rows], sigma_next[rows], noise_level=0.7, sigma_max=0.97, **kw)
    if kind == "cps":
        return kernels.cps_step(x, v, sigma[rows], sigma_next[rows], noise_level=0.7, **kw)
    ab = torch.linspace(0.1, 0.8, SHAPE[0])
    return kernels.ddim_step(x, v, ab[rows], (ab + 0.1)[rows], eta=1.0, **kw)


SPLITS = [slice(0, 3), slice(3, 8)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["sde", "cps", "ddim"])
def test_rollout_log_prob_equals_training_log_prob(backend, dtype, kind):
    """Sampled at rollout (batch 8, noise), scored at training (other splits, prev_sample): same bits."""
    x, v, z = make(SHAPE, dtype, seed=1), make(SHAPE, dtype, seed=2), make(SHAPE, dtype, seed=3)
    everything = slice(0, 8)
    with kernels.use_backend(backend):
        prev, log_prob, mean, std = _step(kind, x, v, everything, noise=z)
        assert prev.dtype == dtype and log_prob.dtype == torch.float32 and mean.dtype == torch.float32
        scored = [_step(kind, x[s], v[s], s, prev_sample=prev[s]) for s in SPLITS]
        whole = _step(kind, x, v, everything, prev_sample=prev)
    assert torch.equal(whole[1], log_prob)
    assert torch.equal(torch.cat([o[1] for o in scored]), log_prob)
    assert torch.equal(torch.cat([o[2] for o in scored]), mean)
    assert torch.equal(torch.cat([o[3] for o in scored]), std)
    assert torch.equal(whole[0], prev)
    # and the ratio a PPO step sees before its first update is exactly 1
    assert torch.equal(torch.exp(whole[1] - log_prob), torch.ones_like(log_prob))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sde", "ddim"])
def test_transition_rows_do_not_depend_on_the_batch(backend, kind):
    x, v, z = (
        make(SHAPE, torch.float32, seed=1),
        make(SHAPE, torch.float32, seed=2),
        make(SHAPE, torch.float32),
    )
    with kernels.use_backend(backend):
        full = _step(kind, x, v, slice(0, 8), noise=z)
        parts = [_step(kind, x[s], v[s], s, noise=z[s]) for s in SPLITS]
    for i in range(4):
        assert torch.equal(torch.cat([p[i] for p in parts]), full[i]), f"output {i}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [SHAPE, (8, 9000)], ids=str)
def test_reductions_do_not_depend_on_the_batch(backend, shape):
    x, m = make(shape, torch.float32, seed=1), make(shape, torch.float32, seed=2)
    std, std_q = torch.linspace(0.2, 2.0, 8), torch.linspace(1.5, 0.5, 8)
    with kernels.use_backend(backend):
        for reduce in ("mean", "sum"):
            lp = kernels.gaussian_log_prob(x, m, std, reduce)
            kl = kernels.gaussian_kl(x, std, m, std_q, reduce)
            lp_parts = torch.cat([kernels.gaussian_log_prob(x[s], m[s], std[s], reduce) for s in SPLITS])
            kl_parts = torch.cat([kernels.gaussian_kl(x[s], std[s], m[s], std_q[s], reduce) for s in SPLITS])
            assert torch.equal(lp_parts, lp), reduce
            assert torch.equal(kl_parts, kl), reduce


@pytest.mark.parametrize("backend", BACKENDS)
def test_nft_loss_is_deterministic_and_row_weights_batch_invariant(backend):
    v, v_old, x0, z = (make(SHAPE, torch.float32, seed=s) for s in (1, 2, 3, 4))
    t, r = torch.linspace(0.1, 0.9, 8), torch.linspace(0.0, 1.0, 8)
    with kernels.use_backend(backend):
        a = kernels.nft_loss(v, v_old, x0, z, t, r, beta=1.0)
        b = kernels.nft_loss(v, v_old, x0, z, t, r, beta=1.0)
        # a batch of one row at a time: the mean of the per-row losses (same rows) is the batch loss
        rows = torch.stack(
            [
                kernels.nft_loss(
                    v[i : i + 1],
                    v_old[i : i + 1],
                    x0[i : i + 1],
                    z[i : i + 1],
                    t[i : i + 1],
                    r[i : i + 1],
                    beta=1.0,
                )
                for i in range(8)
            ]
        )
    assert torch.equal(a, b)
    torch.testing.assert_close(rows.mean(), a, rtol=1e-6, atol=0)
    l_pos, l_neg = ref.nft_row_losses(v, v_old, x0, z, t, beta=1.0)
    torch.testing.assert_close(rows, 5.0 * (r * l_pos + (1 - r) * l_neg), rtol=2e-5, atol=1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
@pytest.mark.parametrize(
    "call,name",
    [
        (lambda x, s: kernels.euler_step(x, x, s, 0.1), "sigma"),
        (lambda x, s: kernels.interpolate(x, x, s), "t"),
        (lambda x, s: kernels.sde_step(x, x, s, 0.1, noise_level=0.7, noise=x), "sigma"),
        (lambda x, s: kernels.gaussian_log_prob(x, x, s), "std"),
        (lambda x, s: kernels.nft_loss(x, x, x, x, s, 0.5, beta=1.0), "t"),
    ],
)
def test_triton_refuses_gradients_it_does_not_compute(call, name):
    x = make((2, 3, 4), torch.float32)
    s = torch.full((2,), 0.5, requires_grad=True)
    with kernels.use_backend("triton"), pytest.raises(NotImplementedError, match=name):
        call(x, s)
    with kernels.use_backend("reference"):  # the reference differentiates through it
        out = call(x, s)
        out = out[1] if isinstance(out, tuple) else out
        (g,) = torch.autograd.grad(out.sum(), s)
    assert g.shape == s.shape
    with torch.no_grad(), kernels.use_backend("triton"):  # no grad requested: fine
        call(x, s)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake (meta) kernel and autograd registration agree with the real op."""
    from kernels import ops

    x, v, z = (make((3, 2, 5), torch.float32, seed=s).requires_grad_() for s in (1, 2, 3))
    s, sn, smax = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.4, 0.1]), torch.full((3,), 0.95)
    t = torch.tensor([0.2, 0.5, 0.9])
    cases = [
        (ops.interpolate_op, (x, z, t)),
        (ops.paired_interpolate_op, (x, v, z, t)),
        (ops.euler_step_op, (x, v, s, sn)),
        (ops.dpm2_step_op, (x, v, s, sn, z, torch.tensor([1.0, 0.7, 0.4]))),
        (ops.transition_sample_op, (x, v, s, sn, smax, z, ops.KIND_SDE, 0.7)),
        (ops.transition_score_op, (x, v, s, sn, smax, z.detach().requires_grad_(), ops.KIND_DDIM, 0.5)),
        (ops.transition_sample_op, (x, v, s, sn, smax, z, ops.KIND_CPS, 0.8, ops.LOGP_SQUARED)),
        (
            ops.transition_score_op,
            (x, v, s, sn, smax, z.detach().requires_grad_(), ops.KIND_CPS, 0.8, ops.LOGP_SQUARED),
        ),
        (ops.gaussian_log_prob_op, (x, v, t, True)),
        (ops.gaussian_kl_op, (x, t, v, t + 0.5, False)),
        (ops.nft_loss_op, (x, v.detach(), z.detach(), z.detach(), t, t, v.detach(), 0.7, 5.0, True, 0.1)),
        (ops.randn_op, ([3, 4], None, 7, torch.tensor(5), 0, torch.float32, torch.device("cpu"))),
    ]
    for op, args in cases:
        torch.library.opcheck(
            op.op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
        )


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_triton_ops_trace_under_torch_compile_fullgraph():
    """The custom ops (forward and hand-written backward) trace with fullgraph=True via their fake kernels."""
    x, v, z = (make((4, 3, 5), torch.float32, seed=s) for s in (1, 2, 3))

    def step(x, v, z, sigma, sigma_next):
        prev, log_prob, mean, std = kernels.sde_step(x, v, sigma, sigma_next, noise_level=0.7, noise=z)
        return kernels.euler_step(prev, v, sigma_next, sigma_next * 0.5), log_prob

    sigma, sigma_next = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.8, 0.5, 0.4, 0.1])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xg, vg = x.clone().requires_grad_(), v.clone().requires_grad_()
    with kernels.use_backend("triton"):
        out, lp = compiled(xg, vg, z, sigma, sigma_next)
        (out.sum() + lp.sum()).backward()
        xe, ve = x.clone().requires_grad_(), v.clone().requires_grad_()
        out_e, lp_e = step(xe, ve, z, sigma, sigma_next)
        (out_e.sum() + lp_e.sum()).backward()
    assert torch.equal(out, out_e) and torch.equal(lp, lp_e)
    torch.testing.assert_close(xg.grad, xe.grad)
    torch.testing.assert_close(vg.grad, ve.grad)


def test_reference_path_compiles_fullgraph():
    """The reference backend under torch.compile(fullgraph=True) with inductor on the CPU (value checks are
    skipped while tracing, so they do not break the graph)."""
    x, v = make((4, 3, 5), torch.float32, seed=1), make((4, 3, 5), torch.float32, seed=2)
    sigma, sigma_next = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.8, 0.5, 0.4, 0.1])

    def step(x, v, sigma, sigma_next):
        return kernels.euler_step(x, v, sigma, sigma_next)

    with kernels.use_backend("reference"):
        try:
            compiled = torch.compile(step, fullgraph=True)
            got = compiled(x, v, sigma, sigma_next)
        except Exception as e:  # no working C++ toolchain for inductor's CPU backend
            if "C++ compile" in str(e) or "CppCompileError" in type(e).__name__:
                pytest.skip(f"inductor CPU backend unavailable: {e}")
            raise
        assert torch.equal(got, step(x, v, sigma, sigma_next))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_rows_spread_over_two_grid_axes(monkeypatch):
    """More rows than CUDA's 65535 programs on grid axis 1 go on axis 2.  With the cap lowered to 2, five rows
    make a 2 x 3 row grid with one program past the last row: same results, nothing written out of place."""
    from kernels.ops import _common

    shape = (5, 3, 7, 9)
    x, v, z = (make(shape, torch.float32, seed=s) for s in (1, 2, 3))
    sigma = torch.linspace(0.9, 0.4, 5)

    def run():
        xg, vg = x.clone().requires_grad_(), v.clone().requires_grad_()
        with kernels.use_backend("triton"):
            prev, lp, mean, std = kernels.sde_step(xg, vg, sigma, sigma - 0.1, noise_level=0.7, noise=z)
            e = kernels.euler_step(xg, vg, sigma, sigma - 0.1)
            kl = kernels.gaussian_kl(xg, sigma, vg, 1.0)
            loss = kernels.nft_loss(vg, x, z, x, sigma, sigma, beta=1.0)
        grads = torch.autograd.grad(lp.sum() + prev.sum() + e.sum() + kl.sum() + loss, (xg, vg))
        return (prev, lp, mean, std, e, kl, loss) + grads

    expected = run()
    monkeypatch.setattr(_common, "MAX_GRID_1", 2)
    assert _common.elementwise_grid(5, 100) == (1, 2, 3)
    got = run()
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(g, e), f"output {i}"
