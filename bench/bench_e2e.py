"""End-to-end benchmark: one DiffusionNFT iteration (math.md §2) on SD3.5-M and FLUX shapes, three providers.

Providers, side by side in one run, on the same model instance and the same inputs:

* ``reference``      the baseline kept here: DiffusionNFT as the public reference code runs it -- a diffusers
  transformer, peft LoRA with ``default`` / ``old`` adapters, bf16 autocast over bf16 base weights and fp32
  LoRA weights, an eager Python DPM-Solver++(2M) loop (``kernels.reference.dpm2_step``: plain tensor ops),
  ``x_t`` and the loss written with plain tensor ops as in math.md §2 step 6, default (SDPA) attention, no
  fused kernels, no graphs;
* ``torch_compile``  the same baseline with the denoiser under ``torch.compile`` (compile time apart);
* ``engine``         this project: CUDA-graph rollouts (``engine.rollout``, solver ``dpm2``), the fused
  ``kernels.interpolate`` / ``kernels.nft_loss``, the ``auto`` attention backend
  (``models.attention.set_attention_backend``) and the DiT fast path (``models.patch.apply_fast_path``).

Models: random-weight presets fed by fixed random prompt embeddings (no text encoder): ``sd3.5-medium`` at
512 px (latents ``[B, 16, 64, 64]``, 333 text tokens) and ``flux-dev`` at 512 px (same latents, 512 text
tokens) with gradient checkpointing.  LoRA: math.md §2 step 8 (rank 32, alpha 64, attention projections).

Reported per (model, provider): rollout images/s (10-step dpm2, batch 16); training samples/s, one sample =
one sample-timestep = three forwards (``v_old``, ``v_ref``, ``v``) and one backward; seconds per iteration of
the reference recipe (48 prompts x 24 images, ``int(0.99 * 10)`` = 9 trained timesteps per image) scaled to
one GPU; peak memory per phase; FLOPs actually done (``torch.utils.flop_counter`` on a batch-1 run of the
same configuration: a frozen-base LoRA backward is about one forward's worth, checkpointing recomputes one
forward more) and model FLOPs utilisation against the bf16 matmul peak measured in the same run; a
torch.profiler breakdown (attention / matmul / other kernels / launch gaps).  NVTX ranges
``e2e/<provider>/{rollout,train}`` mark the phases for Nsight Systems.

Without a GPU the benchmark runs a quick mode (``sd3-tiny``, batch 2, 2 steps, fp32, providers
``reference`` and ``engine`` on the CPU reference kernels): it checks that everything runs and reports CPU
numbers, labelled as such, which say nothing about GPU speed.  Modes: ``NFT_BENCH_MODE=full|quick``;
``NFT_BENCH_PROVIDERS=reference,engine,torch_compile``; ``NFT_E2E_MODELS=sd3.5-medium,flux-dev``;
``NFT_E2E_TRAIN_BATCH`` (training micro-batch, default 8); ``--stream PATH`` appends each record to a
JSON-lines file as it is measured (``bench.gpu_check``).

Run: ``python -m bench.bench_e2e`` (prints the table; writes ``bench/results/e2e-<device>.json`` on a GPU or
with ``--write``), or under pytest (``python -m pytest bench/bench_e2e.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch

import kernels
import models
from bench import _common
from engine.profiling import nvtx_range
from engine.rollout import RolloutEngine
from engine.schedules import sd3_sigmas
from models import attention, lora
from models.patch import apply_fast_path, revert_fast_path

CUDA = _common.has_cuda()
MODE = os.environ.get("NFT_BENCH_MODE", "full" if CUDA else "quick")
DEVICE = torch.device("cuda" if CUDA else "cpu")
PROVIDERS_ALL = ("reference", "torch_compile", "engine")

# DiffusionNFT reference recipe (math.md §2): 48 prompts x 24 images per iteration, 10 dpm2 steps, 99% of them
RECIPE_IMAGES = 48 * 24
RECIPE_STEPS = 10
RECIPE_TRAIN_TIMESTEPS = int(0.99 * RECIPE_STEPS)
BETA, ADV_CLIP, KL_COEF = 1.0, 5.0, 1e-4


@dataclass
class E2ECase:
    preset: str
    latent: tuple  # [C, H, W]
    text_len: int
    text_dim: int
    pooled_dim: int
    rollout_batch: int
    train_batch: int
    num_steps: int
    checkpointing: bool = False
    dtype: torch.dtype = torch.bfloat16  # base weights / latents; LoRA weights stay fp32 (autocast)
    extra: dict = field(default_factory=dict)


def cases() -> list[E2ECase]:
    if MODE == "quick":
        return [
            E2ECase(
                "sd3-tiny",
                (4, 16, 16),
                7,
                32,
                32,
                rollout_batch=2,
                train_batch=2,
                num_steps=2,
                dtype=torch.float32,
            )
        ]
    wanted = os.environ.get("NFT_E2E_MODELS", "sd3.5-medium,flux-dev").split(",")
    table = {
        "sd3.5-medium": E2ECase(
            "sd3.5-medium",
            (16, 64, 64),
            333,
            4096,
            2048,
            rollout_batch=16,
            train_batch=8,
            num_steps=RECIPE_STEPS,
        ),
        "flux-dev": E2ECase(
            "flux-dev",
            (16, 64, 64),
            512,
            4096,
            768,
            rollout_batch=16,
            train_batch=8,
            num_steps=RECIPE_STEPS,
            checkpointing=True,
        ),
    }
    train_batch = os.environ.get("NFT_E2E_TRAIN_BATCH")
    if train_batch:
        if not train_batch.isdigit() or int(train_batch) < 1:
            raise ValueError(f"NFT_E2E_TRAIN_BATCH: expected a positive integer, got {train_batch!r}")
        for c in table.values():
            c.train_batch = int(train_batch)
    unknown = [w for w in wanted if w not in table]
    if unknown:
        raise ValueError(f"NFT_E2E_MODELS: expected names from {sorted(table)}, got {unknown}")
    return [table[w] for w in wanted]


def providers() -> list[str]:
    env = os.environ.get("NFT_BENCH_PROVIDERS")
    if env:
        chosen = [p.strip() for p in env.split(",") if p.strip() in PROVIDERS_ALL]
        if chosen:
            return chosen
    return list(PROVIDERS_ALL) if MODE == "full" else ["reference", "engine"]


# ----------------------------------------------------------------------------------------------------------
# Setup: model, LoRA, inputs
# ----------------------------------------------------------------------------------------------------------
def build_model(case: E2ECase):
    model = models.load_transformer(case.preset, seed=0, device=DEVICE)
    lora.add_adapters(model, rank=32 if MODE == "full" else 4, alpha=64 if MODE == "full" else 8)
    with torch.no_grad():  # non-zero B so the adapters do work (gaussian init leaves B = 0)
        for p in lora.adapter_parameters(model, "default"):
            p.normal_(0.0, 0.01)
        lora.copy_adapter(model, "default", "old")
    for n, p in model.named_parameters():  # base weights in the storage dtype, LoRA in fp32 (as the ref)
        if "lora_" not in n:
            p.data = p.data.to(case.dtype)
    if case.checkpointing:
        model.enable_gradient_checkpointing()
    return model


def make_inputs(case: E2ECase, batch: int, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=g, device=DEVICE).to(case.dtype)

    cond = models.Conditioning(rnd(batch, case.text_len, case.text_dim), rnd(batch, case.pooled_dim))
    x0 = rnd(batch, *case.latent)
    noise = rnd(batch, *case.latent)
    t = torch.rand(batch, generator=g, device=DEVICE) * 0.9 + 0.05
    r = torch.rand(batch, generator=g, device=DEVICE)
    return cond, x0, noise, t, r


def autocast(case: E2ECase):
    if case.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(DEVICE.type, dtype=case.dtype)


# ----------------------------------------------------------------------------------------------------------
# The baseline iteration (reference code, eager)
# ----------------------------------------------------------------------------------------------------------
def reference_rollout(den, model, case: E2ECase, cond, seed: int = 0):
    """The old policy samples ``x0`` with an eager DPM-Solver++(2M) loop (math.md §1), no CFG."""
    b = len(cond)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn((b, *case.latent), generator=g, device=DEVICE).to(case.dtype)
    sigmas = sd3_sigmas(case.num_steps, 3.0).to(DEVICE)
    x0_prev = sigma_prev = None
    with lora.use_adapter(model, "old"), torch.no_grad(), autocast(case):
        for i in range(case.num_steps):
            sigma, sigma_next = sigmas[i].expand(b), sigmas[i + 1].expand(b)
            v = den(x, 1000.0 * sigma, cond).to(x.dtype)
            x, x0_pred = kernels.reference.dpm2_step(x, v, sigma, sigma_next, x0_prev, sigma_prev)
            x0_prev, sigma_prev = x0_pred, sigma
    return x


def reference_train_step(den, model, case: E2ECase, cond, x0, noise, t, r):
    """math.md §2 steps 4-6 on one micro-batch, as the reference code writes them: 3 forwards, 1 backward."""
    tc = t.view(-1, 1, 1, 1)
    with autocast(case):
        x_t = (1.0 - tc) * x0 + tc * noise
        ts = 1000.0 * t
        with torch.no_grad():
            with lora.use_adapter(model, "old"):
                v_old = den(x_t, ts, cond)
            with lora.adapters_disabled(model):
                v_ref = den(x_t, ts, cond)
        with lora.use_adapter(model, "default"):
            v = den(x_t, ts, cond)
        v, v_old, v_ref, x0f = v.float(), v_old.float(), v_ref.float(), x0.float()
        x_tf = x_t.float()
        v_pos = BETA * v + (1.0 - BETA) * v_old
        v_neg = (1.0 + BETA) * v_old - BETA * v
        x0_pos = x_tf - tc * v_pos
        x0_neg = x_tf - tc * v_neg
        dims = tuple(range(1, x0.ndim))
        w_pos = (x0_pos - x0f).abs().mean(dim=dims, keepdim=True).detach().clamp(min=1e-5)
        w_neg = (x0_neg - x0f).abs().mean(dim=dims, keepdim=True).detach().clamp(min=1e-5)
        l_pos = ((x0_pos - x0f) ** 2 / w_pos).mean(dim=dims)
        l_neg = ((x0_neg - x0f) ** 2 / w_neg).mean(dim=dims)
        loss = (ADV_CLIP * (r * l_pos + (1.0 - r) * l_neg) / BETA).mean()
        loss = loss + KL_COEF * ((v - v_ref) ** 2).mean()
    loss.backward()
    return loss.detach()


# ----------------------------------------------------------------------------------------------------------
# The engine's iteration
# ----------------------------------------------------------------------------------------------------------
def engine_rollout(den, model, case: E2ECase, cond, rollout_engine: RolloutEngine, seed: int = 0):
    with lora.use_adapter(model, "old"), torch.no_grad(), autocast(case):
        return rollout_engine.rollout(
            den,
            cond,
            num_steps=case.num_steps,
            latent_shape=case.latent,
            solver="dpm2",
            shift=3.0,
            seed=seed,
            dtype=case.dtype,
        ).x0


def engine_train_step(den, model, case: E2ECase, cond, x0, noise, t, r):
    with autocast(case):
        x_t = kernels.interpolate(x0, noise, t)
        ts = 1000.0 * t
        with torch.no_grad():
            with lora.use_adapter(model, "old"):
                v_old = den(x_t, ts, cond)
            with lora.adapters_disabled(model):
                v_ref = den(x_t, ts, cond)
        with lora.use_adapter(model, "default"):
            v = den(x_t, ts, cond)
    loss = kernels.nft_loss(
        v, v_old, x0, noise, t, r, beta=BETA, adv_clip_max=ADV_CLIP, v_ref=v_ref, kl_coef=KL_COEF
    )
    loss.backward()
    return loss.detach()


# ----------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------
def _timed(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        _common.sync()
        t0 = time.perf_counter()
        fn()
        _common.sync()
        times.append(time.perf_counter() - t0)
    return times


def _peak_reset():
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None


def matmul_peak_tflops() -> dict:
    """Dense matmul throughput measured now: bf16 8192^3 on CUDA; fp32 1024^3 on CPU (labelled)."""
    n, dtype = (8192, torch.bfloat16) if CUDA else (1024, torch.float32)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    for _ in range(3):
        a @ b
    times = _timed(lambda: [a @ b for _ in range(10 if CUDA else 2)], 5)
    per = statistics.median(times) / (10 if CUDA else 2)
    return {
        "tflops": round(2 * n**3 / per / 1e12, 3),
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
        "device": _common.device_name(),
    }


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


_ATTENTION = re.compile(r"flash|fmha|attention|attn|sdpa|softmax", re.I)
_MATMUL = re.compile(r"gemm|matmul|\bmm\b|addmm|bmm|cutlass|cublas|xmma|nvjet|linear|aten::mm", re.I)


def profile_breakdown(fn) -> dict:
    """One call of ``fn`` under torch.profiler -> ms in attention / matmul / other kernels and launch gaps.

    CUDA: device kernels by name; gaps = the call's wall time minus the union of kernel busy time.
    CPU: aten ops by self CPU time (matmul: mm/addmm/bmm/linear; attention: SDPA); gaps = wall time not
    spent in any op's self time (Python and dispatch overhead).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    _common.sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        _common.sync()
        wall_ms = (time.perf_counter() - t0) * 1e3
    buckets = {"attention_ms": 0.0, "matmul_ms": 0.0, "other_kernels_ms": 0.0}
    intervals = []
    for ev in prof.events():
        if CUDA:
            if ev.device_type.name != "CUDA" or ev.device_time <= 0:
                continue
            dur, name = ev.device_time / 1e3, ev.name
            intervals.append((ev.time_range.start, ev.time_range.end))
        else:
            if not ev.name.startswith("aten::") or ev.self_cpu_time_total <= 0:
                continue
            dur, name = ev.self_cpu_time_total / 1e3, ev.name
        key = (
            "attention_ms"
            if _ATTENTION.search(name)
            else "matmul_ms"
            if _MATMUL.search(name)
            else ("other_kernels_ms")
        )
        buckets[key] += dur
    if CUDA:
        busy, end = 0.0, None
        for s, e in sorted(intervals):
            if end is None or s >= end:
                busy += e - s
                end = e
            elif e > end:
                busy += e - end
                end = e
        busy_ms = busy / 1e3
    else:
        busy_ms = sum(buckets.values())
    out = {k: round(v, 3) for k, v in buckets.items()}
    out["wall_ms"] = round(wall_ms, 3)
    out["launch_gaps_ms"] = round(max(wall_ms - busy_ms, 0.0), 3)
    out["basis"] = "CUDA kernel time" if CUDA else "CPU self time of aten ops (CPU, not GPU)"
    return out


