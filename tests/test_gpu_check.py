"""bench.gpu_check, kept from rotting without a GPU: its dry run (every stage in its CPU quick mode) writes
the same 8 files with their schema; a stage past its limit is stopped with what it spawned and the next stage
starts; streamed test outcomes survive a stopped process; the CLI refuses bad input before any work."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from bench import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]
GPU_MARK = "pytest.mark." + "gpu"  # spelled apart: bench.gpu_check finds GPU test files by this text


def _wheel(folder: Path, name: str = "nftcheckprobe", version: str = "0.1") -> Path:
    """A minimal pure-Python wheel, so the install stage has something to resolve (nothing is downloaded)."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the whole check (about 1.5 minutes on two idle cores)."""
    base = tmp_path_factory.mktemp("gpu_check")
    wheels = base / "whl"
    wheels.mkdir()
    _wheel(wheels)
    out = base / "out"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", str(out), "--dry-run", "--wheel-dir", str(wheels)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=sum(s.dry_budget_s for s in gc.STAGES) + 120,
    )
    return proc, out, time.monotonic() - t0


def _load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def test_dry_run_writes_every_file_with_its_schema(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gc.OUTPUT_FILES)
    assert all(0 < (out / f).stat().st_size < 16 * 2**20 for f in gc.OUTPUT_FILES)
    for name in gc.OUTPUT_FILES:
        if not name.endswith(".json"):
            continue
        env = _load(out, name)["environment"]
        assert env["mode"] == "dry-run" and env["device"].startswith("cpu")
        assert env["versions"]["torch"] and env["versions"]["python"]
        assert env["git_commit"] and datetime.datetime.fromisoformat(env["date"])

    stages = _load(out, "stages.json")
    assert [s["name"] for s in stages["stages"]] == [s.name for s in gc.STAGES]
    assert {s["name"]: s["status"] for s in stages["stages"]} == {s.name: "ok" for s in gc.STAGES}, stages
    assert stages["total_s"] <= sum(s.dry_budget_s for s in gc.STAGES) + gc.FINALIZE_RESERVE_S
    install = _load(out, "environment.json")["install"]
    assert "nftcheckprobe-0.1-py3-none-any.whl" in install["note"] and "--dry-run" in install["commands"][0]

    tests = _load(out, "tests.json")
    assert tests["counts"] == {"skipped": len(tests["tests"])} and len(tests["tests"]) >= 10  # no CUDA here
    ids = {t["nodeid"] for t in tests["tests"]}
    for check in tests["checks"]:  # every GPU-only claim still names tests that exist
        assert set(check["tests"]) <= ids, check
        assert check["result"] == "skipped"
    assert len(tests["checks"]) == len(gc.CHECKS)

    kernels = _load(out, "kernels.json")
    assert kernels["copy_bandwidth"]["kernels"]["gbps"] > 0
    from bench.bench_kernels import CASES

    eager = {r["op"] for r in kernels["results"] if r["provider"] == "torch" and r["mode"] == "fwd"}
    assert eager == {c.name for c in CASES}
    compiled = [r for r in kernels["results"] if r["provider"] == "torch_compile"]
    assert [(r["op"], r["mode"], r["stage"]) for r in compiled] == [("euler_step", "fwd", "kernels_compile")]
    assert all(r["median_ms"] > 0 and r["gbps"] > 0 for r in kernels["results"])

    rollout = _load(out, "rollout.json")["results"]
    assert rollout and all(r["images_per_s"] > 0 for r in rollout)
    e2e = _load(out, "e2e.json")
    assert e2e["matmul_peak"]["tflops"] > 0
    assert {r["provider"] for r in e2e["results"]} == {"reference", "engine"}
    assert all(r["train_samples_per_s"] > 0 and r["rollout_images_per_s"] > 0 for r in e2e["results"])

    summary = (out / "summary.md").read_text()
    for s in gc.STAGES:
        assert f"| {s.name} | ok |" in summary
    assert "dry-run" in summary and "euler_step" in summary and "sd3-tiny" in summary
    log = (out / "log.txt").read_text()
    assert "===== e2e =====" in log and "===== tests-all =====" in log


def test_gpu_budgets_fit_in_eight_minutes():
    assert sum(s.gpu_budget_s for s in gc.STAGES) + gc.FINALIZE_RESERVE_S <= gc.TOTAL_LIMIT_S == 480


