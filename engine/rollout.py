"""Rollouts: the solver loop over a denoiser through the fused kernels (math.md §0-§1), CUDA graphs on CUDA.

``rollout(denoiser, cond, num_steps=..., latent_shape=..., solver=...)`` returns a :class:`RolloutBatch`.
Solvers: ``dpm2`` (DPM-Solver++ 2M, math.md §1; DiffusionNFT's default, math.md §2), ``euler``, ``flow-sde``
(Flow-GRPO, math.md §3), ``cps`` (coefficient-preserving SDE) for flow models and ``ddim`` (with ``eta``,
DDPO, math.md §4) for epsilon models.

Noise depends only on ``(seed of the sample, step)``: sample ``i``'s initial noise is
``kernels.randn(latent_shape, seed_i, offset=0)`` and the noise of step ``k`` uses ``offset=(k+1) * numel``,
so a sample's rollout does not depend on which other samples share its batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

import kernels
from models.conditioning import Conditioning

from .graphs import GraphCache
from .profiling import nvtx_range
from .schedules import ddim_alpha_bars, sd3_sigmas, timesteps_from_sigmas

__all__ = [
    "SOLVERS",
    "STOCHASTIC_SOLVERS",
    "RolloutBatch",
    "RolloutEngine",
    "default_engine",
    "rollout",
    "sample_seeds",
    "per_sample_randn",
]

SOLVERS = ("dpm2", "euler", "flow-sde", "cps", "ddim")
STOCHASTIC_SOLVERS = ("flow-sde", "cps", "ddim")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_M64 = (1 << 64) - 1


@dataclass
class RolloutBatch:
    """What a rollout returns.

    ``x0`` ``[B, C, H, W]`` clean samples (in ``dtype``); ``seeds`` int64 ``[B]`` (per-sample Philox keys);
    ``timesteps`` fp32 ``[N]``: the model's timestep input at each step (``1000 sigma`` for flow models,
    math.md §0; the integer DDPM timestep as float for ``ddim``); ``sigmas`` fp32 ``[N+1]`` (flow solvers,
    else
    None); ``alpha_bars`` fp32 ``[N+1]`` (``ddim``: ``alpha_bars[i]`` / ``alpha_bars[i+1]`` are step ``i``'s
    ``ab`` and ``ab_prev``, else None); ``sde_steps``: the steps that injected noise (log-prob 0 elsewhere);
    ``trajectory`` ``[B, N+1, C, H, W]`` states (``trajectory[:, 0]`` the initial noise, ``trajectory[:, -1]``
    equals ``x0``) and ``log_probs`` fp32 ``[B, N]`` when requested.
    """

    x0: torch.Tensor
    cond: Conditioning
    seeds: torch.Tensor
    solver: str
    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None
    alpha_bars: torch.Tensor | None = None
    noise_level: float | None = None
    eta: float | None = None
    sde_steps: tuple[int, ...] = ()
    trajectory: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x0.shape[0]


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def sample_seeds(seed, batch: int) -> list[int]:
    """Per-sample seeds: ``batch`` ints (a sequence or an int64 tensor) are used as given; an int ``s``
    gives ``splitmix64(splitmix64(s) + i) >> 1`` for sample ``i``, so different base seeds give unrelated
    streams."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.ndim != 1:
            raise ValueError(
                f"seed: expected an int or a 1-D integer tensor of {batch} seeds, got {seed.dtype} "
                f"shape {tuple(seed.shape)}"
            )
        seed = seed.tolist()
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        base = _splitmix64(int(seed) & _M64)
        return [_splitmix64((base + i) & _M64) >> 1 for i in range(batch)]
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        if len(seed) != batch:
            raise ValueError(f"seed: expected {batch} per-sample seeds (the batch of cond), got {len(seed)}")
        out = []
        for s in seed:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= int(s) < 2**63:
                raise ValueError(f"seed: expected ints in [0, 2^63), got {s!r}")
            out.append(int(s))
        return out
    raise ValueError(f"seed: expected an int or a sequence of {batch} ints, got {type(seed).__name__}")


def _reference_noise(device: torch.device) -> bool:
    active = getattr(kernels, "active_backend", None)
    if active is None:
        return device.type == "cpu"
    return active(torch.empty(0, device=device)) == "reference"