# ----------------------------------------------------------------------------------------------------------
# One provider on one case
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    case: E2ECase
    model: torch.nn.Module
    den: torch.nn.Module
    rollout_cond: models.Conditioning
    train_inputs: tuple
    flops_rollout_image: int  # one image, all steps
    flops_train_sample: int  # one sample-timestep: 3 forwards + 1 backward (+ recompute)


def make_setup(case: E2ECase) -> Setup:
    model = build_model(case)
    den = models.as_denoiser(model)
    rollout_cond = make_inputs(case, case.rollout_batch, seed=1)[0]
    train_inputs = make_inputs(case, case.train_batch, seed=2)
    # FLOPs actually done by the baseline configuration at batch 1 (linear in the batch); the engine does the
    # same matmuls and attention (the fused ops replace element-wise work only)
    one_cond = make_inputs(case, 1, seed=3)
    fwd = count_flops(lambda: reference_rollout(den, model, case, one_cond[0]))
    model.zero_grad(set_to_none=True)
    train = count_flops(lambda: reference_train_step(den, model, case, *one_cond))
    model.zero_grad(set_to_none=True)
    return Setup(case, model, den, rollout_cond, train_inputs, fwd, train)


@contextlib.contextmanager
def provider_context(setup: Setup, provider: str):
    """``(denoiser, attention backend)`` configured for ``provider``; the engine's fast path and attention
    backend are undone on exit.  On CPU every provider runs the kernels' PyTorch references (the Triton
    interpreter is for tests, not for timings)."""
    model = setup.model
    cpu_ref = kernels.use_backend("reference") if not CUDA else contextlib.nullcontext()
    if provider != "engine":
        with cpu_ref:
            yield (setup.den if provider == "reference" else torch.compile(setup.den)), "native (SDPA)"
        return
    backend = attention.set_attention_backend(model, "auto")
    apply_fast_path(model)
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    if CUDA:
        attention.disable_cudnn_sdpa()  # as train.policy.build_policy does
    try:
        with cpu_ref:
            yield setup.den, backend
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
        revert_fast_path(model)
        attention.set_attention_backend(model, "sdpa")


