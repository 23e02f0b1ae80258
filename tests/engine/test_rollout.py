"""Rollout contract: determinism, batch independence, CFG, shapes, exact log-prob re-scoring, input errors."""

import pytest
import torch

import kernels
from engine import RolloutEngine, per_sample_randn, rollout, sample_seeds, sd3_sigmas
from models.conditioning import Conditioning

from ._analytic import GaussianEpsDenoiser, GaussianFlowDenoiser, dummy_cond

SHAPE = (2, 4, 4)
MU = torch.linspace(-0.5, 0.5, 32).reshape(SHAPE)
FLOW_SOLVERS = ["dpm2", "euler", "flow-sde", "cps"]


class CondFlowDenoiser(GaussianFlowDenoiser):
    """Gaussian velocity shifted by the pooled embedding, so that CFG has something to amplify; records
    the batch sizes and timesteps it is called with."""

    def __init__(self):
        super().__init__(MU, 0.7)
        self.batches, self.timesteps = [], []

    def __call__(self, x, timestep, cond):
        self.batches.append(x.shape[0])
        self.timesteps.append(timestep.clone())
        shift = cond.pooled_embeds.mean(dim=1).reshape(-1, 1, 1, 1) + cond.prompt_embeds.mean(
            dim=(1, 2)
        ).reshape(-1, 1, 1, 1)
        return super().__call__(x, timestep, cond) + 0.3 * shift.to(x.dtype)


def _run(den, cond, solver, **kw):
    kw.setdefault("num_steps", 6)
    kw.setdefault("latent_shape", SHAPE)
    return rollout(den, cond, solver=solver, **kw)


def _den(solver):
    return GaussianEpsDenoiser(MU, 0.7) if solver == "ddim" else CondFlowDenoiser()


@pytest.mark.parametrize("solver", FLOW_SOLVERS + ["ddim"])
def test_deterministic_per_seed_and_seeds_differ(solver):
    cond = dummy_cond(3)
    a = _run(_den(solver), cond, solver, seed=[1, 2, 3])
    b = _run(_den(solver), cond, solver, seed=[1, 2, 3])
    c = _run(_den(solver), cond, solver, seed=[4, 5, 6])
    assert torch.equal(a.x0, b.x0)
    assert not torch.allclose(a.x0[0], c.x0[0], atol=1e-3)
    assert not torch.allclose(a.x0[0], a.x0[1], atol=1e-3)  # different seeds within a batch differ too