def per_sample_randn(shape, seeds: torch.Tensor, offset, *, dtype=torch.float32) -> torch.Tensor:
    """``[B, *shape]`` noise whose row ``b`` is ``kernels.randn(shape, seeds[b], offset)``, bit for bit.

    One Philox stream per sample keyed by its own seed, so a sample's noise does not depend on the batch.
    ``seeds`` is an int64 ``[B]`` tensor and ``offset`` an int or int64 0-dim tensor on its device.  Where
    ``kernels.randn`` runs the PyTorch reference, the ``B`` streams are generated in one vectorised pass
    of the same Philox rounds; on the Triton backend each row is one ``kernels.randn`` launch (captured
    into the step's CUDA graph).
    """
    shape = tuple(int(d) for d in shape)
    device = seeds.device
    if not _reference_noise(device):
        return torch.stack(
            [
                kernels.randn(shape, seeds[i], offset, device=device, dtype=dtype)
                for i in range(seeds.shape[0])
            ]
        )
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64, device=device) + torch.as_tensor(
        offset, dtype=torch.int64, device=device
    )
    c0, c1 = (idx & 0xFFFFFFFF)[None], ((idx >> 32) & 0xFFFFFFFF)[None]
    i1, i2, _, _ = kernels.reference._philox(seeds.to(torch.int64)[:, None], c0, c1)
    u1 = torch.clamp_min(kernels.reference._uint32_to_uniform(i1), 1.0e-7)
    u2 = kernels.reference._uint32_to_uniform(i2)
    out = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)
    return out.reshape(seeds.shape[0], *shape).to(dtype)


def _prediction_type(denoiser) -> str:
    p = getattr(denoiser, "prediction_type", "flow")
    if p not in ("flow", "epsilon"):
        raise ValueError(f"denoiser.prediction_type: expected 'flow' or 'epsilon', got {p!r}")
    return p


def _graph_key(denoiser):
    gk = getattr(denoiser, "graph_key", None)
    key = gk() if callable(gk) else getattr(denoiser, "active_adapter", None)
    if isinstance(key, list):
        key = tuple(key)
    try:
        hash(key)
    except TypeError:
        key = repr(key)
    return key


def _cond_inputs(prefix: str, cond: Conditioning) -> dict:
    return {
        f"{prefix}.{f.name}": getattr(cond, f.name) for f in fields(cond) if getattr(cond, f.name) is not None
    }


def _cond_from_inputs(prefix: str, cls, inputs: dict):
    return cls(**{f.name: inputs.get(f"{prefix}.{f.name}") for f in fields(cls)})


