"""Kernel benchmarks (pytest-benchmark): eager PyTorch reference vs torch.compile of it vs the Triton kernels.

Providers, side by side in one run (CONVENTIONS.md, Benchmarks):

* ``torch``          the eager reference (``kernels.reference``), the baseline for speedups;
* ``torch_compile``  ``torch.compile`` of the same reference (compile time reported apart, ``compile_s``);
* ``triton``         the fused kernels through the public API (``kernels.<op>``, validation included);
* ``triton_graph``   the same call replayed from a captured CUDA graph (forward only): kernel time without the
  Python / launch overhead that dominates at these sizes.

Shapes: SD3.5-M 512 px latents ``[16, 16, 64, 64]`` and FLUX 1024 px latents ``[4, 16, 128, 128]``, in bf16
and fp32, forward and forward+backward where the op has a backward.  Each record carries (``extra_info`` and
``bench/results/<device>.json``): median ms per call with its spread, GB/s achieved from the *minimal* bytes
the op must move (see ``Case.bytes_fwd`` / ``bytes_bwd``), the % of the device-to-device copy bandwidth
measured at the start of the same run, the speedup over ``torch`` and peak memory.

Without a GPU the suite runs in a quick mode (one small shape, fp32, the reference providers, a few rounds)
so that ``python -m pytest`` over ``bench/`` stays fast and never fails for lack of a GPU.  Modes:
``NFT_BENCH_MODE=full|quick`` (default: full with CUDA, quick without); ``NFT_BENCH_PROVIDERS=torch,triton``
picks providers; ``NFT_BENCH_SHAPES``, ``NFT_BENCH_DTYPES`` and ``NFT_BENCH_ROUNDS`` narrow a run to a time
budget (``bench.gpu_check``); ``NFT_BENCH_STREAM=path`` appends each record to a JSON-lines file as it is
measured.

Full GPU comparison and results file:  ``python -m bench.bench_kernels``  (see ``main``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import kernels
from bench import _common
from kernels import reference as ref

CUDA = _common.has_cuda()
MODE = os.environ.get("NFT_BENCH_MODE", "full" if CUDA else "quick")
DEVICE = "cuda" if CUDA else "cpu"

if MODE == "full":
    SHAPES = {"sd35m_512": (16, 16, 64, 64), "flux_1024": (4, 16, 128, 128)}
    DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
    ROUNDS, WARMUP, ITERATIONS = 50, 5, 10
else:
    SHAPES = {"quick": (2, 4, 16, 16)}
    DTYPES = {"fp32": torch.float32}
    ROUNDS, WARMUP, ITERATIONS = 3, 1, 1


def _subset(var: str, table: dict) -> dict:
    """``table`` restricted to the comma-separated names in the environment variable ``var`` (all if
    unset)."""
    value = os.environ.get(var, "").strip()
    if not value:
        return table
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise ValueError(
            f"{var}: expected comma-separated names from {sorted(table)} ({MODE} mode), got {value!r}"
        )
    return {n: table[n] for n in names}


# budgets (bench.gpu_check): NFT_BENCH_SHAPES=sd35m_512  NFT_BENCH_DTYPES=bf16  NFT_BENCH_ROUNDS=20
SHAPES = _subset("NFT_BENCH_SHAPES", SHAPES)
DTYPES = _subset("NFT_BENCH_DTYPES", DTYPES)
if os.environ.get("NFT_BENCH_ROUNDS"):
    _rounds = os.environ["NFT_BENCH_ROUNDS"]
    if not _rounds.isdigit() or int(_rounds) < 1:
        raise ValueError(f"NFT_BENCH_ROUNDS: expected a positive integer, got {_rounds!r}")
    ROUNDS = int(_rounds)


# ----------------------------------------------------------------------------------------------------------
# Cases: inputs, the reference call, the public-API call, and the minimal bytes each must move
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    make: Callable  # (shape, dtype, device) -> dict of tensors
    reference: Callable  # (**tensors) -> outputs, plain PyTorch
    api: Callable  # (**tensors) -> outputs, through kernels.<op>
    bytes_fwd: Callable  # (n elements, storage element size) -> bytes
    bytes_bwd: Callable | None = None  # extra bytes of the backward pass, None if no backward
    grad_inputs: tuple = ()
    grad_outputs: tuple = (0,)  # indices of the outputs that receive an upstream gradient
    quick_compile: bool = False  # also run torch_compile in quick (CPU) mode
    extra: dict = field(default_factory=dict)


def _t(shape, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device).to(dtype)


def _scal(b, device, lo, hi):
    return torch.linspace(hi, lo, b, device=device)


def _step_inputs(shape, dtype, device, third="noise"):
    b = shape[0]
    sigma = _scal(b, device, 0.3, 0.9)
    return {
        "x": _t(shape, dtype, device, 1),
        "v": _t(shape, dtype, device, 2),
        third: _t(shape, dtype, device, 3),
        "sigma": sigma,
        "sigma_next": sigma - 0.1,
    }


def _score_inputs(shape, dtype, device):
    d = _step_inputs(shape, dtype, device, third="prev_sample")
    return d


def _sde_ref(x, v, sigma, sigma_next, noise=None, prev_sample=None):
    return ref.sde_step(
        x,
        v,
        sigma,
        sigma_next,
        noise_level=0.7,
        sigma_max=torch.zeros_like(sigma),
        noise=noise,
        prev_sample=prev_sample,
    )


def _sde_api(x, v, sigma, sigma_next, noise=None, prev_sample=None):
    return kernels.sde_step(x, v, sigma, sigma_next, noise_level=0.7, noise=noise, prev_sample=prev_sample)


def _cps_ref(x, v, sigma, sigma_next, noise):
    return ref.cps_step(x, v, sigma, sigma_next, noise_level=0.7, noise=noise)


def _cps_api(x, v, sigma, sigma_next, noise):
    return kernels.cps_step(x, v, sigma, sigma_next, noise_level=0.7, noise=noise)


def _ddim_ref(x, v, sigma, sigma_next, noise):
    return ref.ddim_step(x, v, sigma_next * 0.5, sigma_next * 0.5 + 0.2, eta=1.0, noise=noise)


def _ddim_api(x, v, sigma, sigma_next, noise):
    return kernels.ddim_step(x, v, sigma_next * 0.5, sigma_next * 0.5 + 0.2, eta=1.0, noise=noise)


def _dpm2_inputs(shape, dtype, device):
    d = _step_inputs(shape, dtype, device, third="x0_prev")
    d["sigma_prev"] = torch.clamp(d["sigma"] + 0.05, max=0.99)
    return d


def _nft_inputs(shape, dtype, device):
    b = shape[0]
    return {
        "v": _t(shape, dtype, device, 1),
        "v_old": _t(shape, dtype, device, 2),
        "x0": _t(shape, dtype, device, 3),
        "noise": _t(shape, dtype, device, 4),
        "v_ref": _t(shape, dtype, device, 5),
        "t": _scal(b, device, 0.1, 0.9),
        "r": _scal(b, device, 0.0, 1.0),
    }


def _pref_inputs(shape, dtype, device):
    """A paired batch (winner / loser rows ``[B, ...]`` each): predictions near their targets, the frozen
    reference model's predictions near them too."""
    t_w, t_l = _t(shape, dtype, device, 1), _t(shape, dtype, device, 2)
    return {
        "pred_w": (t_w + 0.3 * _t(shape, dtype, device, 3)).to(dtype),
        "pred_l": (t_l + 0.3 * _t(shape, dtype, device, 4)).to(dtype),
        "target_w": t_w,
        "target_l": t_l,
        "ref_w": (t_w + 0.3 * _t(shape, dtype, device, 5)).to(dtype),
        "ref_l": (t_l + 0.3 * _t(shape, dtype, device, 6)).to(dtype),
    }