@pytest.mark.parametrize("solver", FLOW_SOLVERS + ["ddim"])
def test_a_sample_does_not_depend_on_its_batch(solver):
    cond = dummy_cond(4)
    seeds = [10, 2**40 + 3, 7, 123]
    kw = {"return_trajectory": True, "return_log_probs": solver in ("flow-sde", "cps", "ddim")}
    full = _run(_den(solver), cond, solver, seed=seeds, **kw)
    for i in (0, 2, 3):
        alone = _run(_den(solver), cond[i : i + 1], solver, seed=[seeds[i]], **kw)
        torch.testing.assert_close(alone.x0[0], full.x0[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(alone.trajectory[0], full.trajectory[i], rtol=0, atol=1e-6)
        if kw["return_log_probs"]:
            torch.testing.assert_close(alone.log_probs[0], full.log_probs[i], rtol=0, atol=1e-6)


def test_int_seed_expands_to_per_sample_seeds():
    cond = dummy_cond(3)
    seeds = sample_seeds(42, 3)
    assert len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)
    assert seeds != sample_seeds(43, 3)[:3] and sample_seeds(42, 5)[:3] == seeds
    a = _run(CondFlowDenoiser(), cond, "flow-sde", seed=42)
    b = _run(CondFlowDenoiser(), cond, "flow-sde", seed=seeds)
    assert torch.equal(a.x0, b.x0) and a.seeds.tolist() == seeds


def test_per_sample_randn_matches_kernels_randn():
    seeds = torch.tensor([0, 5, 2**62 + 7, 123456789012345], dtype=torch.int64)
    for offset in (0, 96, torch.tensor(2**33 + 5)):
        got = per_sample_randn((3, 5, 7), seeds, offset)
        want = torch.stack([kernels.randn((3, 5, 7), int(s), offset) for s in seeds])
        assert torch.equal(got, want)


def test_initial_noise_and_trajectory_layout():
    cond = dummy_cond(3)
    out = _run(
        CondFlowDenoiser(),
        cond,
        "flow-sde",
        num_steps=5,
        seed=[1, 2, 3],
        return_trajectory=True,
        return_log_probs=True,
    )
    assert out.trajectory.shape == (3, 6, *SHAPE) and out.log_probs.shape == (3, 5)
    assert out.log_probs.dtype == torch.float32 and out.x0.shape == (3, *SHAPE)
    assert torch.equal(out.trajectory[:, -1], out.x0)
    assert torch.equal(out.trajectory[:, 0], per_sample_randn(SHAPE, out.seeds, 0))
    assert torch.equal(out.sigmas, sd3_sigmas(5, 3.0)) and torch.equal(out.timesteps, out.sigmas[:-1] * 1000)
    assert out.sde_steps == (0, 1, 2, 3, 4) and out.noise_level == 0.7
    plain = _run(CondFlowDenoiser(), cond, "dpm2", num_steps=5, seed=[1, 2, 3])
    assert plain.trajectory is None and plain.log_probs is None


def test_model_sees_float_timesteps_1000_sigma():
    den = CondFlowDenoiser()
    _run(den, dummy_cond(2), "euler", num_steps=4, shift=3.0)
    sig = sd3_sigmas(4, 3.0)
    assert len(den.timesteps) == 4
    for i, t in enumerate(den.timesteps):
        assert t.dtype == torch.float32 and torch.equal(t, (sig[i] * 1000).expand(2))


def test_epsilon_model_sees_integer_ddpm_timesteps():
    seen = []

    class Recording(GaussianEpsDenoiser):
        def __call__(self, x, timestep, cond):
            seen.append(timestep.clone())
            return super().__call__(x, timestep, cond)

    out = _run(Recording(MU, 0.7), dummy_cond(2), "ddim", num_steps=4)
    assert [float(t[0]) for t in seen] == [751.0, 501.0, 251.0, 1.0]
    assert out.sigmas is None and out.alpha_bars.shape == (5,) and out.eta == 1.0


def test_custom_sigmas_and_tensor_shift():
    sig = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    a = _run(CondFlowDenoiser(), dummy_cond(2), "dpm2", num_steps=4, sigmas=sig)
    b = _run(CondFlowDenoiser(), dummy_cond(2), "dpm2", num_steps=4, shift=sig)
    c = _run(CondFlowDenoiser(), dummy_cond(2), "dpm2", num_steps=4)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.sigmas, sig) and not torch.equal(a.x0, c.x0)


@pytest.mark.parametrize("solver", FLOW_SOLVERS)
def test_cfg_scale_one_equals_no_cfg_and_skips_uncond(solver):
    cond, uncond = dummy_cond(3, seed=1), dummy_cond(3, seed=2)
    den_a, den_b = CondFlowDenoiser(), CondFlowDenoiser()
    a = _run(den_a, cond, solver, seed=9)
    b = _run(den_b, cond, solver, seed=9, guidance_scale=1.0, uncond=uncond)
    assert torch.equal(a.x0, b.x0)
    assert den_b.batches == [3] * 6  # no uncond pass


def test_cfg_is_batched_and_guides():
    cond, uncond = dummy_cond(3, seed=1), dummy_cond(3, seed=2)
    den = CondFlowDenoiser()
    g = 4.5
    out = _run(den, cond, "dpm2", seed=9, guidance_scale=g, uncond=uncond)
    assert den.batches == [6] * 6  # cond and uncond in one forward

    class Guided(CondFlowDenoiser):  # the same guidance done by hand inside the model
        def __call__(self, x, timestep, c):
            pc = super().__call__(x, timestep, c)
            pu = super().__call__(x, timestep, uncond)
            return (pu.float() + g * (pc.float() - pu.float())).to(x.dtype)

    ref = _run(Guided(), cond, "dpm2", seed=9)
    torch.testing.assert_close(out.x0, ref.x0, rtol=0, atol=1e-5)
    assert not torch.allclose(out.x0, _run(CondFlowDenoiser(), cond, "dpm2", seed=9).x0, atol=1e-3)