class _StepFn:
    """One denoiser forward (CFG-batched when enabled) plus one fused solver step, reading every per-step
    value from its ``inputs`` dict so the same function can be captured once and replayed at every step."""

    def __init__(
        self,
        denoiser,
        kind: str,
        *,
        cond_cls,
        use_cfg: bool,
        guidance_scale: float,
        noise_level: float,
        eta: float,
        latent_shape: tuple,
        noise_dtype,
        cps_log_prob: str = "reference",
    ):
        self.denoiser = denoiser
        self.kind = kind
        self.cond_cls = cond_cls
        self.use_cfg = use_cfg
        self.guidance_scale = guidance_scale
        self.noise_level = noise_level
        self.eta = eta
        self.latent_shape = latent_shape
        self.noise_dtype = noise_dtype
        self.cps_log_prob = cps_log_prob

    def _predict(self, x, timestep, inputs):
        cond = _cond_from_inputs("cond", self.cond_cls, inputs)
        if not self.use_cfg:
            return self.denoiser(x, timestep, cond).to(x.dtype)
        uncond = _cond_from_inputs("uncond", self.cond_cls, inputs)
        both = self.denoiser(
            torch.cat([x, x]), torch.cat([timestep, timestep]), Conditioning.cat([cond, uncond])
        )
        pred_c, pred_u = both.float().chunk(2)
        return (pred_u + self.guidance_scale * (pred_c - pred_u)).to(x.dtype)

    def _noise(self, seeds, offset):
        return per_sample_randn(self.latent_shape, seeds, offset, dtype=self.noise_dtype)

    def __call__(self, inputs: dict) -> dict:
        x, kind = inputs["x"], self.kind
        pred = self._predict(x, inputs["timestep"], inputs)
        if kind == "euler":
            return {"x": kernels.euler_step(x, pred, inputs["sigma"], inputs["sigma_next"])}
        if kind == "dpm2-first":
            x_next, x0_pred = kernels.dpm2_step(x, pred, inputs["sigma"], inputs["sigma_next"])
            return {"x": x_next, "x0_pred": x0_pred}
        if kind == "dpm2":
            x_next, x0_pred = kernels.dpm2_step(
                x,
                pred,
                inputs["sigma"],
                inputs["sigma_next"],
                x0_prev=inputs["x0_prev"],
                sigma_prev=inputs["sigma_prev"],
            )
            return {"x": x_next, "x0_pred": x0_pred}
        if kind == "ddim-ode":
            x_next, _, _, _ = kernels.ddim_step(
                x, pred, inputs["alpha_bar"], inputs["alpha_bar_prev"], eta=0.0, noise=torch.zeros_like(x)
            )
            return {"x": x_next}
        noise = self._noise(inputs["seeds"], inputs["offset"])
        if kind == "flow-sde":
            x_next, log_prob, _, _ = kernels.sde_step(
                x,
                pred,
                inputs["sigma"],
                inputs["sigma_next"],
                noise_level=self.noise_level,
                sigma_max=inputs.get("sigma_max"),
                noise=noise,
            )
        elif kind == "cps":
            x_next, log_prob, _, _ = kernels.cps_step(
                x,
                pred,
                inputs["sigma"],
                inputs["sigma_next"],
                noise_level=self.noise_level,
                noise=noise,
                log_prob_form=self.cps_log_prob,
            )
        elif kind == "ddim":
            x_next, log_prob, _, _ = kernels.ddim_step(
                x, pred, inputs["alpha_bar"], inputs["alpha_bar_prev"], eta=self.eta, noise=noise
            )
        else:  # pragma: no cover - kinds are fixed by _step_kinds
            raise AssertionError(kind)
        return {"x": x_next, "log_prob": log_prob}


def _check_sigmas(sigmas, num_steps: int) -> torch.Tensor:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or not sigmas.is_floating_point():
        got = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise ValueError(
            f"sigmas: expected a 1-D float tensor of num_steps + 1 = {num_steps + 1} sigmas, got {got}"
        )
    s = sigmas.detach().to("cpu", torch.float32)
    if s.shape[0] != num_steps + 1:
        raise ValueError(f"sigmas: expected num_steps + 1 = {num_steps + 1} entries, got {s.shape[0]}")
    if not (s[0] <= 1 and s[-1] == 0 and bool((s[1:] < s[:-1]).all())):
        raise ValueError(f"sigmas: expected strictly decreasing values from <= 1 down to 0, got {s.tolist()}")
    return s


def _check_window(sde_window, num_steps: int) -> tuple[int, int]:
    if sde_window is None:
        return 0, num_steps
    if (
        not isinstance(sde_window, Sequence)
        or len(sde_window) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in sde_window)
    ):
        raise ValueError(f"sde_window: expected a (start, end) pair of ints, got {sde_window!r}")
    start, end = int(sde_window[0]), int(sde_window[1])
    if not 0 <= start < end <= num_steps:
        raise ValueError(
            f"sde_window: expected 0 <= start < end <= num_steps={num_steps}, got ({start}, {end})"
        )
    return start, end


def _step_kinds(solver: str, num_steps: int, window: tuple[int, int], noisy: bool) -> list[str]:
    """Per-step kernels.  Outside the SDE window, or with zero noise (``noise_level == 0`` / ``eta == 0``),
    a stochastic solver takes its ODE step: Euler for flow-sde and cps (both reduce to it exactly, math.md
    §1),
    DDIM with eta 0 for ddim; no noise is drawn there and the log-prob is 0 (a point mass)."""
    if solver == "dpm2":
        return ["dpm2-first"] + ["dpm2"] * (num_steps - 1)
    if solver == "euler":
        return ["euler"] * num_steps
    ode = "ddim-ode" if solver == "ddim" else "euler"
    return [solver if noisy and window[0] <= i < window[1] else ode for i in range(num_steps)]