def test_a_stage_past_its_limit_is_stopped_with_what_it_spawned(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    t0 = time.monotonic()
    r = gc.run_command(
        [sys.executable, "-c", code], timeout=3, env=dict(os.environ), log_path=tmp_path / "log"
    )
    assert r["timed_out"] and r["rc"] != 0 and time.monotonic() - t0 < 20
    log = (tmp_path / "log").read_text()
    assert "started" in log and "stopped at the 3 s limit" in log
    child = int(pid_file.read_text())
    time.sleep(0.5)
    assert not _alive(child)  # the grandchild went with its group


def _alive(pid: int) -> bool:
    """Running (a zombie left for a parent that does not reap it counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_next_stage_starts_when_one_fails_or_runs_out_of_time(tmp_path, monkeypatch):
    """Budgets of 3 s each: a stage sleeping past its own budget plus what earlier stages left is stopped,
    a failing stage is recorded, and every later stage still runs and lands in the files."""
    monkeypatch.setattr(gc, "STAGES", tuple(gc.Stage(s.name, 3, 3, s.what) for s in gc.STAGES))
    py = sys.executable
    commands = {
        "env": [py, "-c", "pass"],
        "tests": [py, "-c", "import time; time.sleep(60)"],
        "kernels": [py, "-c", "raise SystemExit(3)"],
        "kernels_compile": [py, "-c", "pass"],
        "rollout": [py, "-c", "pass"],
        "e2e": [py, "-c", "pass"],
    }
    for name, cmd in commands.items():
        monkeypatch.setattr(
            gc.Check,
            f"stage_{name}",
            lambda self, stage, timeout, cmd=cmd: self.simple(stage, timeout, cmd, self.env()),
        )
    check = gc.Check(
        tmp_path / "out",
        dry_run=True,
        stages=tuple(s.name for s in gc.STAGES),
        wheel_dir=tmp_path / "none",
        site=tmp_path / "site",
        commit="abc1234",
    )
    t0 = time.monotonic()
    assert check.run() == 1
    assert time.monotonic() - t0 < 3 * len(gc.STAGES) + 10
    status = {r.name: r.status for r in check.results}
    assert status == {
        "install": "skipped",
        "env": "ok",
        "tests": "timeout",
        "kernels": "failed",
        "kernels_compile": "ok",
        "rollout": "ok",
        "e2e": "ok",
    }
    tests = next(r for r in check.results if r.name == "tests")
    assert 6 <= tests.timeout_s <= 9  # its own 3 s and what install and env left unspent
    stages = _load(tmp_path / "out", "stages.json")
    assert stages["environment"]["git_commit"] == "abc1234"
    assert [s["status"] for s in stages["stages"]] == list(status.values())


def test_streamed_outcomes_of_a_real_pytest_run(tmp_path):
    """Events from pytest itself: pass, fail, skip, a setup error; an unselected test is absent."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: test\n")
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "@pytest.fixture\n"
        "def broken():\n"
        "    raise RuntimeError('setup broke')\n"
        f"@{GPU_MARK}\n"
        "def test_pass():\n"
        "    pass\n"
        f"@{GPU_MARK}\n"
        "def test_fail():\n"
        "    assert 1 == 2, 'one is not two'\n"
        f"@{GPU_MARK}\n"
        "def test_skip():\n"
        "    pytest.skip('no device')\n"
        f"@{GPU_MARK}\n"
        "def test_setup_error(broken):\n"
        "    pass\n"
        "def test_not_gpu():\n"
        "    pass\n"
    )
    stream = tmp_path / "events.jsonl"
    env = dict(
        os.environ, NFT_CHECK_STREAM=str(stream), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONPATH=str(ROOT)
    )
    cmd = gc.pytest_gpu_cmd(
        [str(tmp_path / "test_sample.py"), "--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini")]
    )
    r = gc.run_command(cmd, timeout=120, env=env, log_path=tmp_path / "log")
    assert r["rc"] == 1 and not r["timed_out"], (tmp_path / "log").read_text()
    run = {
        "name": "sample",
        "files": ["test_sample.py"],
        "stream": stream,
        "limit_s": 120,
        **r,
        "command": "",
    }
    got = gc.collect_tests([run])
    outcome = {t["nodeid"].split("::")[1]: t["outcome"] for t in got["tests"]}
    assert outcome == {
        "test_pass": "passed",
        "test_fail": "failed",
        "test_skip": "skipped",
        "test_setup_error": "error",
    }
    messages = {t["nodeid"].split("::")[1]: t["message"] for t in got["tests"]}
    assert "one is not two" in messages["test_fail"] and "setup broke" in messages["test_setup_error"]
    assert "no device" in messages["test_skip"]
    assert got["files"][0]["finished"] and got["files"][0]["status"] == "failed"