def _rescore(out, den, solver, rows):
    """Re-score the stored transitions of ``rows`` as training will: ``prev_sample=`` the next state."""
    traj = out.trajectory[rows]
    cond = out.cond[rows]
    lps = []
    for i in range(traj.shape[1] - 1):
        x = traj[:, i]
        pred = den(x, out.timesteps[i].expand(x.shape[0]), cond)
        if solver == "flow-sde":
            _, lp, _, _ = kernels.sde_step(
                x,
                pred,
                out.sigmas[i],
                out.sigmas[i + 1],
                noise_level=out.noise_level,
                sigma_max=out.sigmas[1],
                prev_sample=traj[:, i + 1],
            )
        elif solver == "cps":
            _, lp, _, _ = kernels.cps_step(
                x,
                pred,
                out.sigmas[i],
                out.sigmas[i + 1],
                noise_level=out.noise_level,
                prev_sample=traj[:, i + 1],
            )
        else:
            _, lp, _, _ = kernels.ddim_step(
                x, pred, out.alpha_bars[i], out.alpha_bars[i + 1], eta=out.eta, prev_sample=traj[:, i + 1]
            )
        lps.append(lp)
    return torch.stack(lps, dim=1)


@pytest.mark.parametrize(
    "solver,dtype",
    [
        ("flow-sde", torch.float32),
        ("flow-sde", torch.bfloat16),
        ("cps", torch.float32),
        ("ddim", torch.float32),
    ],
)
def test_stored_log_probs_rescore_exactly(solver, dtype):
    """math.md §3: before the first update logp_new == logp_old bit for bit, whatever the training batch."""
    den = _den(solver)
    cond = dummy_cond(5)
    out = _run(
        den,
        cond,
        solver,
        num_steps=8,
        seed=list(range(5)),
        dtype=dtype,
        return_trajectory=True,
        return_log_probs=True,
    )
    assert out.trajectory.dtype == dtype
    assert bool((out.log_probs[:, :-1] != 0).all())
    assert torch.equal(_rescore(out, den, solver, slice(None)), out.log_probs)
    assert torch.equal(_rescore(out, den, solver, [3, 1]), out.log_probs[[3, 1]])  # another batch composition


def test_sde_window_is_ode_outside():
    cond = dummy_cond(3)
    win = _run(
        CondFlowDenoiser(),
        cond,
        "flow-sde",
        num_steps=8,
        seed=5,
        sde_window=(2, 5),
        return_trajectory=True,
        return_log_probs=True,
    )
    ode = _run(CondFlowDenoiser(), cond, "euler", num_steps=8, seed=5, return_trajectory=True)
    assert win.sde_steps == (2, 3, 4)
    assert torch.equal(win.trajectory[:, :3], ode.trajectory[:, :3])  # Euler up to the window
    assert not torch.allclose(win.trajectory[:, 3], ode.trajectory[:, 3], atol=1e-3)
    assert bool((win.log_probs[:, 2:5] != 0).all())
    assert torch.equal(win.log_probs[:, [0, 1, 5, 6, 7]], torch.zeros(3, 5))
    # zero noise is the ODE exactly
    zero = _run(CondFlowDenoiser(), cond, "flow-sde", num_steps=8, seed=5, noise_level=0.0)
    torch.testing.assert_close(zero.x0, ode.x0, rtol=0, atol=0)


def test_bfloat16_rollout():
    out = _run(CondFlowDenoiser(), dummy_cond(2), "dpm2", dtype=torch.bfloat16)
    ref = _run(CondFlowDenoiser(), dummy_cond(2), "dpm2")
    assert out.x0.dtype == torch.bfloat16
    torch.testing.assert_close(out.x0.float(), ref.x0, rtol=0, atol=0.1)