class RolloutEngine:
    """Runs rollouts and holds their CUDA-graph cache (:class:`engine.graphs.GraphCache`).

    ``cuda_graphs=None`` / ``max_graphs=None`` read ``NFT_CUDA_GRAPHS`` / ``NFT_MAX_GRAPHS``.
    CPU rollouts run eagerly through the same step functions.
    """

    def __init__(self, *, cuda_graphs: bool | None = None, max_graphs: int | None = None):
        self.graphs = GraphCache(enabled=cuda_graphs, max_graphs=max_graphs)

    def rollout(
        self,
        denoiser,
        cond: Conditioning,
        *,
        num_steps: int,
        latent_shape: Sequence[int],
        solver: str = "dpm2",
        shift: float | torch.Tensor = 3.0,
        sigmas: torch.Tensor | None = None,
        noise_level: float = 0.7,
        eta: float = 1.0,
        guidance_scale: float = 1.0,
        uncond: Conditioning | None = None,
        seed=0,
        dtype: torch.dtype = torch.float32,
        device=None,
        return_trajectory: bool = False,
        return_log_probs: bool = False,
        sde_window: tuple[int, int] | None = None,
        scheduler_config=None,
        cps_log_prob: str = "reference",
    ) -> RolloutBatch:
        """Sample ``len(cond)`` latents with ``solver`` in ``num_steps`` steps (see :func:`rollout`)."""
        # ---------------------------------------------------------------- validation (host only)
        if solver not in SOLVERS:
            raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
            raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")
        num_steps = int(num_steps)
        if not isinstance(cond, Conditioning):
            raise ValueError(f"cond: expected a models.conditioning.Conditioning, got {type(cond).__name__}")
        batch = len(cond)
        pred_type = _prediction_type(denoiser)
        if solver == "ddim" and pred_type != "epsilon":
            raise ValueError(
                f"solver: 'ddim' expects an epsilon denoiser (prediction_type 'epsilon'), "
                f"got prediction_type {pred_type!r}; use dpm2/euler/flow-sde/cps for flow models"
            )
        if solver != "ddim" and pred_type != "flow":
            raise ValueError(
                f"solver: {solver!r} expects a flow denoiser (prediction_type 'flow'), "
                f"got prediction_type {pred_type!r}; use 'ddim' for epsilon models"
            )
        if (
            not isinstance(latent_shape, Sequence)
            or len(latent_shape) != 3
            or not all(isinstance(d, numbers.Integral) and d >= 1 for d in latent_shape)
        ):
            raise ValueError(f"latent_shape: expected (C, H, W) positive ints, got {latent_shape!r}")
        latent_shape = tuple(int(d) for d in latent_shape)
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype: expected one of {_FLOAT_DTYPES}, got {dtype}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
            raise ValueError(f"guidance_scale: expected a float, got {type(guidance_scale).__name__}")
        use_cfg = float(guidance_scale) != 1.0
        if use_cfg:
            if uncond is None:
                raise ValueError(
                    f"uncond: expected a Conditioning because guidance_scale={guidance_scale} != 1, got None"
                )
            if not isinstance(uncond, type(cond)) or len(uncond) != batch:
                raise ValueError(
                    f"uncond: expected a {type(cond).__name__} of batch {batch} (that of cond), "
                    f"got {type(uncond).__name__} of batch {len(uncond)}"
                )
        for name, val in (("noise_level", noise_level), ("eta", eta)):
            if isinstance(val, bool) or not isinstance(val, numbers.Real) or not val >= 0:
                raise ValueError(f"{name}: expected a float >= 0, got {val!r}")
        if return_log_probs and solver not in STOCHASTIC_SOLVERS:
            raise ValueError(
                f"return_log_probs: expected a stochastic solver {STOCHASTIC_SOLVERS}, got {solver!r} "
                "(a deterministic step has no density)"
            )
        if sde_window is not None and solver not in STOCHASTIC_SOLVERS:
            raise ValueError(f"sde_window: expected a stochastic solver {STOCHASTIC_SOLVERS}, got {solver!r}")
        window = _check_window(sde_window, num_steps)
        if cps_log_prob not in kernels.CPS_LOG_PROB_FORMS:
            raise ValueError(f"cps_log_prob: expected 'reference' or 'gaussian', got {cps_log_prob!r}")
        seeds = sample_seeds(seed, batch)
        device = torch.device(device) if device is not None else cond.prompt_embeds.device

        # ---------------------------------------------------------------- schedule (host), then device rows
        if solver == "ddim":
            ts_int, alpha_bars = ddim_alpha_bars(num_steps, scheduler_config=scheduler_config)
            model_t = ts_int.to(torch.float32)
            sigmas_cpu = None
        else:
            if isinstance(shift, torch.Tensor):
                if sigmas is not None:
                    raise ValueError("shift: expected a float when sigmas is given, got a tensor as well")
                sigmas, shift = shift, 3.0
            if sigmas is None:
                sigmas_cpu = sd3_sigmas(num_steps, float(shift))
            else:
                sigmas_cpu = _check_sigmas(sigmas, num_steps)
            model_t = timesteps_from_sigmas(sigmas_cpu[:-1])
            alpha_bars = None
        kinds = _step_kinds(solver, num_steps, window, (eta if solver == "ddim" else noise_level) > 0)
        sde_steps = tuple(i for i, k in enumerate(kinds) if k in STOCHASTIC_SOLVERS)
        sigma_max = None
        if kinds[0] == "flow-sde" and sigmas_cpu[0] == 1.0:
            if not 0.0 < float(sigmas_cpu[1]) < 1.0:
                raise ValueError(
                    f"num_steps: flow-sde from sigma = 1 needs a second sigma in (0, 1) (sigma_max), "
                    f"got {float(sigmas_cpu[1])} with num_steps={num_steps}"
                )
            sigma_max = float(sigmas_cpu[1])

        def rows(v: torch.Tensor) -> torch.Tensor:
            """``[K]`` -> ``[K, B]`` fp32 on ``device``: row ``i`` is step ``i``'s per-sample value."""
            return v.to(device=device, dtype=torch.float32)[:, None].expand(v.shape[0], batch).contiguous()

        t_rows = rows(model_t)
        sigma_rows = rows(sigmas_cpu) if sigmas_cpu is not None else None
        ab_rows = rows(alpha_bars) if alpha_bars is not None else None
        seeds_dev = torch.tensor(seeds, dtype=torch.int64, device=device)
        numel = math.prod(latent_shape)
        offsets = torch.arange(1, num_steps + 1, dtype=torch.int64, device=device) * numel
        sigma_max_row = (
            torch.full((batch,), sigma_max, dtype=torch.float32, device=device) if sigma_max else None
        )

        cond = cond.to(device)
        static = _cond_inputs("cond", cond)
        if use_cfg:
            static.update(_cond_inputs("uncond", uncond.to(device)))
        graph_base = (
            id(denoiser),
            _graph_key(denoiser),
            type(cond),
            use_cfg,
            float(guidance_scale) if use_cfg else None,
            float(noise_level),
            float(eta),
            cps_log_prob,
        )
        step_fns = {}
        for kind in set(kinds):
            step_fns[kind] = _StepFn(
                denoiser,
                kind,
                cond_cls=type(cond),
                use_cfg=use_cfg,
                guidance_scale=float(guidance_scale),
                noise_level=float(noise_level),
                eta=float(eta),
                latent_shape=latent_shape,
                noise_dtype=dtype,
                cps_log_prob=cps_log_prob,
            )

        # ---------------------------------------------------------------- the loop (no host reads inside)
        with torch.no_grad(), nvtx_range(f"rollout/{solver}"):
            x = per_sample_randn(latent_shape, seeds_dev, 0).to(dtype)
            states = [x] if return_trajectory else None
            log_probs = [] if return_log_probs else None
            x0_prev = None
            for i, kind in enumerate(kinds):
                inputs = {"x": x, "timestep": t_rows[i], **static}
                if sigma_rows is not None:
                    inputs["sigma"], inputs["sigma_next"] = sigma_rows[i], sigma_rows[i + 1]
                if ab_rows is not None:
                    inputs["alpha_bar"], inputs["alpha_bar_prev"] = ab_rows[i], ab_rows[i + 1]
                if kind == "dpm2":
                    inputs["x0_prev"], inputs["sigma_prev"] = x0_prev, sigma_rows[i - 1]
                if kind in STOCHASTIC_SOLVERS:
                    inputs["seeds"], inputs["offset"] = seeds_dev, offsets[i]
                    if kind == "flow-sde" and sigma_max_row is not None:
                        inputs["sigma_max"] = sigma_max_row
                with nvtx_range(f"rollout/step {i}"):
                    out = self.graphs.run(graph_base + (kind,), step_fns[kind], inputs, owner=denoiser)
                x = out["x"]
                x0_prev = out.get("x0_pred")
                if states is not None:
                    states.append(x)
                if log_probs is not None:
                    lp = out.get("log_prob")
                    log_probs.append(
                        lp if lp is not None else torch.zeros(batch, dtype=torch.float32, device=device)
                    )

        return RolloutBatch(
            x0=x,
            cond=cond,
            seeds=seeds_dev,
            solver=solver,
            timesteps=model_t.to(device),
            sigmas=sigmas_cpu.to(device) if sigmas_cpu is not None else None,
            alpha_bars=alpha_bars.to(device) if alpha_bars is not None else None,
            noise_level=float(noise_level) if solver in ("flow-sde", "cps") else None,
            eta=float(eta) if solver == "ddim" else None,
            sde_steps=sde_steps,
            trajectory=torch.stack(states, dim=1) if states is not None else None,
            log_probs=torch.stack(log_probs, dim=1) if log_probs is not None else None,
        )