def run_provider(setup: Setup, provider: str, *, rounds: int, peak: dict) -> dict:
    case = setup.case
    model = setup.model
    record = {
        "model": case.preset,
        "provider": provider,
        "mode": MODE,
        "device": _common.device_name(),
        "rollout_batch": case.rollout_batch,
        "train_batch": case.train_batch,
        "num_steps": case.num_steps,
        "latent": list(case.latent),
        "dtype": str(case.dtype).replace("torch.", ""),
        "gradient_checkpointing": case.checkpointing,
    }
    with provider_context(setup, provider) as (den, attention_backend):
        record["attention_backend"] = attention_backend
        if provider == "engine":
            record["kernel_backend"] = kernels.active_backend(setup.train_inputs[1])
            eng = RolloutEngine()

            def rollout():
                return engine_rollout(den, model, case, setup.rollout_cond, eng)

            def train():
                return engine_train_step(den, model, case, *setup.train_inputs)
        else:
            record["kernel_backend"] = "none (plain PyTorch)"

            def rollout():
                return reference_rollout(den, model, case, setup.rollout_cond)

            def train():
                return reference_train_step(den, model, case, *setup.train_inputs)

        # warm-up: compile / graph capture / autotune, timed apart
        t0 = time.perf_counter()
        with nvtx_range(f"e2e/{provider}/warmup"):
            rollout()
            train()
            model.zero_grad(set_to_none=True)
        _common.sync()
        record["warmup_s"] = round(time.perf_counter() - t0, 3)

        _peak_reset()
        with nvtx_range(f"e2e/{provider}/rollout"):
            t_roll = _timed(rollout, rounds)
        record["rollout_peak_gib"] = _peak_gib()
        _peak_reset()
        with nvtx_range(f"e2e/{provider}/train"):
            t_train = _timed(lambda: (train(), model.zero_grad(set_to_none=True)), rounds)
        record["train_peak_gib"] = _peak_gib()
        record["profile_train_step"] = profile_breakdown(train)
        model.zero_grad(set_to_none=True)
        record["profile_rollout"] = profile_breakdown(rollout)

    med_roll, med_train = statistics.median(t_roll), statistics.median(t_train)
    record["rollout_s"] = {
        "median": round(med_roll, 4),
        "min": round(min(t_roll), 4),
        "max": round(max(t_roll), 4),
    }
    record["train_step_s"] = {
        "median": round(med_train, 4),
        "min": round(min(t_train), 4),
        "max": round(max(t_train), 4),
    }
    record["rollout_images_per_s"] = round(case.rollout_batch / med_roll, 3)
    record["train_samples_per_s"] = round(case.train_batch / med_train, 3)
    record["recipe_iteration_s"] = round(
        RECIPE_IMAGES * (RECIPE_STEPS / case.num_steps) / record["rollout_images_per_s"]
        + RECIPE_IMAGES * RECIPE_TRAIN_TIMESTEPS / record["train_samples_per_s"],
        2,
    )
    flops_roll = setup.flops_rollout_image * case.rollout_batch
    flops_train = setup.flops_train_sample * case.train_batch
    record["flops_done_rollout"] = flops_roll
    record["flops_done_train_step"] = flops_train
    peak_tflops = peak["tflops"]
    record["mfu_rollout_pct"] = round(100 * flops_roll / med_roll / 1e12 / peak_tflops, 2)
    record["mfu_train_pct"] = round(100 * flops_train / med_train / 1e12 / peak_tflops, 2)
    return record


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------
def results_path():
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", _common.device_name()).strip("-").lower()
    return _common.RESULTS_DIR / f"e2e-{slug}.json"


