"""One prepared GPU check: every GPU-only claim of the engine measured and recorded in <= 8 minutes.

Run from the repository root on an H100/H200 (the GPU machine has torch, triton, transformers, peft, pytest
and pytest-benchmark, not diffusers or nvtx: carry those as wheels in ``.whl/``, see ``--fetch-wheels``)::

    python -m bench.gpu_check --fetch-wheels          # here, once: diffusers + nvtx wheels into .whl/ (~9 MB)
    python -m bench.gpu_check OUT_DIR --commit SHA    # on the GPU machine (its copy of the tree has no .git)
    python -m bench.gpu_check OUT_DIR --dry-run       # anywhere: the same stages in their CPU quick modes

Stages, each a subprocess with its own time budget (seconds on a GPU; a stage may also use what the stages
before it left unspent, never the budget of a stage after it, so the whole run ends within the sum, 470 s):

======================  ======  =========================================================================
``install``                 20  ``pip install --no-index --no-deps --target`` of the wheels in ``.whl/``
``env``                     20  versions, device, driver, the project's packages import
``tests``                  120  ``pytest -m gpu``: the files with a ``pytest.mark.gpu`` test, side by side,
                                each in its own process (a file of > 24 tests in parts, one of <= 4 tests
                                one process per test), under the stage's limit; outcome per test
``kernels``                 55  ``bench/bench_kernels.py``, bf16, SD3.5-M and FLUX latents: eager,
                                Triton, Triton replayed from a CUDA graph; copy bandwidth
``kernels_compile``         85  the same with ``torch.compile`` of the eager reference (compile apart)
``rollout``                 70  ``bench/bench_rollout.py``: SD3.5-M random weights, 512 px, 10 steps,
                                batch 16: eager, CUDA graphs, torch.compile
``e2e``                    100  ``bench/bench_e2e.py``: one DiffusionNFT iteration on SD3.5-M, the
                                reference-style eager code vs the engine, MFU against the measured bf16
                                matmul peak, peak memory
======================  ======  =========================================================================

The checks CPU tests cannot make run inside ``tests`` and are named in ``tests.json`` / ``summary.md``:
``ratio/first_abs_dev == 0`` of a Flow-GRPO step on CUDA in bf16 autocast with CFG and a training micro-batch
(3) other than the rollout batch (8); CUDA-graph capture and replay with changed seeds and sigmas; bf16 LoRA
training that loses no update.

A stage that fails or runs out of time is recorded as such and the next one starts; measurements are streamed
to JSON lines as they finish (``NFT_BENCH_STREAM``, ``bench/_gpu_check_plugin.py``), so a stopped stage keeps
what it measured.  OUT_DIR receives exactly these 8 files (each well under 16 MiB): ``summary.md``,
``environment.json``, ``stages.json``, ``tests.json``, ``kernels.json``, ``rollout.json``, ``e2e.json`` and
``log.txt``; every JSON file starts with the same ``environment`` (device, versions, git commit, date, mode).
Exit status: 0 when every stage is ``ok`` or ``skipped``, 1 otherwise (the files are written either way).

``--dry-run`` replaces the GPU stages by their CPU quick modes (``tests/test_gpu_check.py`` runs it in CI);
its numbers are CPU numbers and say nothing about GPU speed.  Without ``--dry-run`` and without a CUDA device
the stages after ``env`` are skipped (``NFT_GPU_CHECK_ALLOW_CPU=1`` runs them anyway: a test of the GPU path's
machinery, not of the GPU).  This module imports only the standard library:
the orchestrator keeps working when torch or the project fails to import, and reports that.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_LIMIT_S = 480  # the bound on the whole call: 8 minutes
FINALIZE_RESERVE_S = 10  # writing the output files after the last stage
OUTPUT_FILES = (
    "summary.md",
    "environment.json",
    "stages.json",
    "tests.json",
    "kernels.json",
    "rollout.json",
    "e2e.json",
    "log.txt",
)
MAX_FILE_BYTES = 15 * 2**20  # each output file stays under 16 MiB
LOG_TAIL_BYTES = 1 * 2**20  # per stage (per test file) in log.txt
WHEELS = ("diffusers", "nvtx")  # what the GPU image lacks; pinned to the versions installed here
WHEEL_PLATFORM = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_27_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux1_x86_64",
]
DEFAULT_SITE = "/tmp/nft-gpu-check-site"
STATUSES = ("ok", "failed", "timeout", "skipped", "error")
TEST_CHUNK = 24  # at most this many tests per pytest process on a GPU: a bigger file runs in parts
TEST_SINGLE_MAX = 4  # a file with at most this many GPU tests runs one process per test
TEST_WORKERS = 16  # pytest processes side by side on a GPU machine (16 cores)
COLLECT_LIMIT_S = 40


@dataclass(frozen=True)
class Stage:
    name: str
    gpu_budget_s: int
    dry_budget_s: int
    what: str


STAGES = (
    Stage("install", 20, 60, "carried wheels installed (pip --no-index --no-deps --target)"),
    Stage("env", 20, 90, "versions, device, driver; the project imports"),
    Stage("tests", 120, 180, "pytest -m gpu, one process per test file"),
    Stage("kernels", 55, 120, "kernel benchmark: eager, Triton, CUDA-graph replay; copy bandwidth"),
    Stage("kernels_compile", 85, 120, "kernel benchmark: torch.compile of the eager reference"),
    Stage("rollout", 70, 120, "rollout benchmark: SD3.5-M 512 px, 10 steps, batch 16"),
    Stage("e2e", 100, 120, "NFT iteration: reference-style eager code vs the engine"),
)
SELECTABLE = tuple(s.name for s in STAGES if s.name not in ("install", "env"))

# GPU-only claims and the tests that check them (tests.json "checks"; test_gpu_check asserts the ids exist)
CHECKS = (
    (
        "Flow-GRPO ratio/first_abs_dev == 0 on CUDA: bf16 autocast, CFG 2.0, rollout batch 8, micro-batch 3",
        ("tests/train/test_grpo.py::test_ratio_is_exactly_one_on_cuda[bfloat16]",),
    ),
    (
        "Flow-GRPO ratio/first_abs_dev == 0 on CUDA: fp32, same batching and CFG",
        ("tests/train/test_grpo.py::test_ratio_is_exactly_one_on_cuda[none]",),
    ),
    (
        "CUDA-graph rollout: one capture replayed with new seeds, sigmas and conditioning equals eager",
        ("tests/engine/test_graphs.py::test_one_graph_serves_every_step_seed_and_schedule",),
    ),
    (
        "Every kernel in one CUDA graph, replayed with new seeds and sigmas, equals eager bit for bit",
        ("tests/kernels/test_gpu.py::test_cuda_graph_replay_with_new_seed_and_sigma",),
    ),
    (
        "bf16 LoRA training loses no update (NFT and Flow-GRPO, 3 optimizer steps)",
        (
            "tests/train/test_bf16_lora.py::test_bf16_lora_training_loses_no_update[cuda-nft]",
            "tests/train/test_bf16_lora.py::test_bf16_lora_training_loses_no_update[cuda-grpo]",
        ),
    ),
)


# ----------------------------------------------------------------------------------------------------------
# Running one command under a time limit
# ----------------------------------------------------------------------------------------------------------
def _kill_group(proc: subprocess.Popen) -> None:
    """End the process group this check started for ``proc`` (the command and anything it spawned): TERM,
    up to 3 s for the leader to exit, then KILL for whatever is left (at most ~5 s past a stage's limit,
    which ``FINALIZE_RESERVE_S`` covers)."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def run_command(cmd: list[str], *, timeout: float, env: dict, log_path: Path) -> dict:
    """Run ``cmd`` (cwd: the repository root) with stdout+stderr appended to ``log_path``; stop its whole
    process group after ``timeout`` seconds.  Returns ``{"rc", "seconds", "timed_out"}``."""
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}   (limit {timeout:.0f} s)\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as e:
            log.write(f"could not start: {e}\n".encode())
            return {"rc": None, "seconds": 0.0, "timed_out": False, "error": str(e)}
        timed_out = False
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            try:
                rc = proc.wait(timeout=1)
            except subprocess.TimeoutExpired:  # not even KILL ended it (a stuck driver call): leave it
                rc = None
        else:
            _kill_group(proc)  # workers the command left behind (compile pools) must not outlive the stage
        seconds = time.monotonic() - t0
        note = f"[stopped at the {timeout:.0f} s limit]" if timed_out else f"[exit {rc}]"
        log.write(f"{note} after {seconds:.1f} s\n".encode())
    return {"rc": rc, "seconds": round(seconds, 2), "timed_out": timed_out}