def _dpo_ref(pred_w, pred_l, target_w, target_l, ref_w, ref_l):
    return tuple(
        ref.preference_loss(
            pred_w, pred_l, target_w, target_l, form="dpo", beta=5000.0, ref_w=ref_w, ref_l=ref_l
        )
    )


def _dpo_api(pred_w, pred_l, target_w, target_l, ref_w, ref_l):
    return tuple(
        kernels.preference_loss(pred_w, pred_l, target_w, target_l, form="dpo", ref_w=ref_w, ref_l=ref_l)
    )


def _mapo_ref(pred_w, pred_l, target_w, target_l, ref_w, ref_l):
    return tuple(ref.preference_loss(pred_w, pred_l, target_w, target_l, form="mapo", beta=0.1))[:3]


def _mapo_api(pred_w, pred_l, target_w, target_l, ref_w, ref_l):
    return tuple(kernels.preference_loss(pred_w, pred_l, target_w, target_l, form="mapo"))[:3]


def _gauss_inputs(shape, dtype, device):
    b = shape[0]
    return {
        "a": _t(shape, dtype, device, 1),
        "b": _t(shape, dtype, device, 2),
        "s1": _scal(b, device, 0.3, 1.5),
        "s2": _scal(b, device, 0.5, 1.2),
    }