def summary(records: list[dict], peak: dict) -> str:
    label = "" if CUDA else "  [CPU quick mode: CPU numbers, not GPU numbers]"
    head = (
        f"{'model':<14}{'provider':<15}{'roll img/s':>11}{'train smp/s':>12}{'recipe s/it':>12}"
        f"{'MFU roll%':>10}{'MFU trn%':>9}{'peak GiB':>9}{'speedup':>8}"
    )
    lines = [
        f"matmul peak: {peak['tflops']} TFLOP/s ({peak['dtype']}, {peak['device']}){label}",
        head,
        "-" * len(head),
    ]
    base = {r["model"]: r["recipe_iteration_s"] for r in records if r["provider"] == "reference"}
    for r in records:
        peak_mem = max(
            (v for v in (r["rollout_peak_gib"], r["train_peak_gib"]) if v is not None), default=None
        )
        speed, it_s = base.get(r["model"]), r["recipe_iteration_s"]
        lines.append(
            f"{r['model']:<14}{r['provider']:<15}{r['rollout_images_per_s']:>11.3f}{r['train_samples_per_s']:>12.3f}"
            f"{r['recipe_iteration_s']:>12.1f}{r['mfu_rollout_pct']:>10.2f}{r['mfu_train_pct']:>9.2f}"
            f"{'-' if peak_mem is None else f'{peak_mem:.1f}':>9}"
            f"{'-' if not speed else f'{speed / it_s:.2f}':>8}"
        )
    return "\n".join(lines)