_DEFAULT_ENGINE: RolloutEngine | None = None


def default_engine() -> RolloutEngine:
    """The process-wide engine used by :func:`rollout` when none is passed (one shared graph cache)."""
    global _DEFAULT_ENGINE
    if _DEFAULT_ENGINE is None:
        _DEFAULT_ENGINE = RolloutEngine()
    return _DEFAULT_ENGINE


def rollout(
    denoiser,
    cond: Conditioning,
    *,
    num_steps: int,
    latent_shape: Sequence[int],
    solver: str = "dpm2",
    shift: float | torch.Tensor = 3.0,
    sigmas: torch.Tensor | None = None,
    noise_level: float = 0.7,
    eta: float = 1.0,
    guidance_scale: float = 1.0,
    uncond: Conditioning | None = None,
    seed=0,
    dtype: torch.dtype = torch.float32,
    device=None,
    return_trajectory: bool = False,
    return_log_probs: bool = False,
    sde_window: tuple[int, int] | None = None,
    scheduler_config=None,
    cps_log_prob: str = "reference",
    engine: RolloutEngine | None = None,
) -> RolloutBatch:
    """Sample ``len(cond)`` latents of ``latent_shape`` from ``denoiser`` (math.md §0-§1) -> a RolloutBatch.

    Flow solvers run on the given ``sigmas`` [N+1] (the model's own schedule, math.md §0:
    :func:`engine.schedules.scheduler_sigmas` from its diffusers scheduler config, as the training policy
    passes it; a tensor passed as ``shift`` is taken as ``sigmas``), else on SD3's ``sd3_sigmas(num_steps,
    shift)``, i.e. ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(N).sigmas``.
    The model's timestep input is ``1000 * sigma`` as a float (the references truncate it at rollout; we do
    not, so rollout and training see the same input).
    ``ddim`` uses the DDIM schedule diffusers' ``DDIMScheduler`` gives for the epsilon model's
    ``scheduler_config`` (None: SD1.5's; ``engine.schedules.ddim_alpha_bars``), whose last step goes to the
    scheduler's ``final_alpha_cumprod``.  ``cps_log_prob``: ``"reference"`` (flow_grpo's
    ``-mean_dims (x' - mean)^2``, the default) or ``"gaussian"`` (the Gaussian log-density) for the ``cps``
    log-probs (``kernels.cps_step``).
    ``noise_level`` is the SDE's ``a`` (flow-sde, cps; ref default 0.7), ``eta`` DDIM's.
    ``guidance_scale != 1`` runs CFG with ``uncond`` batched into the same forward; scale 1 skips the uncond
    pass.  ``seed`` is an int or one int per sample (:func:`sample_seeds`).  ``sde_window=(start, end)``
    injects noise only in steps ``start..end-1`` (Flow-GRPO-Fast), ODE steps elsewhere.  ``device`` defaults
    to ``cond``'s.
    """
    eng = engine if engine is not None else default_engine()
    return eng.rollout(
        denoiser,
        cond,
        num_steps=num_steps,
        latent_shape=latent_shape,
        solver=solver,
        shift=shift,
        sigmas=sigmas,
        noise_level=noise_level,
        eta=eta,
        guidance_scale=guidance_scale,
        uncond=uncond,
        seed=seed,
        dtype=dtype,
        device=device,
        return_trajectory=return_trajectory,
        return_log_probs=return_log_probs,
        sde_window=sde_window,
        scheduler_config=scheduler_config,
        cps_log_prob=cps_log_prob,
    )