def _randn_inputs(shape, dtype, device):
    return {
        "seed": torch.tensor(1234, device=device),
        "offset": torch.tensor(0, device=device),
        "shape_dtype": (shape, dtype),
    }


F32 = 4  # bytes of an fp32 element (means are fp32 outputs)

CASES = [
    Case(
        "interpolate",
        lambda s, d, dev: {
            "x0": _t(s, d, dev, 1),
            "noise": _t(s, d, dev, 2),
            "t": _scal(s[0], dev, 0.1, 0.9),
        },
        lambda x0, noise, t: ref.interpolate(x0, noise, t),
        lambda x0, noise, t: kernels.interpolate(x0, noise, t),
        lambda n, es: 3 * n * es,
        lambda n, es: 3 * n * es,
        ("x0", "noise"),
    ),
    Case(
        "paired_interpolate",
        lambda s, d, dev: {
            "x0_w": _t(s, d, dev, 1),
            "x0_l": _t(s, d, dev, 3),
            "noise": _t(s, d, dev, 2),
            "t": _scal(s[0], dev, 0.1, 0.9),
        },
        lambda x0_w, x0_l, noise, t: ref.paired_interpolate(x0_w, x0_l, noise, t),
        lambda x0_w, x0_l, noise, t: kernels.paired_interpolate(x0_w, x0_l, noise, t),
        lambda n, es: 5 * n * es,
        lambda n, es: 5 * n * es,
        ("x0_w", "x0_l", "noise"),
        (0, 1),
    ),
    Case(
        "randn",
        _randn_inputs,
        lambda seed, offset, shape_dtype: ref.randn(
            shape_dtype[0], seed, offset, device=seed.device, dtype=shape_dtype[1]
        ),
        lambda seed, offset, shape_dtype: kernels.randn(shape_dtype[0], seed, offset, dtype=shape_dtype[1]),
        lambda n, es: n * es,
    ),
    Case(
        "euler_step",
        lambda s, d, dev: _step_inputs(s, d, dev, third="unused"),
        lambda x, v, sigma, sigma_next, unused: ref.euler_step(x, v, sigma, sigma_next),
        lambda x, v, sigma, sigma_next, unused: kernels.euler_step(x, v, sigma, sigma_next),
        lambda n, es: 3 * n * es,
        lambda n, es: 3 * n * es,
        ("x", "v"),
        quick_compile=True,
    ),
    # rollout: sample + log-prob; backward from (prev, log_prob) into x, v, noise
    Case(
        "sde_step",
        _step_inputs,
        _sde_ref,
        _sde_api,
        lambda n, es: n * (4 * es + F32),
        lambda n, es: n * (5 * es + F32),
        ("x", "v", "noise"),
        (0, 1),
    ),
    # training: score the stored state; backward from log_prob into x, v
    Case(
        "sde_step_score",
        _score_inputs,
        _sde_ref,
        _sde_api,
        lambda n, es: n * (3 * es + F32),
        lambda n, es: n * (3 * es + F32),
        ("x", "v"),
        (1,),
    ),
    Case(
        "cps_step",
        _step_inputs,
        _cps_ref,
        _cps_api,
        lambda n, es: n * (4 * es + F32),
        lambda n, es: n * (5 * es + F32),
        ("x", "v", "noise"),
        (0, 1),
    ),
    Case(
        "ddim_step",
        _step_inputs,
        _ddim_ref,
        _ddim_api,
        lambda n, es: n * (4 * es + F32),
        lambda n, es: n * (5 * es + F32),
        ("x", "v", "noise"),
        (0, 1),
    ),
    Case(
        "dpm2_step",
        _dpm2_inputs,
        lambda x, v, sigma, sigma_next, x0_prev, sigma_prev: ref.dpm2_step(
            x, v, sigma, sigma_next, x0_prev, sigma_prev
        ),
        lambda x, v, sigma, sigma_next, x0_prev, sigma_prev: kernels.dpm2_step(
            x, v, sigma, sigma_next, x0_prev=x0_prev, sigma_prev=sigma_prev
        ),
        lambda n, es: 5 * n * es,
        lambda n, es: 5 * n * es,
        ("x", "v", "x0_prev"),
        (0, 1),
    ),
    Case(
        "gaussian_log_prob",
        _gauss_inputs,
        lambda a, b, s1, s2: ref.gaussian_log_prob(a, b, s1),
        lambda a, b, s1, s2: kernels.gaussian_log_prob(a, b, s1),
        lambda n, es: 2 * n * es,
        lambda n, es: 4 * n * es,
        ("a", "b"),
    ),
    Case(
        "gaussian_kl",
        _gauss_inputs,
        lambda a, b, s1, s2: ref.gaussian_kl(a, s1, b, s2),
        lambda a, b, s1, s2: kernels.gaussian_kl(a, s1, b, s2),
        lambda n, es: 2 * n * es,
        lambda n, es: 4 * n * es,
        ("a", "b"),
    ),
    Case(
        "nft_loss",
        _nft_inputs,
        lambda v, v_old, x0, noise, v_ref, t, r: ref.nft_loss(
            v, v_old, x0, noise, t, r, beta=1.0, v_ref=v_ref, kl_coef=1e-4
        ),
        lambda v, v_old, x0, noise, v_ref, t, r: kernels.nft_loss(
            v, v_old, x0, noise, t, r, beta=1.0, v_ref=v_ref, kl_coef=1e-4
        ),
        lambda n, es: 5 * n * es,
        lambda n, es: 6 * n * es,
        ("v",),
        quick_compile=True,
    ),
]
# paired-error preference losses: forward reads 6 (DPO) / 4 (MaPO) tensors; backward re-reads the predictions
# and targets and writes the two prediction gradients
CASES += [
    Case(
        "preference_loss_dpo",
        _pref_inputs,
        _dpo_ref,
        _dpo_api,
        lambda n, es: 6 * n * es,
        lambda n, es: 6 * n * es,
        ("pred_w", "pred_l"),
    ),
    Case(
        "preference_loss_mapo",
        _pref_inputs,
        _mapo_ref,
        _mapo_api,
        lambda n, es: 4 * n * es,
        lambda n, es: 6 * n * es,
        ("pred_w", "pred_l"),
    ),
]
CASES_BY_NAME = {c.name: c for c in CASES}