def test_a_stopped_process_keeps_what_finished(tmp_path):
    """Events cut off by a stop: the running test is a timeout, collected ones that never started are 'not
    run', a half-written last line is dropped, and tests of another process keep their outcome."""
    ids = [f"tests/x/test_a.py::test_{i}" for i in range(4)]
    stopped = tmp_path / "a.jsonl"
    lines = [
        {"event": "collected", "nodeids": ids[:3]},
        {"event": "start", "nodeid": ids[0]},
        {
            "event": "report",
            "nodeid": ids[0],
            "when": "call",
            "outcome": "passed",
            "duration": 0.5,
            "message": "",
        },
        {"event": "start", "nodeid": ids[1]},
    ]
    stopped.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"event": "rep')
    other = tmp_path / "b.jsonl"
    other.write_text(
        json.dumps({"event": "collected", "nodeids": ids[3:]})
        + "\n"
        + json.dumps(
            {
                "event": "report",
                "nodeid": ids[3],
                "when": "call",
                "outcome": "failed",
                "duration": 1.0,
                "message": "E   assert 0",
            }
        )
        + "\n"
        + json.dumps({"event": "finish", "exitstatus": 1})
        + "\n"
    )
    runs = [
        {
            "name": "a",
            "files": ["tests/x/test_a.py"],
            "stream": stopped,
            "rc": -15,
            "seconds": 9.0,
            "timed_out": True,
            "limit_s": 9.0,
            "command": "",
        },
        {
            "name": "b",
            "files": ["tests/x/test_a.py"],
            "stream": other,
            "rc": 1,
            "seconds": 2.0,
            "timed_out": False,
            "limit_s": 9.0,
            "command": "",
        },
    ]
    got = gc.collect_tests(runs, universe=ids)
    assert [t["outcome"] for t in got["tests"]] == ["passed", "timeout", "not run", "failed"]
    assert got["counts"] == {"passed": 1, "timeout": 1, "not run": 1, "failed": 1}
    assert [f["status"] for f in got["files"]] == ["timeout", "failed"]
    assert got["files"][0]["counts"] == {"passed": 1, "timeout": 1, "not run": 1}
    checks = gc.evaluate_checks(got["tests"])
    assert all(c["result"] == "not run" for c in checks)


def test_big_files_run_in_parts_small_ones_per_test_and_every_test_once():
    big = [f"tests/k/test_big.py::test_{i}" for i in range(50)]
    mid = [f"tests/k/test_mid.py::test_{i}" for i in range(10)]
    small = ["tests/k/test_small.py::test_a", "tests/k/test_small.py::test_b"]
    groups = gc.plan_test_groups(
        ["tests/k/test_big.py", "tests/k/test_mid.py", "tests/k/test_small.py", "tests/k/test_broken.py"],
        {"tests/k/test_big.py": big, "tests/k/test_mid.py": mid, "tests/k/test_small.py": small},
        chunk=24,
        single_max=4,
    )
    names = [
        "test_big-1of3",
        "test_big-2of3",
        "test_big-3of3",
        "test_mid",
        "test_small-1of2",
        "test_small-2of2",
        "test_broken",
    ]
    assert [g["name"] for g in groups] == names
    assert [t for g in groups[:3] for t in g["targets"]] == big
    assert max(len(g["targets"]) for g in groups[:3]) <= 24
    assert groups[3]["targets"] == ["tests/k/test_mid.py"]
    assert [g["targets"] for g in groups[4:6]] == [[small[0]], [small[1]]]
    assert groups[6]["targets"] == ["tests/k/test_broken.py"]
    assert gc.plan_test_groups(["a.py", "b.py"], None, None) == [
        {"name": "all", "files": ["a.py", "b.py"], "targets": ["a.py", "b.py"]}
    ]


def test_gpu_test_files_cover_the_checks():
    files = gc.gpu_test_files()
    assert "tests/kernels/test_gpu.py" in files and "tests/train/test_bf16_lora.py" in files
    assert "tests/test_gpu_check.py" not in files
    for _, nodeids in gc.CHECKS:
        assert all(n.split("::")[0] in files for n in nodeids)


def test_two_versions_of_one_wheel_are_refused_before_installing(tmp_path):
    _wheel(tmp_path, version="0.1")
    _wheel(tmp_path, version="0.2")
    check = gc.Check(
        tmp_path / "out",
        dry_run=False,
        stages=("install",),
        wheel_dir=tmp_path,
        site=tmp_path / "site",
        commit=None,
    )
    res = check.stage_install(gc.STAGES[0], 20)
    assert (
        res.status == "error" and "expected one wheel per package" in res.note and "nftcheckprobe" in res.note
    )
    assert not (tmp_path / "site").exists() and not check.site_ready


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "OUT_DIR: expected an output folder, got none"),
        (["{out}", "--stages", "tests,gpu"], "--stages: expected comma-separated names from tests,kernels"),
        (["{out}", "--commit", "not-a-sha"], "--commit: expected a git commit hash"),
        (["{file}"], "OUT_DIR: expected a folder, got the file"),
        (["{busy}"], "OUT_DIR: expected an empty folder or an earlier gpu_check output"),
    ],
)
def test_bad_input_is_refused_before_any_work(tmp_path, capsys, argv, needle):
    (tmp_path / "file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    paths = {"out": tmp_path / "out", "file": tmp_path / "file", "busy": tmp_path / "busy"}
    with pytest.raises(SystemExit) as e:
        gc.main([a.format(**paths) for a in argv])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