def test_engine_object_runs_eagerly_on_cpu():
    eng = RolloutEngine(cuda_graphs=True, max_graphs=2)
    a = eng.rollout(CondFlowDenoiser(), dummy_cond(2), num_steps=4, latent_shape=SHAPE, seed=1)
    b = rollout(CondFlowDenoiser(), dummy_cond(2), num_steps=4, latent_shape=SHAPE, seed=1)
    assert torch.equal(a.x0, b.x0) and len(eng.graphs) == 0


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"solver": "heun"}, "solver"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 2.5}, "num_steps"),
        ({"guidance_scale": 3.0}, "uncond"),
        ({"guidance_scale": 3.0, "uncond": "UNCOND2"}, "uncond"),
        ({"seed": [1, 2]}, "seed"),
        ({"seed": "abc"}, "seed"),
        ({"solver": "ddim"}, "solver"),
        ({"return_log_probs": True, "solver": "dpm2"}, "return_log_probs"),
        ({"sde_window": (3, 2), "solver": "flow-sde"}, "sde_window"),
        ({"sde_window": (0, 2), "solver": "euler"}, "sde_window"),
        ({"sigmas": torch.tensor([1.0, 0.5, 0.0])}, "sigmas"),
        ({"sigmas": torch.tensor([1.0, 0.5, 0.6, 0.2, 0.0])}, "sigmas"),
        ({"latent_shape": (4, 4)}, "latent_shape"),
        ({"dtype": torch.float64}, "dtype"),
        ({"noise_level": -0.1, "solver": "flow-sde"}, "noise_level"),
        ({"num_steps": 1, "solver": "flow-sde"}, "num_steps"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(kwargs, name):
    cond = dummy_cond(3)
    if kwargs.get("uncond") == "UNCOND2":
        kwargs = {**kwargs, "uncond": dummy_cond(2)}
    kw = {"num_steps": 4, "latent_shape": SHAPE, **kwargs}
    with pytest.raises(ValueError, match=name):
        rollout(CondFlowDenoiser(), cond, **kw)


def test_flow_solver_rejects_epsilon_model():
    with pytest.raises(ValueError, match="solver.*flow"):
        rollout(GaussianEpsDenoiser(MU, 0.7), dummy_cond(2), num_steps=4, latent_shape=SHAPE, solver="euler")


def test_missing_prediction_type_means_flow():
    class Bare:
        def __call__(self, x, timestep, cond):
            return x * 0.5

    out = rollout(Bare(), dummy_cond(2), num_steps=3, latent_shape=SHAPE, solver="euler")
    assert out.x0.shape == (2, *SHAPE)
    with pytest.raises(ValueError, match="solver"):
        rollout(Bare(), dummy_cond(2), num_steps=3, latent_shape=SHAPE, solver="ddim")


def test_cond_must_be_conditioning():
    with pytest.raises(ValueError, match="cond"):
        rollout(CondFlowDenoiser(), torch.zeros(2, 3, 4), num_steps=3, latent_shape=SHAPE)
    assert isinstance(dummy_cond(1), Conditioning)


def test_rollout_through_triton_kernels():
    """The same rollout on the Triton kernels (CPU interpreter here, tiny shape) matches the reference."""
    if not hasattr(kernels, "use_backend"):
        pytest.skip("kernels.use_backend not available yet")
    pytest.importorskip("triton")
    cond = dummy_cond(2)
    kw = {
        "num_steps": 3,
        "latent_shape": (1, 2, 4),
        "seed": [3, 4],
        "return_trajectory": True,
        "return_log_probs": True,
    }
    den = CondFlowDenoiser()
    den.mu = torch.zeros(1, 2, 4)
    with kernels.use_backend("reference"):
        ref = rollout(den, cond, solver="flow-sde", **kw)
        ref2 = rollout(den, cond, solver="dpm2", num_steps=3, latent_shape=(1, 2, 4), seed=[3, 4])
    with kernels.use_backend("triton"):
        assert kernels.active_backend(torch.zeros(1)) == "triton"
        tri = rollout(den, cond, solver="flow-sde", **kw)
        tri2 = rollout(den, cond, solver="dpm2", num_steps=3, latent_shape=(1, 2, 4), seed=[3, 4])
    torch.testing.assert_close(tri.trajectory, ref.trajectory, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri.log_probs, ref.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri2.x0, ref2.x0, rtol=1e-5, atol=1e-5)


def test_one_step_flow_sde_without_noise_is_euler():
    den = CondFlowDenoiser()
    a = rollout(
        den, dummy_cond(2), num_steps=1, latent_shape=SHAPE, solver="flow-sde", noise_level=0.0, seed=1
    )
    b = rollout(den, dummy_cond(2), num_steps=1, latent_shape=SHAPE, solver="euler", seed=1)
    assert torch.equal(a.x0, b.x0) and a.sde_steps == ()