def _providers():
    if os.environ.get("NFT_BENCH_PROVIDERS"):  # e.g. "torch,triton"
        return os.environ["NFT_BENCH_PROVIDERS"].split(",")
    if CUDA and MODE == "full":
        return ["torch", "torch_compile", "triton", "triton_graph"]
    if CUDA:
        return ["torch", "triton"]
    return ["torch", "torch_compile"]


def _params():
    out = []
    for case in CASES:
        for mode in ("fwd", "fwd_bwd"):
            if mode == "fwd_bwd" and case.bytes_bwd is None:
                continue
            for shape_name in SHAPES:
                for dtype_name in DTYPES:
                    for provider in _providers():
                        if provider == "triton_graph" and mode != "fwd":
                            continue
                        if provider == "torch_compile" and not CUDA and not case.quick_compile:
                            continue
                        if provider == "torch_compile" and not CUDA and mode != "fwd":
                            continue
                        out.append(
                            pytest.param(
                                case.name,
                                mode,
                                shape_name,
                                dtype_name,
                                provider,
                                id=f"{case.name}-{mode}-{shape_name}-{dtype_name}-{provider}",
                            )
                        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------------------------
def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _forward_fn(case, provider, tensors):
    if provider == "torch":
        fn = case.reference
    elif provider == "torch_compile":
        fn = torch.compile(case.reference, fullgraph=True)
    else:
        fn = case.api
        with kernels.use_backend("triton"):  # fails loudly if the kernels cannot run here
            kernels.active_backend(torch.empty(0, device=DEVICE))

    def call():
        with kernels.use_backend("triton" if provider.startswith("triton") else "reference"):
            return fn(**tensors)

    return call


def _fwd_bwd_fn(case, provider, tensors):
    leaves = {
        k: (v.detach().requires_grad_(True) if k in case.grad_inputs else v) for k, v in tensors.items()
    }
    forward = _forward_fn(case, provider, leaves)
    outs = _as_tuple(forward())
    grads_out = [torch.randn_like(outs[i], dtype=torch.float32).to(outs[i].dtype) for i in case.grad_outputs]
    inputs = [leaves[k] for k in case.grad_inputs]

    def call():
        o = _as_tuple(forward())
        return torch.autograd.grad([o[i] for i in case.grad_outputs], inputs, grads_out)

    return call


def _graph_fn(call):
    """Capture ``call`` once in a CUDA graph (warm-up on a side stream first); time its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def _syncing(call, every):
    """Synchronise after every ``every``-th call, so a pytest-benchmark round of ``every`` iterations ends
    with the device idle and its per-iteration time is the op's time (plus 1/every of a sync)."""
    count = [0]

    def run():
        call()
        count[0] += 1
        if count[0] % every == 0:
            _common.sync()

    return run


@pytest.mark.benchmark(group="copy")
def test_copy_bandwidth(benchmark):
    """Device-to-device copy of a large buffer: the achievable-bandwidth yardstick for the % column."""
    n = (256 if CUDA else 4) * 2**20 // 4
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    run = _syncing(lambda: dst.copy_(src), ITERATIONS)
    _common.sync()
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=ITERATIONS)
    if benchmark.stats is None:  # --benchmark-disable
        return
    moved = 2 * src.numel() * src.element_size()
    gbps = moved / benchmark.stats.stats.median / 1e9
    _common.COPY_BANDWIDTH.update(
        {"gbps": gbps, "bytes": moved, "median_ms": benchmark.stats.stats.median * 1e3}
    )
    _common.stream_record("copy_bandwidth", dict(_common.COPY_BANDWIDTH))
    benchmark.extra_info.update({"gbps": gbps, "bytes": moved})


