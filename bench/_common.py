"""Shared pieces of the benchmark suites: device description, timing, the results file.

Results file (one per device): ``bench/results/<device-name>.json`` with the device, library versions, git
commit, date and one record per (op, mode, shape, dtype, provider) -- median and spread in ms per call,
achieved GB/s from the minimal bytes the op must move, % of the device-to-device copy bandwidth measured in
the same run, speedup over the eager PyTorch reference, compile time and peak memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]

# filled in while the session runs; written by bench/conftest.py at session finish
RECORDS: list[dict] = []
COPY_BANDWIDTH: dict[str, float] = {}  # {"gbps": ..., "bytes": ...}
EAGER_MEDIAN_MS: dict[tuple, float] = {}


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    if has_cuda():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}"


def results_path() -> Path:
    env = os.environ.get("NFT_BENCH_RESULTS")
    if env:
        return Path(env)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", device_name()).strip("-").lower()
    return RESULTS_DIR / f"{slug}.json"


def sync() -> None:
    if has_cuda():
        torch.cuda.synchronize()


def git_commit() -> str:
    """``HEAD`` (``-dirty`` with uncommitted changes); ``NFT_GIT_COMMIT`` wins, for copies of the tree without
    ``.git`` (the GPU machine gets one: ``python -m bench.gpu_check OUT --commit SHA`` passes it on)."""
    if os.environ.get("NFT_GIT_COMMIT"):
        return os.environ["NFT_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode != 0 or not out.stdout.strip():
            return "unknown"
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def environment() -> dict:
    info = {
        "device": device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if has_cuda():
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = torch.version.cuda
        info["sm_count"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def stream_record(kind: str, record: dict) -> None:
    """Append ``{"kind": kind, **record}`` as one JSON line to ``NFT_BENCH_STREAM`` when that is set.

    ``bench.gpu_check`` reads these lines back, so every measurement finished before a stage's time budget ran
    out is kept even when the stage is stopped before it writes its results file."""
    path = os.environ.get("NFT_BENCH_STREAM")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": kind, **record}, default=str) + "\n")
        f.flush()


def write_results(path: Path | None = None) -> Path | None:
    if not RECORDS:
        return None
    path = path or results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), "copy_bandwidth": COPY_BANDWIDTH, "results": RECORDS}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def _fmt(value, width, digits):
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def summary_table() -> str:
    """A plain-text table of the records: one line per (op, mode, shape, dtype) and provider."""
    if not RECORDS:
        return ""
    head = (
        f"{'op':<22}{'mode':<8}{'shape':<18}{'dtype':<10}{'provider':<14}{'median ms':>10}{'iqr ms':>9}"
        f"{'GB/s':>9}{'%copy':>7}{'speedup':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in RECORDS:
        lines.append(
            f"{r['op']:<22}{r['mode']:<8}{'x'.join(map(str, r['shape'])):<18}{r['dtype']:<10}"
            f"{r['provider']:<14}"
            f"{r['median_ms']:>10.4f}{r['iqr_ms']:>9.4f}{r['gbps']:>9.1f}"
            f"{_fmt(r.get('pct_copy_bw'), 7, 1)}{_fmt(r.get('speedup_vs_torch'), 9, 2)}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Peak memory of one step, each configuration in its own process (bench_*_memory.py)
# ------------------------------------------------------------------------------------------------------------
def peak_memory_of(step, device: torch.device) -> float:
    """Bytes one call of ``step()`` adds at its peak: on CUDA ``max_memory_allocated`` after a reset minus
    the memory allocated before; on the CPU the growth of the process's peak RSS (``ru_maxrss``) over its
    value before (so warm the process up first, and measure in a fresh process: :func:`run_isolated`)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)


def run_isolated(module: str, argv: list[str]) -> dict:
    """``python -m module --one ARGV`` in a fresh process -> the JSON object its last stdout line prints.
    glibc serves big blocks from mmap there (returned on free), so the peak RSS follows the live allocations
    instead of the heap's fragmentation.  A failure raises RuntimeError with the end of its stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", module, "--one", *argv]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_bench_parser(description: str):
    """The options both memory benchmarks share, and their hidden per-process ones; a caller adds its own."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="all", choices=["all", "embedded", "sd3-tiny"])
    ap.add_argument("--resolution", type=int, default=128, help="sd3-tiny image size")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    return ap


def memory_bench_models(args) -> list[str]:
    """Resolves ``--device auto`` in place -> the models ``--model`` names."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return ["embedded", "sd3-tiny"] if args.model == "all" else [args.model]


def add_heldout_probe_args(p: argparse.ArgumentParser) -> None:
    """The options every embedded-default probe shares (``heldout_probe_setup``'s and ``write_probe_json``'s):
    ``--batch``, ``--seed``, ``--reward-path``, ``--threads``, ``--json``."""
    p.add_argument("--batch", type=int, default=64, help="samples per sampler call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward-path", help="a learned reward model (default: the shipped one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")


def heldout_probe_setup(name: str, *, n: int, seed: int, threads: int, reward_path=None):
    """What the embedded-default probes (``bench.noise_ascent_probe``, ``bench.x0hat_probe``) start from:
    ``threads`` torch threads, the learned reward (``reward_path``, default the shipped one), the embedded
    default, ``n`` held-out prompts and one Philox seed each, drawn from generators keyed by ``(seed, name)``
    -> ``(policy, reward, prompts, seeds)``."""
    import numpy as np

    from train import common
    from train import reward_model as rm
    from train.spo_scorer import build_embedded

    torch.set_num_threads(threads)
    reward = rm.GenEvalLearned(reward_path)
    policy = build_embedded(seed)
    rng = np.random.default_rng(common.derive_seed(seed, name, "prompts"))
    prompts = rm.draw(rm.heldout_pool(), n, rng)
    seeds = [common.derive_seed(seed, name, "sample", i) for i in range(n)]
    return policy, reward, prompts, seeds


def write_probe_json(path, module: str, argv, result: dict, seconds: float) -> None:
    """A probe's results with the command that made them (``argv``: its arguments, None = ``sys.argv``) at
    ``path`` (nothing when ``path`` is None)."""
    if not path:
        return
    given = sys.argv[1:] if argv is None else argv
    out = {"command": f"python -m {module} " + " ".join(given), **result, "seconds": round(seconds, 1)}
    Path(path).write_text(json.dumps(out, indent=1))


def check_json_path(path) -> None:
    """``--json``: a file path in an existing directory, checked before any work so that a mistyped path does
    not lose a run at its end; exits 2 with one line otherwise."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir() or not p.parent.is_dir():
        why = "a directory" if p.is_dir() else f"{str(p.parent)!r} is not a directory"
        print(f"error: --json: expected a file path in an existing directory, got {str(p)!r} ({why})",
              file=sys.stderr)
        raise SystemExit(2)