def write(records: list[dict], peak: dict, path=None):
    path = path or results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": _common.environment(),
        "mode": MODE,
        "matmul_peak": peak,
        "recipe": {"images": RECIPE_IMAGES, "steps": RECIPE_STEPS, "train_timesteps": RECIPE_TRAIN_TIMESTEPS},
        "cases": [
            {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in asdict(c).items()} for c in cases()
        ],
        "results": records,
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def run_all(rounds: int | None = None) -> tuple[list[dict], dict]:
    rounds = rounds or (5 if MODE == "full" else 1)
    peak = matmul_peak_tflops()
    _common.stream_record("matmul_peak", peak)
    records = []
    for case in cases():
        setup = make_setup(case)
        for provider in providers():
            records.append(run_provider(setup, provider, rounds=rounds, peak=peak))
            _common.stream_record("e2e", records[-1])
        del setup
        if CUDA:
            torch.cuda.empty_cache()
    return records, peak


def test_engine_iteration_computes_the_reference_iteration():
    """The engine's training step is the baseline's math: same loss and LoRA gradients (fp32, tiny model)."""
    case = E2ECase("sd3-tiny", (4, 16, 16), 7, 32, 32, rollout_batch=2, train_batch=2, num_steps=2,
                   dtype=torch.float32)
    if CUDA:
        pytest.skip("checked in the CPU quick configuration (fp32)")
    model = build_model(case)
    den = models.as_denoiser(model)
    inputs = make_inputs(case, 2, seed=5)
    params = lora.adapter_parameters(model, "default")
    with kernels.use_backend("reference"):
        want = reference_train_step(den, model, case, *inputs)
        want_grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        setup = Setup(case, model, den, inputs[0], inputs, 0, 0)
        with provider_context(setup, "engine") as (fast_den, _):
            got = engine_train_step(fast_den, model, case, *inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for p, w in zip(params, want_grads, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-7)
    assert any(float(w.abs().max()) > 0 for w in want_grads)


# ----------------------------------------------------------------------------------------------------------
# pytest(-benchmark) entry: one test per (model, provider); the table is printed once at module teardown
# ----------------------------------------------------------------------------------------------------------
_RECORDS: list[dict] = []
_SETUPS: dict[str, Setup] = {}
_PEAK: dict = {}


@pytest.fixture(scope="module")
def e2e_session():
    _PEAK.update(matmul_peak_tflops())
    yield
    if _RECORDS:
        print("\n" + summary(_RECORDS, _PEAK))
        if CUDA or os.environ.get("NFT_BENCH_WRITE") == "1":
            print(f"results written to {write(_RECORDS, _PEAK)}")
    _SETUPS.clear()
    _RECORDS.clear()


@pytest.mark.parametrize("provider", providers())
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.preset)
def test_e2e(benchmark, e2e_session, case, provider):
    if case.preset not in _SETUPS:
        _SETUPS.clear()
        _SETUPS[case.preset] = make_setup(case)
    setup = _SETUPS[case.preset]
    record = run_provider(setup, provider, rounds=5 if MODE == "full" else 1, peak=_PEAK)
    _RECORDS.append(record)
    benchmark.extra_info.update({k: v for k, v in record.items() if not isinstance(v, dict)})
    # pytest-benchmark's own timing: one training micro-step of this provider
    with provider_context(setup, provider) as (den, _):
        step = engine_train_step if provider == "engine" else reference_train_step
        benchmark.pedantic(
            lambda: (
                step(den, setup.model, case, *setup.train_inputs),
                setup.model.zero_grad(set_to_none=True),
            ),
            rounds=1 if MODE == "quick" else 3,
            iterations=1,
            warmup_rounds=1 if provider == "torch_compile" else 0,
        )
    assert record["rollout_images_per_s"] > 0 and record["train_samples_per_s"] > 0
    # a sample-timestep is three forwards and a backward: more FLOPs than three forwards of the same image
    assert setup.flops_train_sample > 3 * setup.flops_rollout_image / case.num_steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="write the results file even without a GPU")
    parser.add_argument("--out", default=None, help="results file (default bench/results/e2e-<device>.json)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per phase")
    parser.add_argument(
        "--stream", default=None, help="append each record to this JSON-lines file as it is measured"
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds: expected a positive integer, got {args.rounds}")
    if args.stream:
        os.environ["NFT_BENCH_STREAM"] = args.stream
    records, peak = run_all(args.rounds)
    print(summary(records, peak))
    if CUDA or args.write or args.out:
        print(f"results written to {write(records, peak, Path(args.out) if args.out else None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