@pytest.mark.parametrize("op,mode,shape_name,dtype_name,provider", _params())
def test_kernel(benchmark, op, mode, shape_name, dtype_name, provider):
    case = CASES_BY_NAME[op]
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    benchmark.group = f"{op}-{mode}-{shape_name}-{dtype_name}"
    tensors = case.make(shape, dtype, DEVICE)
    if provider == "torch_compile":
        torch._dynamo.reset()  # a fresh compile per case: no recompile-limit fallback to eager across cases

    t0 = time.perf_counter()
    call = _forward_fn(case, provider, tensors) if mode == "fwd" else _fwd_bwd_fn(case, provider, tensors)
    call()  # first call: torch.compile / Triton JIT compile time, reported apart
    _common.sync()
    compile_s = time.perf_counter() - t0
    if provider == "triton_graph":
        call = _graph_fn(call)

    peak_mb = None
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20

    run = _syncing(call, ITERATIONS)
    _common.sync()
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=ITERATIONS)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to record
        return

    stats = benchmark.stats.stats
    n = 1
    for s in shape:
        n *= s
    es = torch.empty(0, dtype=dtype).element_size()
    moved = case.bytes_fwd(n, es) + (case.bytes_bwd(n, es) if mode == "fwd_bwd" else 0)
    median_ms = stats.median * 1e3
    gbps = moved / stats.median / 1e9
    key = (op, mode, shape_name, dtype_name)
    if provider == "torch":
        _common.EAGER_MEDIAN_MS[key] = median_ms
    eager = _common.EAGER_MEDIAN_MS.get(key)
    copy = _common.COPY_BANDWIDTH.get("gbps")
    record = {
        "op": op,
        "mode": mode,
        "shape_name": shape_name,
        "shape": list(shape),
        "dtype": dtype_name,
        "provider": provider,
        "median_ms": median_ms,
        "iqr_ms": stats.iqr * 1e3,
        "stddev_ms": stats.stddev * 1e3,
        "min_ms": stats.min * 1e3,
        "max_ms": stats.max * 1e3,
        "rounds": stats.rounds,
        "iterations": ITERATIONS,
        "bytes": moved,
        "gbps": gbps,
        "pct_copy_bw": (100.0 * gbps / copy) if copy else None,
        "speedup_vs_torch": (eager / median_ms) if eager else None,
        "compile_s": compile_s,
        "peak_mem_mb": peak_mb,
    }
    benchmark.extra_info.update(
        {
            k: record[k]
            for k in (
                "bytes",
                "gbps",
                "pct_copy_bw",
                "speedup_vs_torch",
                "compile_s",
                "peak_mem_mb",
                "median_ms",
                "iqr_ms",
            )
        }
    )
    _common.RECORDS.append(record)
    _common.stream_record("kernel", record)


def main(argv=None) -> int:
    """``python -m bench.bench_kernels [--quick] [--out PATH] [pytest args...]``.

    Runs this suite (full mode on a GPU) and writes ``bench/results/<device>.json`` (or ``--out``).  Extra
    arguments go to pytest, e.g. ``-k sde_step`` or ``--benchmark-save=baseline``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv:
        argv.remove("--quick")
        os.environ["NFT_BENCH_MODE"] = "quick"
    if "--out" in argv:
        i = argv.index("--out")
        os.environ["NFT_BENCH_RESULTS"] = argv[i + 1]
        del argv[i : i + 2]
    os.environ["NFT_BENCH_WRITE"] = "1"
    return pytest.main(
        [
            __file__,
            "-q",
            "-p",
            "no:randomly",
            "--benchmark-only",
            "--benchmark-sort=name",
            "--benchmark-columns=median,iqr,mean,rounds",
        ]
        + argv
    )


if __name__ == "__main__":
    sys.exit(main())