def read_jsonl(path: Path) -> list[dict]:
    """The complete JSON lines of ``path`` (a line cut off by a kill is dropped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def tail(path: Path, nbytes: int) -> str:
    if not path.exists():
        return ""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size > nbytes:
            f.seek(size - nbytes)
        data = f.read()
    text = data.decode("utf-8", errors="replace")
    return ("...[cut]...\n" + text) if size > nbytes else text


# ----------------------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------------------
@dataclass
class StageResult:
    name: str
    status: str
    seconds: float
    budget_s: int
    timeout_s: float
    rc: int | None = None
    note: str = ""
    commands: list = field(default_factory=list)
    log_tail: str = ""


class Check:
    def __init__(
        self,
        out_dir: Path,
        *,
        dry_run: bool,
        stages: tuple[str, ...],
        wheel_dir: Path,
        site: Path,
        commit: str | None,
    ):
        self.out_dir, self.dry_run, self.selected = out_dir, dry_run, stages
        self.wheel_dir, self.site, self.commit = wheel_dir, site, commit
        # the streams and logs of the stages, read back into OUT_DIR at the end
        self.scratch = Path(tempfile.mkdtemp(prefix="nft-gpu-check-"))
        self.t0 = time.monotonic()
        self.spent_budget = 0.0
        self.results: list[StageResult] = []
        self.site_ready = False
        self.probe: dict = {}
        self.logs: list[tuple[str, Path]] = []

    # --- helpers --------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def budget(self, stage: Stage) -> int:
        return stage.dry_budget_s if self.dry_run else stage.gpu_budget_s

    def env(self, **extra: str) -> dict:
        # Not the environment of a pytest-xdist worker that may have started this check (its test): a pytest
        # child with PYTEST_XDIST_* set turns pytest-benchmark off, and --benchmark-only then refuses to run.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
        paths = ([str(self.site)] if self.site_ready else []) + [str(ROOT)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        if self.commit:
            env["NFT_GIT_COMMIT"] = self.commit
        if self.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""  # CPU quick modes even on a machine with a GPU
            env["NFT_BENCH_MODE"] = "quick"
        env.update(extra)
        return env

    def log_path(self, name: str) -> Path:
        path = self.scratch / f"{name}.log"
        self.logs.append((name, path))
        return path

    def run(self) -> int:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        mode = "dry-run (CPU quick modes)" if self.dry_run else "gpu"
        print(f"gpu_check: {mode}; stages {', '.join(self.selected)}; output {self.out_dir}", flush=True)
        for stage in STAGES:
            self.spent_budget += self.budget(stage)
            if stage.name not in self.selected:
                continue
            timeout = self.spent_budget - self.elapsed()
            t0 = time.monotonic()
            no_gpu = (
                not self.dry_run
                and stage.name not in ("install", "env")
                and not self.probe.get("cuda_available")
                and os.environ.get("NFT_GPU_CHECK_ALLOW_CPU") != "1"
            )
            if timeout < 2 or no_gpu:
                note = "no time left in the budget"
                if no_gpu:
                    note = "no CUDA device (see env): nothing to measure; --dry-run runs the CPU quick modes"
                res = StageResult(
                    stage.name, "skipped", 0.0, self.budget(stage), round(timeout, 1), note=note
                )
            else:
                try:
                    res = getattr(self, f"stage_{stage.name}")(stage, timeout)
                except Exception as e:  # a bug here must not cost the other stages their results
                    res = StageResult(
                        stage.name,
                        "error",
                        time.monotonic() - t0,
                        self.budget(stage),
                        round(timeout, 1),
                        note=f"{type(e).__name__}: {e}",
                    )
            res.seconds = round(time.monotonic() - t0, 2)
            self.results.append(res)
            print(
                f"gpu_check: {stage.name:<16} {res.status:<8} {res.seconds:7.1f} s "
                f"(limit {res.timeout_s:.0f} s) {res.note}",
                flush=True,
            )
        self.write_outputs()
        shutil.rmtree(self.scratch, ignore_errors=True)
        print((self.out_dir / "summary.md").read_text(), flush=True)  # also in the device call's output tail
        failed = [r.name for r in self.results if r.status not in ("ok", "skipped")]
        print(
            f"gpu_check: done in {self.elapsed():.1f} s; "
            f"{'all stages ok' if not failed else 'not ok: ' + ', '.join(failed)}; see {self.out_dir}"
        )
        return 1 if failed else 0

    def simple(
        self,
        stage: Stage,
        timeout: float,
        cmd: list[str],
        env: dict,
        log_name: str | None = None,
        note: str = "",
    ) -> StageResult:
        log = self.log_path(log_name or stage.name)
        r = run_command(cmd, timeout=timeout, env=env, log_path=log)
        if r.get("error"):
            status = "error"
        elif r["timed_out"]:
            status = "timeout"
        else:
            status = "ok" if r["rc"] == 0 else "failed"
        return StageResult(
            stage.name,
            status,
            r["seconds"],
            self.budget(stage),
            round(timeout, 1),
            r["rc"],
            note,
            [" ".join(cmd)],
            tail(log, 3000),
        )

    # --- stages ---------------------------------------------------------------------------------------------
    def stage_install(self, stage: Stage, timeout: float) -> StageResult:
        wheels = sorted(self.wheel_dir.glob("*.whl")) if self.wheel_dir.is_dir() else []
        if not wheels:
            return StageResult(
                stage.name,
                "skipped",
                0.0,
                self.budget(stage),
                round(timeout, 1),
                note=f"no wheels in {self.wheel_dir}: the image's packages are used as they are",
            )
        names: dict[str, list[str]] = {}
        for w in wheels:
            names.setdefault(w.name.split("-")[0].lower().replace("_", "-"), []).append(w.name)
        doubles = {k: v for k, v in names.items() if len(v) > 1}
        if doubles:
            return StageResult(
                stage.name,
                "error",
                0.0,
                self.budget(stage),
                round(timeout, 1),
                note=f"{self.wheel_dir}: expected one wheel per package, got {doubles}",
            )
        base = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(self.site),
        ]
        if self.dry_run:  # resolve for the GPU machine's Python and platform, install nothing
            cmd = base[:4] + ["--dry-run"] + base[4:] + WHEEL_PLATFORM + [str(w) for w in wheels]
        else:
            cmd = base + [str(w) for w in wheels]
        res = self.simple(stage, timeout, cmd, self.env(), note=", ".join(sorted(w.name for w in wheels)))
        if res.status == "ok" and not self.dry_run:
            self.site_ready = True
        return res

    def stage_env(self, stage: Stage, timeout: float) -> StageResult:
        out = self.scratch / "env.json"
        cmd = [sys.executable, "-m", "bench.gpu_check", "--probe-env", str(out)]
        res = self.simple(stage, timeout, cmd, self.env())
        if out.exists():
            self.probe = json.loads(out.read_text())
            if self.probe.get("problems") and res.status == "ok":
                res.status = "failed"
            problems = list(self.probe.get("problems", []))
            if any(pb.startswith("import diffusers") for pb in problems) and not self.site_ready:
                problems.append(
                    "carry diffusers as a wheel: python -m bench.gpu_check --fetch-wheels fills .whl/"
                )
            res.note = "; ".join(problems) or res.note
        if not self.dry_run and not self.probe.get("cuda_available"):
            res.note = (res.note + "; " if res.note else "") + "no CUDA device"
        return res

    def stage_tests(self, stage: Stage, timeout: float) -> StageResult:
        files = gpu_test_files()
        if not files:
            return StageResult(
                stage.name,
                "error",
                0.0,
                self.budget(stage),
                round(timeout, 1),
                note="no test file with a pytest.mark.gpu test found",
            )
        deadline = time.monotonic() + timeout
        universe: list[str] = []
        collected = None
        commands = []
        collect_run = None
        if not self.dry_run:
            # on a GPU: collect once, then every file (a big one in parts) in its own process, side by side
            # (16 cores; the tests are compile-bound); the dry run runs them all in one process, every test
            # skipping without CUDA
            stream = self.scratch / "tests-collect.jsonl"
            cmd = pytest_gpu_cmd(["--collect-only", *files])
            commands.append(" ".join(cmd))
            collect_run = run_command(
                cmd,
                timeout=min(COLLECT_LIMIT_S, timeout / 3),
                env=self.env(NFT_CHECK_STREAM=str(stream)),
                log_path=self.log_path("tests-collect"),
            )
            for ev in read_jsonl(stream):
                if ev["event"] == "collected":
                    universe = ev["nodeids"]
                    collected = {}
                    for nodeid in universe:
                        collected.setdefault(nodeid.split("::")[0], []).append(nodeid)
        groups = plan_test_groups(files, collected, None if self.dry_run else TEST_CHUNK, TEST_SINGLE_MAX)
        runs: list[dict] = []
        lock = threading.Lock()

        def one(group):
            stream = self.scratch / f"tests-{group['name']}.jsonl"
            cmd = pytest_gpu_cmd(group["targets"])
            limit = deadline - time.monotonic()
            log = self.log_path(f"tests-{group['name']}")
            if limit < 2:
                r = {"rc": None, "seconds": 0.0, "timed_out": False, "error": "no time left"}
            else:
                r = run_command(cmd, timeout=limit, env=self.env(NFT_CHECK_STREAM=str(stream)), log_path=log)
            with lock:
                runs.append(
                    {
                        **group,
                        "stream": stream,
                        "limit_s": round(limit, 1),
                        **r,
                        "command": " ".join(cmd[:12] + [f"... ({len(group['targets'])} targets)"])
                        if len(group["targets"]) > 8
                        else " ".join(cmd),
                    }
                )

        workers = 1 if self.dry_run else min(TEST_WORKERS, len(groups))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, groups))
        summary = collect_tests(runs, universe)
        summary["collect"] = collect_run and {**collect_run, "tests": len(universe)}
        self.tests_summary = summary
        c = summary["counts"]
        if any(r.get("timed_out") for r in runs):
            status = "timeout"
        elif any(r.get("error") or r["rc"] not in (0, 1) for r in runs) or c.get("error", 0):
            status = "error"
        elif c.get("failed", 0):
            status = "failed"
        else:
            status = "ok"
        return StageResult(
            stage.name,
            status,
            0.0,
            self.budget(stage),
            round(timeout, 1),
            max((r["rc"] or 0) for r in runs),
            ", ".join(f"{v} {k}" for k, v in sorted(c.items())) + f" ({len(runs)} processes)",
            commands + [r["command"] for r in runs],
        )

    def _kernels(self, stage: Stage, timeout: float, providers: str, k: str | None) -> StageResult:
        stream = self.scratch / f"{stage.name}.jsonl"
        extra = {
            "NFT_BENCH_STREAM": str(stream),
            "NFT_BENCH_RESULTS": str(self.scratch / f"{stage.name}-pytest.json"),
            "NFT_BENCH_PROVIDERS": providers,
        }
        if not self.dry_run:
            extra.update({"NFT_BENCH_MODE": "full", "NFT_BENCH_DTYPES": "bf16", "NFT_BENCH_ROUNDS": "20"})
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "bench/bench_kernels.py",
            "--benchmark-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-disable-gc",
            "--benchmark-columns=median,iqr,rounds",
        ]
        if k:
            cmd += ["-k", k]
        res = self.simple(stage, timeout, cmd, self.env(**extra))
        n = sum(1 for r in read_jsonl(stream) if r.get("kind") == "kernel")
        res.note = f"{n} kernel records"
        return res

    def stage_kernels(self, stage: Stage, timeout: float) -> StageResult:
        if self.dry_run:
            return self._kernels(stage, timeout, "torch", None)
        return self._kernels(stage, timeout, "torch,triton,triton_graph", None)

    def stage_kernels_compile(self, stage: Stage, timeout: float) -> StageResult:
        if self.dry_run:  # one inductor compile on the CPU: the path, not the numbers
            return self._kernels(stage, timeout, "torch,torch_compile", "euler_step and not fwd_bwd")
        return self._kernels(stage, timeout, "torch,torch_compile", None)

    def stage_rollout(self, stage: Stage, timeout: float) -> StageResult:
        stream = self.scratch / "rollout.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "bench.bench_rollout",
            "--stream",
            str(stream),
            "--out",
            str(self.scratch / "rollout-full.json"),
        ]
        if self.dry_run:
            cmd += ["--rounds", "1"]
        else:
            cmd += ["--models", "sd3.5-medium", "--batches", "16", "--rounds", "3"]
        res = self.simple(stage, timeout, cmd, self.env())
        res.note = f"{len(read_jsonl(stream))} records"
        return res

    def stage_e2e(self, stage: Stage, timeout: float) -> StageResult:
        stream = self.scratch / "e2e.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "bench.bench_e2e",
            "--stream",
            str(stream),
            "--out",
            str(self.scratch / "e2e-full.json"),
            "--rounds",
            "1" if self.dry_run else "2",
        ]
        extra = {"NFT_BENCH_PROVIDERS": "reference,engine"}
        if not self.dry_run:
            extra["NFT_E2E_MODELS"] = "sd3.5-medium"
        res = self.simple(stage, timeout, cmd, self.env(**extra))
        res.note = f"{sum(1 for r in read_jsonl(stream) if r.get('kind') == 'e2e')} records"
        return res

    # --- outputs --------------------------------------------------------------------------------------------
    def header(self) -> dict:
        p = self.probe
        return {
            "device": p.get("device", "unknown (env stage did not report)"),
            "mode": "dry-run" if self.dry_run else "gpu",
            "versions": p.get("versions", {"python": platform.python_version()}),
            "git_commit": p.get("git_commit") or self.commit or "unknown",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "driver": p.get("driver"),
            "cuda": p.get("cuda"),
        }

    def write_outputs(self) -> None:
        head = self.header()
        by_name = {r.name: r for r in self.results}
        stages = {
            "environment": head,
            "total_s": round(self.elapsed(), 1),
            "limit_s": TOTAL_LIMIT_S,
            "budgets_s": {s.name: self.budget(s) for s in STAGES},
            "stages": [asdict(r) for r in self.results],
        }
        environment = {
            "environment": head,
            "probe": self.probe,
            "install": asdict(by_name["install"]) if "install" in by_name else None,
            "wheel_dir": str(self.wheel_dir),
        }
        tests = getattr(self, "tests_summary", None) or {"counts": {}, "files": [], "tests": []}
        tests = {"environment": head, **tests, "checks": evaluate_checks(tests.get("tests", []))}
        kernels = {"environment": head, "copy_bandwidth": {}, "results": []}
        for name in ("kernels", "kernels_compile"):
            for rec in read_jsonl(self.scratch / f"{name}.jsonl"):
                kind = rec.pop("kind", None)
                if kind == "copy_bandwidth":
                    kernels["copy_bandwidth"].setdefault(name, rec)
                elif kind == "kernel":
                    kernels["results"].append({"stage": name, **rec})
        rollout = {
            "environment": head,
            "results": [
                {k: v for k, v in r.items() if k != "kind"}
                for r in read_jsonl(self.scratch / "rollout.jsonl")
            ],
        }
        e2e = {"environment": head, "matmul_peak": None, "results": []}
        for rec in read_jsonl(self.scratch / "e2e.jsonl"):
            kind = rec.pop("kind", None)
            if kind == "matmul_peak":
                e2e["matmul_peak"] = rec
            elif kind == "e2e":
                e2e["results"].append(rec)
        payloads = {
            "environment.json": environment,
            "stages.json": stages,
            "tests.json": tests,
            "kernels.json": kernels,
            "rollout.json": rollout,
            "e2e.json": e2e,
        }
        for fname, payload in payloads.items():
            _write_capped(self.out_dir / fname, json.dumps(payload, indent=1, default=str) + "\n")
        _write_capped(self.out_dir / "summary.md", summary_md(head, stages, tests, kernels, rollout, e2e))
        parts = []
        for name, path in self.logs:
            parts.append(f"\n===== {name} =====\n" + tail(path, LOG_TAIL_BYTES))
        _write_capped(self.out_dir / "log.txt", "".join(parts))


def _write_capped(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    if len(data) > MAX_FILE_BYTES:
        data = b"...[cut to stay under 16 MiB]...\n" + data[-MAX_FILE_BYTES:]
    path.write_bytes(data)


# ----------------------------------------------------------------------------------------------------------
# Tests: discovery and the streamed outcomes
# ----------------------------------------------------------------------------------------------------------
_GPU_MARK = re.compile(r"pytest\.mark\.gpu\b")


def gpu_test_files() -> list[str]:
    """Test files (relative to the root) with a ``pytest.mark.gpu`` test, found by reading their text."""
    out = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if _GPU_MARK.search(path.read_text(encoding="utf-8", errors="replace")):
            out.append(path.relative_to(ROOT).as_posix())
    return out


def pytest_gpu_cmd(targets: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "bench._gpu_check_plugin",
        "-p",
        "no:cacheprovider",
        "-o",
        "console_output_style=classic",
        *targets,
    ]


def plan_test_groups(
    files: list[str], collected: dict | None, chunk: int | None, single_max: int = 0
) -> list[dict]:
    """The pytest processes of the tests stage: ``{"name", "files", "targets"}`` each.

    ``chunk`` None: one process for every file.  Else one process per file, except that a file with more
    than ``chunk`` collected tests is split into consecutive parts of at most ``chunk`` node ids, and a file
    with at most ``single_max`` tests runs one process per test (they are few and slow: a torch.compile
    each, a trainer each), every part under the same limit as its file.  A file missing from ``collected``
    (its collection failed) runs whole, so its error is reported."""
    if chunk is None:
        return [{"name": "all", "files": list(files), "targets": list(files)}]
    groups = []
    for f in files:
        stem = Path(f).stem
        ids = (collected or {}).get(f)
        if not ids or single_max < len(ids) <= chunk:
            groups.append({"name": stem, "files": [f], "targets": [f]})
            continue
        size = 1 if len(ids) <= single_max else -(-len(ids) // -(-len(ids) // chunk))
        parts = -(-len(ids) // size)
        for k in range(parts):
            groups.append(
                {"name": f"{stem}-{k + 1}of{parts}", "files": [f], "targets": ids[k * size : (k + 1) * size]}
            )
    return groups


def collect_tests(runs: list[dict], universe: list[str] = ()) -> dict:
    """Per-test outcomes from the streamed events of each pytest process: ``passed`` / ``failed`` /
    ``skipped`` / ``error`` (collection, setup or teardown failed; or the process died) / ``timeout`` (running
    when its process was stopped at the time limit) / ``not run`` (collected, never started)."""
    tests: dict[str, dict] = {}
    all_ids = list(universe)
    per_run = []
    for run in sorted(runs, key=lambda r: r["name"]):
        events = read_jsonl(run["stream"])
        ids: list[str] = []
        started: list[str] = []
        for ev in events:
            kind = ev["event"]
            if kind == "collected":
                ids += ev["nodeids"]
            elif kind == "start":
                started.append(ev["nodeid"])
            elif kind == "report":
                t = tests.setdefault(
                    ev["nodeid"],
                    {"nodeid": ev["nodeid"], "outcome": "passed", "duration_s": 0.0, "message": ""},
                )
                t["duration_s"] = round((t["duration_s"] or 0.0) + ev["duration"], 3)
                if ev["outcome"] == "failed":
                    t["outcome"] = "failed" if ev["when"] == "call" else "error"
                    t["message"] = ev["message"]
                elif ev["outcome"] == "skipped" and t["outcome"] == "passed":
                    t["outcome"], t["message"] = "skipped", ev["message"]
            elif kind == "collect_error":
                ids.append(ev["nodeid"])
                tests[ev["nodeid"]] = {
                    "nodeid": ev["nodeid"],
                    "outcome": "error",
                    "duration_s": None,
                    "message": "collection error: " + ev["message"],
                }
        for nodeid in started:
            if nodeid not in tests:
                timed_out = run.get("timed_out")
                tests[nodeid] = {
                    "nodeid": nodeid,
                    "outcome": "timeout" if timed_out else "error",
                    "duration_s": None,
                    "message": "running when its process was stopped at the time limit"
                    if timed_out
                    else "no report: its process ended",
                }
        all_ids += ids + started
        per_run.append((run, list(dict.fromkeys(ids + started)), events))
    for nodeid in all_ids:
        if nodeid not in tests:
            tests[nodeid] = {
                "nodeid": nodeid,
                "outcome": "not run",
                "duration_s": None,
                "message": "collected; its process ended (time limit) before it started",
            }
    files = []
    for run, ids, events in per_run:
        counts: dict[str, int] = {}
        for nodeid in ids:
            counts[tests[nodeid]["outcome"]] = counts.get(tests[nodeid]["outcome"], 0) + 1
        if run.get("timed_out"):
            status = "timeout"
        elif run.get("error") or run["rc"] not in (0, 1):
            status = "error"
        else:
            status = "failed" if run["rc"] == 1 else "ok"
        files.append(
            {
                "name": run["name"],
                "files": run["files"],
                "status": status,
                "rc": run["rc"],
                "seconds": run["seconds"],
                "limit_s": run["limit_s"],
                "counts": counts,
                "finished": any(e["event"] == "finish" for e in events),
                "command": run["command"],
            }
        )
    for t in tests.values():
        t["file"] = t["nodeid"].split("::")[0]
    counts: dict[str, int] = {}
    for t in tests.values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"counts": counts, "files": files, "tests": sorted(tests.values(), key=lambda t: t["nodeid"])}


def evaluate_checks(tests: list[dict]) -> list[dict]:
    by_id = {t["nodeid"]: t["outcome"] for t in tests}
    out = []
    for name, nodeids in CHECKS:
        outcomes = [by_id.get(n, "not run") for n in nodeids]
        if all(o == "passed" for o in outcomes):
            result = "passed"
        elif any(o in ("failed", "error", "timeout") for o in outcomes):
            result = "failed"
        elif all(o == "skipped" for o in outcomes):
            result = "skipped"
        else:
            result = "not run"
        out.append({"check": name, "result": result, "tests": dict(zip(nodeids, outcomes, strict=True))})
    return out


# ----------------------------------------------------------------------------------------------------------
# summary.md
# ----------------------------------------------------------------------------------------------------------
def _f(v, digits=2, dash="-"):
    if v is None:
        return dash
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v)


def summary_md(head, stages, tests, kernels, rollout, e2e) -> str:
    v = head["versions"]
    lines = [
        f"# GPU check: {head['device']}, {head['date']}",
        "",
        f"- mode: **{head['mode']}**"
        + (
            " (CPU quick modes: the numbers say nothing about GPU speed)" if head["mode"] == "dry-run" else ""
        ),
        f"- commit: `{head['git_commit']}`",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- total: {stages['total_s']} s (limit {stages['limit_s']} s)",
        "",
        "## Stages",
        "",
        "| stage | status | s | limit s | budget s | note |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in stages["stages"]:
        note = r["note"].replace("|", "/").replace("\n", " ")[:160]
        lines.append(
            f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {r['timeout_s']:.0f} | "
            f"{r['budget_s']} | {note} |"
        )
    lines += ["", "## GPU-only checks", "", "| check | result |", "| --- | --- |"]
    for c in tests["checks"]:
        lines.append(f"| {c['check']} | {c['result']} |")
    counts = tests.get("counts", {})
    lines += [
        "",
        "## GPU tests (`pytest -m gpu`)",
        "",
        ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test ran",
    ]
    bad = [t for t in tests.get("tests", []) if t["outcome"] in ("failed", "error", "timeout")]
    for t in bad[:40]:
        first = next((ln for ln in reversed(t["message"].splitlines()) if ln.strip().startswith("E ")), "")
        first = first or (t["message"].strip().splitlines() or [""])[-1]
        lines.append(f"- {t['outcome']}: `{t['nodeid']}` {first.strip()[:200]}")
    if len(bad) > 40:
        lines.append(f"- ... {len(bad) - 40} more in tests.json")

    # kernels: one row per (op, mode, shape, dtype), providers side by side
    lines += ["", "## Kernels (median ms per call)", ""]
    for stage, cb in kernels["copy_bandwidth"].items():
        lines.append(f"- copy bandwidth ({stage}): {_f(cb.get('gbps'), 1)} GB/s")
    rows: dict[tuple, dict] = {}
    for r in kernels["results"]:
        key = (r["op"], r["mode"], r["shape_name"], r["dtype"])
        rows.setdefault(key, {})[r["provider"]] = r
    provs = ["torch", "torch_compile", "triton", "triton_graph"]
    if rows:
        lines += [
            "",
            "| op | mode | shape | dtype | " + " | ".join(provs) + " | triton GB/s | triton % copy |"
            " triton speedup |",
            "| --- | --- | --- | --- |" + " ---: |" * (len(provs) + 3),
        ]
        for (op, mode, shape, dtype), by in rows.items():
            tri = by.get("triton") or {}
            lines.append(
                f"| {op} | {mode} | {shape} | {dtype} | "
                + " | ".join(_f(by[p]["median_ms"], 4) if p in by else "-" for p in provs)
                + f" | {_f(tri.get('gbps'), 0)} | {_f(tri.get('pct_copy_bw'), 1)} | "
                f"{_f(tri.get('speedup_vs_torch'), 2)} |"
            )
    else:
        lines.append("no kernel record")

    lines += ["", "## Rollout", ""]
    if rollout["results"]:
        lines += [
            "| model | batch | steps | dtype | provider | img/s | s/rollout | setup s | peak MB | graphs |",
            "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rollout["results"]:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['steps']} | {r['dtype']} | {r['provider']} | "
                f"{_f(r['images_per_s'], 2)} | {_f(r['median_s'], 3)} | {_f(r['setup_s'], 1)} | "
                f"{_f(r['peak_memory_mb'], 0)} | {r['graphs_captured']} |"
            )
    else:
        lines.append("no rollout record")

    lines += ["", "## NFT iteration (e2e)", ""]
    peak = e2e.get("matmul_peak")
    if peak:
        lines.append(f"- measured matmul peak: {peak['tflops']} TFLOP/s ({peak['dtype']}, n={peak['n']})")
    if e2e["results"]:
        base = {r["model"]: r["recipe_iteration_s"] for r in e2e["results"] if r["provider"] == "reference"}
        lines += [
            "",
            "| model | provider | rollout img/s | train samples/s | recipe s/iter | MFU rollout % |"
            " MFU train % | peak GiB rollout / train | speedup |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in e2e["results"]:
            sp = base.get(r["model"])
            lines.append(
                f"| {r['model']} | {r['provider']} | {_f(r['rollout_images_per_s'], 2)} | "
                f"{_f(r['train_samples_per_s'], 2)} | {_f(r['recipe_iteration_s'], 1)} | "
                f"{_f(r['mfu_rollout_pct'], 1)} | {_f(r['mfu_train_pct'], 1)} | "
                f"{_f(r['rollout_peak_gib'], 1)} / {_f(r['train_peak_gib'], 1)} | "
                f"{_f(sp / r['recipe_iteration_s'], 2) if sp else '-'} |"
            )
    else:
        lines.append("no e2e record")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The environment probe (runs in its own process, with the installed wheels on the path)
# ----------------------------------------------------------------------------------------------------------
PACKAGES = (
    "torch",
    "triton",
    "diffusers",
    "transformers",
    "peft",
    "safetensors",
    "numpy",
    "pytest",
    "pytest-benchmark",
    "nvtx",
    "huggingface-hub",
)


def probe_env(path: Path) -> int:
    import importlib
    import importlib.metadata as md

    info: dict = {"problems": []}
    versions = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    info["versions"] = versions
    info["platform"] = platform.platform()
    info["cpu_count"] = os.cpu_count()
    try:
        import torch

        from bench import _common

        env = _common.environment()
        info.update({k: env.get(k) for k in ("device", "git_commit", "cuda", "sm_count", "memory_gib")})
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["capability"] = f"{props.major}.{props.minor}"
            info["l2_mb"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1)
    except Exception as e:
        info["problems"].append(f"torch / bench._common: {type(e).__name__}: {e}")
    for mod in ("kernels", "engine", "models", "train", "diffusers"):
        try:
            m = importlib.import_module(mod)
            info.setdefault("modules", {})[mod] = str(Path(getattr(m, "__file__", "") or "").parent)
        except Exception as e:
            info["problems"].append(f"import {mod}: {type(e).__name__}: {e}")
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["nvidia_smi"] = q.stdout.strip()
            info["driver"] = q.stdout.split(",")[1].strip() if q.stdout.count(",") >= 1 else None
        except Exception as e:
            info["nvidia_smi"] = f"{type(e).__name__}: {e}"
    path.write_text(json.dumps(info, indent=1, default=str) + "\n")
    print(json.dumps(info, indent=1, default=str))
    return 0


# ----------------------------------------------------------------------------------------------------------
# Wheels for the GPU machine
# ----------------------------------------------------------------------------------------------------------
def fetch_wheels(wheel_dir: Path) -> int:
    """Download the wheels the GPU image lacks (``WHEELS``, at the versions installed here) for CPython 3.12
    on manylinux x86_64 into ``wheel_dir``; older versions of the same packages there are removed."""
    import importlib.metadata as md

    specs = []
    for name in WHEELS:
        try:
            specs.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            specs.append(name)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        *WHEEL_PLATFORM,
        "-d",
        str(wheel_dir),
        *specs,
    ]
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        print(f"--fetch-wheels: pip download failed (exit {rc})", file=sys.stderr)
        return rc
    keep = {}
    for spec in specs:
        name = spec.split("==")[0].replace("-", "_").lower()
        ver = spec.split("==")[1] if "==" in spec else None
        keep[name] = ver
    for w in sorted(wheel_dir.glob("*.whl")):
        name, ver = w.name.split("-")[0].lower(), w.name.split("-")[1]
        if name in keep and keep[name] and ver != keep[name]:
            w.unlink()
            print(f"removed {w.name} (another version of {name})")
    total = sum(w.stat().st_size for w in wheel_dir.glob("*.whl"))
    for w in sorted(wheel_dir.glob("*.whl")):
        print(f"  {w.stat().st_size / 2**20:6.1f} MiB  {w.name}")
    print(f'{total / 2**20:.1f} MiB in {wheel_dir}; carry it with the GPU call (carry: ["{wheel_dir.name}"])')
    return 0


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description=__doc__.split("\n")[0],
        epilog="Stages: " + ", ".join(f"{s.name} ({s.gpu_budget_s} s)" for s in STAGES),
    )
    parser.add_argument("out_dir", nargs="?", help="output folder (8 files)")
    parser.add_argument("--dry-run", action="store_true", help="CPU quick modes of every stage (CI)")
    parser.add_argument(
        "--stages",
        default=",".join(SELECTABLE),
        help=f"comma-separated subset of {','.join(SELECTABLE)} (install and env always run; the stages "
        "left out give their time to the chosen ones, a rerun of one stage gets up to the whole 470 s)",
    )
    parser.add_argument("--commit", default=None, help="git commit to record (the GPU copy has no .git)")
    parser.add_argument("--wheel-dir", default=str(ROOT / ".whl"), help="carried wheels (default .whl)")
    parser.add_argument("--site", default=DEFAULT_SITE, help="where the wheels are installed (pip --target)")
    parser.add_argument(
        "--fetch-wheels",
        action="store_true",
        help="download the wheels the GPU image lacks into --wheel-dir, then exit",
    )
    parser.add_argument("--probe-env", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_env:
        return probe_env(Path(args.probe_env))
    if args.fetch_wheels:
        return fetch_wheels(Path(args.wheel_dir))
    if not args.out_dir:
        parser.error("OUT_DIR: expected an output folder, got none")
    chosen = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SELECTABLE]
    if unknown or not chosen:
        parser.error(
            f"--stages: expected comma-separated names from {','.join(SELECTABLE)}, got {args.stages!r}"
        )
    if args.commit is not None and not re.fullmatch(r"[0-9a-fA-F]{7,40}(-dirty)?", args.commit):
        parser.error(f"--commit: expected a git commit hash (7 to 40 hex digits), got {args.commit!r}")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        parser.error(f"OUT_DIR: expected a folder, got the file {out}")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        if foreign:
            parser.error(
                f"OUT_DIR: expected an empty folder or an earlier gpu_check output, got {out} "
                f"holding {foreign[:5]}"
            )
    check = Check(
        out,
        dry_run=args.dry_run,
        stages=("install", "env") + chosen,
        wheel_dir=Path(args.wheel_dir),
        site=Path(args.site),
        commit=args.commit,
    )
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
