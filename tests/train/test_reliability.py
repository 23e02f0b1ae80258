"""Nothing lost, nothing silent (issue 26): a run directory has one owner, damaged checkpoints are detected
and skipped, metrics survive a crash, SIGTERM checkpoints like Ctrl-C, and every option is validated before
work.

Each test names the item of the issue it covers.  The runs are train.nft on the embedded default at a tiny
size (2 prompts x 4 images, rollout micro-batches of 2, a checkpoint every iteration, evaluation at iteration
0 and at the end); one uninterrupted 3-iteration run is the reference every interrupted, damaged or resumed
run must reproduce.  Runs in this process and the one subprocess run the same PyTorch reference kernels on one
torch thread (the tiny preset's), which is what makes their numbers bit-identical on one machine.
"""

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kernels
import train.ddpo as ddpo
import train.grpo as grpo
import train.nft as nft
from train import common
from train.evaluation import Evaluator
from train.loop import Trainer
from train.policy import Policy

from .test_nft import _strip  # rows without their timings: how the NFT tests compare runs

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--sample.prompts-per-iter",
    "2",
    "--sample.images-per-prompt",
    "4",
    "--sample.rollout-batch",
    "2",
    "--train.batch-size",
    "8",
    "--eval.num-prompts",
    "6",
    "--log.checkpoint-every",
    "1",
    "--log.progress",
    "false",
]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _assert_same_run(run: Path, ref: Path) -> None:
    """Bit-identical metric rows (rewards, losses, KL, evaluation scores) and adapters (trained, old, EMA)."""
    assert _strip(common.read_metrics(run)) == _strip(common.read_metrics(ref))
    a = torch.load(common.latest_checkpoint(run), weights_only=False)
    b = torch.load(common.latest_checkpoint(ref), weights_only=False)
    assert a["iteration"] == b["iteration"]
    assert _equal(a["policy"], b["policy"])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _require_handler(sig) -> None:
    """Send a stop signal to this process only where the code under test handles it (else it would end
    pytest, or raise KeyboardInterrupt into it, instead of failing the test)."""
    if signal.getsignal(sig) in (signal.SIG_DFL, signal.SIG_IGN, None, signal.default_int_handler):
        pytest.fail(f"{signal.Signals(sig).name} is not handled during the run")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    with kernels.use_backend("reference"):  # a module fixture runs outside the conftest's per-test one
        assert nft.main(["--run-dir", str(run), *TINY, "--max-iters", "3"]) == 0
    return run


def _main(argv) -> tuple[int, str]:
    """``train.nft`` in this process -> ``(exit code, stderr)``."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = nft.main(argv)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory) -> dict:
    """``python -m train.nft`` as a subprocess (up to 50 iterations), stopped with SIGTERM once its first
    iteration is logged; while it runs, three other writers try its directory."""
    run = tmp_path_factory.mktemp("sigterm") / "run"
    log = run.parent / "out.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # the PyTorch reference kernels, as the runs in this process
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "train.nft", "--run-dir", str(run), *TINY, "--max-iters", "50"],
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )

        def wait_for(cond, what):
            deadline = time.time() + 300
            while not cond():
                assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()}"
                assert time.time() < deadline, f"no {what} after 300 s:\n{log.read_text()}"
                time.sleep(0.1)

        try:
            wait_for(lambda: (run / "config.json").exists(), "config.json")
            second = {
                "resume": _main(["--resume", str(run), "--max-iters", "2"]),
                "overwrite": _main(["--run-dir", str(run), *TINY, "--overwrite", "--max-iters", "2"]),
                "fresh": _main(["--run-dir", str(run), *TINY, "--max-iters", "2"]),
            }
            wait_for(
                lambda: (
                    any("train/loss" in r for r in common.read_metrics(run))
                    if (run / "metrics.jsonl").exists()
                    else False
                ),
                "iteration 1",
            )
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"run": run, "rc": rc, "out": log.read_text(), "second": second, "pid": proc.pid}


# --- 1. --resume DIR acts on DIR ----------------------------------------------------------------------------
def test_resume_acts_on_the_directory_given_copied_or_moved(reference, tmp_path, capsys):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in reference.rglob("*") if p.is_file()}
    copy = _copy(reference, tmp_path / "copy")
    assert nft.main(["--resume", str(copy), "--max-iters", "3"]) == 0
    assert f"the run continues in {copy}" in capsys.readouterr().out
    assert json.loads((copy / "config.json").read_text())["run_dir"] == str(copy)
    moved = copy.rename(tmp_path / "moved")  # the directory it was copied to is gone
    assert nft.main(["--resume", str(moved), "--max-iters", "3"]) == 0
    assert json.loads((moved / "config.json").read_text())["run_dir"] == str(moved)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in reference.rglob("*") if p.is_file()}
    assert after == before  # the original run was not touched


# --- 2. one owner -------------------------------------------------------------------------------------------
def test_two_writers_the_second_is_refused_by_name(sigterm_run):
    pid = sigterm_run["pid"]
    for name in ("resume", "overwrite"):
        code, err = sigterm_run["second"][name]
        assert code == 2 and f"locked by pid {pid} on host" in err, (name, err)
    code, err = sigterm_run["second"]["fresh"]
    assert code == 2 and "which holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (sigterm_run["run"] / ".lock").read_text() == ""  # released when the run ended


def test_run_killed_before_its_first_checkpoint_resumes_from_the_start(reference, tmp_path, capsys):
    """What SIGKILL during iteration 1 leaves: config.json, the iteration-0 evaluation row, a row cut short,
    no checkpoint, and the dead run's lock file."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(reference / "config.json", run / "config.json")
    rows0 = [ln for ln in (reference / "metrics.jsonl").read_text().splitlines() if '"iteration": 0,' in ln]
    (run / "metrics.jsonl").write_text("\n".join(rows0) + '\n{"iteration": 1, "elapsed_s": 4')
    (run / ".lock").write_text("pid 999999 on host elsewhere, started 2026-12-03T10:00:00\n")
    # a new run is not started into it: it holds a run
    assert nft.main(["--run-dir", str(run), *TINY, "--max-iters", "1"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert nft.main(["--resume", str(run), "--max-iters", "1"]) == 0
    err = capsys.readouterr().err
    assert "pid 999999 on host elsewhere" in err and "starting it over" in err
    rows = common.read_metrics(run)
    assert [r["iteration"] for r in rows] == [0, 1, 1]  # one iteration-0 evaluation, not two
    ref = common.read_metrics(reference)
    assert _strip(rows[:2]) == _strip(ref[:2])


# --- 3. checkpoints you can trust ---------------------------------------------------------------------------
def test_flipped_bytes_in_the_latest_checkpoint_are_detected(reference, tmp_path, capsys):
    run = _copy(reference, tmp_path / "run")
    ck = run / "checkpoints" / "iter_000003.pt"
    data = bytearray(ck.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    ck.write_bytes(bytes(data))
    assert nft.main(["--resume", str(run), "--max-iters", "3"]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {ck} is damaged" in err and "SHA-256" in err
    _assert_same_run(run, reference)  # iteration 3 done again from iteration 2's checkpoint


def test_truncated_empty_and_unpointed_checkpoints_are_reported_by_path(tmp_path):
    run = common.prepare_run_dir(tmp_path / "r", algo="t")
    ckdir = run / "checkpoints"
    for it in (1, 2):
        common.save_checkpoint(run, it, {"iteration": it, "w": torch.arange(4096.0)})
    ck1, ck2 = ckdir / "iter_000001.pt", ckdir / "iter_000002.pt"
    good = ck2.read_bytes()
    damages = {
        "truncated": lambda: ck2.write_bytes(good[: len(good) // 2]),
        "empty": lambda: ck2.write_bytes(b""),
        "truncated, no checksum": lambda: (
            ck2.write_bytes(good[: len(good) // 2]),
            (ckdir / "iter_000002.pt.sha256").unlink(),
        ),
    }
    for name, damage in damages.items():
        common.save_checkpoint(run, 2, {"iteration": 2, "w": torch.arange(4096.0)})
        damage()
        said = []
        assert common.load_checkpoint(run, report=said.append)["iteration"] == 1, name
        assert any(f"checkpoint {ck2} is damaged" in m for m in said), (name, said)
        assert common.intact_checkpoint(run) == ck1, name
    common.save_checkpoint(run, 2, {"iteration": 2, "w": torch.arange(4096.0)})
    (ckdir / "latest").write_text("")
    said = []
    assert common.load_checkpoint(run, report=said.append)["iteration"] == 2
    assert any(f"{ckdir / 'latest'} is empty" in m for m in said)
    ck1.write_bytes(b"")
    ck2.write_bytes(b"\0" * 100)
    with pytest.raises(common.CheckpointError) as e:
        common.load_checkpoint(run, report=lambda m: None)
    assert str(ck1) in str(e.value) and str(ck2) in str(e.value)
    assert common.intact_note(run).startswith("no checkpoint")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no process group
def test_damaged_fsdp_shard_is_detected(tmp_path):
    """An FSDP2 checkpoint directory carries the SHA-256 of each of its files (written by rank 0 once every
    rank's shards are in); one flipped byte in a shard sends the resume to the previous checkpoint."""
    run = common.prepare_run_dir(tmp_path / "r", algo="t")
    for it in (1, 2):
        sharded = {"default": {"0": torch.arange(5000.0) * it}}
        meta = {"iteration": it}
        common.save_sharded_checkpoint(run, it, sharded, meta, is_main=True, barrier=lambda: None)
    shard = next((run / "checkpoints" / "iter_000002.dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    said = []
    state = common.load_checkpoint(run, report=said.append)
    assert state["meta"]["iteration"] == 1 and state["dcp_path"].name == "iter_000001.dcp"
    assert any(f"{shard.name} does not match its SHA-256" in m and "iter_000002.dcp" in m for m in said)


# --- 4. metrics that survive a crash, and a full disk -------------------------------------------------------
def test_truncated_last_metrics_line_is_dropped_on_resume(reference, tmp_path, capsys):
    """A crash while iteration 3's checkpoint was being written, and its last row cut short."""
    run = _copy(reference, tmp_path / "run")
    ckdir = run / "checkpoints"
    for p in (ckdir / "iter_000003.pt", ckdir / "iter_000003.pt.sha256"):
        p.unlink()
    (ckdir / "latest").write_text("iter_000002.pt")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"iteration": 4, "elapsed_s": 12.5, "train/rew')
    assert nft.main(["--resume", str(run), "--max-iters", "3"]) == 0
    assert "dropped its last line, which is not a whole JSON row" in capsys.readouterr().err
    _assert_same_run(run, reference)  # the rows of iteration 3 logged once


def test_full_disk_is_one_sentence_naming_the_intact_checkpoint(reference, tmp_path, capsys):
    run = _copy(reference, tmp_path / "run")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, hard))  # a checkpoint takes about 5 MB
    try:
        code = nft.main(["--resume", str(run), "--max-iters", "4"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    intact = run / "checkpoints" / "iter_000003.pt"
    assert f"writing {run / 'checkpoints' / 'iter_000004.pt'} failed: File too large" in errors[0]
    assert f"the last intact checkpoint is {intact}" in errors[0]
    assert common.load_checkpoint(run)["iteration"] == 3
    assert not list((run / "checkpoints").glob(".*.tmp"))


# --- 5. --resume options and config.json --------------------------------------------------------------------
def test_resume_options_are_applied_or_refused_by_name(reference, tmp_path, capsys):
    run = _copy(reference, tmp_path / "run")
    for argv, needle in (
        (["--train.lr", "5"], "--train.lr: cannot change on --resume"),
        (["--seed", "9"], "--seed: cannot change on --resume"),
        (["--models.lora-rank", "4"], "--models.lora-rank: cannot change on --resume"),
        (["--overwrite"], "--overwrite: starts a new run"),
    ):
        assert nft.main(["--resume", str(run), "--max-iters", "3", *argv]) == 2, argv
        assert needle in capsys.readouterr().err
    rows = (run / "metrics.jsonl").read_text()
    assert nft.main(["--resume", str(run), "--max-iters", "3", "--threads", "2"]) == 0
    assert "resume: applying --threads 1 -> 2" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["threads"] == 2
    assert (run / "metrics.jsonl").read_text() == rows  # the run had ended: nothing added


def test_config_json_that_does_not_match_the_checkpoint_is_refused(reference, tmp_path, capsys):
    run = _copy(reference, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["models"]["lora_rank"] = 16
    (run / "config.json").write_text(json.dumps(cfg))
    assert nft.main(["--resume", str(run), "--max-iters", "3"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.json'}: expected the config the checkpoint" in err
    assert "models.lora_rank is 16 there but 32 in the checkpoint" in err
    (run / "config.json").write_text('{"preset": "tiny",')
    assert nft.main(["--resume", str(run), "--max-iters", "3"]) == 2
    assert (
        f"{run / 'config.json'}: expected the run's JSON config, got invalid JSON" in capsys.readouterr().err
    )


# --- 6. signals ---------------------------------------------------------------------------------------------
def test_sigterm_checkpoints_exits_3_and_resumes_bit_identical(sigterm_run, reference):
    run, out = sigterm_run["run"], sigterm_run["out"]
    assert sigterm_run["rc"] == common.INTERRUPTED_EXIT, out
    assert "SIGTERM" in out and "interrupted: checkpoint of iteration" in out and "Traceback" not in out
    it = common.load_checkpoint(run)["iteration"]
    assert 1 <= it <= 2
    rows = common.read_metrics(run)
    assert max(r["iteration"] for r in rows) == it
    assert [r["iteration"] for r in rows if "eval/score" in r] == [0]  # no off-schedule evaluation
    assert nft.main(["--resume", str(run), "--max-iters", "3"]) == 0
    _assert_same_run(run, reference)


def test_stop_signal_during_a_rollout_abandons_it(reference, tmp_path, monkeypatch, capsys):
    """SIGTERM in the middle of iteration 2's rollout: the rollout is dropped at the next micro-batch,
    iteration 1 is checkpointed; resumed, the run is the uninterrupted one.  The run starts over
    (``--overwrite``) in a directory holding another run: none of that run's rows remain."""
    run = _copy(reference, tmp_path / "run")
    state = {"armed": False, "sent": False}
    plan, sample = Trainer.iteration_plan, Policy.sample

    def iteration_plan(self, it):
        state["armed"] = it == 2 and not state["sent"]
        return plan(self, it)

    def sample_then_signal(self, *args, **kwargs):
        out = sample(self, *args, **kwargs)
        if state["armed"]:
            state["armed"], state["sent"] = False, True
            _require_handler(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "iteration_plan", iteration_plan)
    monkeypatch.setattr(Policy, "sample", sample_then_signal)
    code = nft.main(["--run-dir", str(run), *TINY, "--overwrite", "--max-iters", "3"])
    captured = capsys.readouterr()
    assert code == common.INTERRUPTED_EXIT and state["sent"]
    assert "SIGTERM: iteration 2's rollout abandoned" in captured.out
    assert common.load_checkpoint(run)["iteration"] == 1
    assert [r["iteration"] for r in common.read_metrics(run)] == [0, 1]
    assert nft.main(["--resume", str(run), "--max-iters", "3"]) == 0
    _assert_same_run(run, reference)


def test_ctrl_c_during_the_first_evaluation(tmp_path, monkeypatch, capsys):
    """One Ctrl-C: the evaluation finishes, iteration 0 is checkpointed, exit code 3 (never 0)."""
    run_eval, sent = Evaluator.run, []

    def run_then_signal(self, *args, **kwargs):
        if not sent:
            sent.append(1)
            _require_handler(signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return run_eval(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "run", run_then_signal)
    run = tmp_path / "run"
    assert nft.main(["--run-dir", str(run), *TINY, "--max-iters", "3"]) == common.INTERRUPTED_EXIT
    assert (
        f"interrupted: checkpoint of iteration 0 written to {run / 'checkpoints'}" in capsys.readouterr().out
    )
    assert common.load_checkpoint(run)["iteration"] == 0
    assert [r["iteration"] for r in common.read_metrics(run)] == [0]


def test_sigusr1_asks_for_a_stop_like_sigterm_and_handlers_are_restored(capsys):
    """SLURM's advance warning (``--signal=USR1@120``) is a stop request too; a second signal of any kind
    aborts with the shell's code for it."""
    before = {s: signal.getsignal(s) for s in common.STOP_SIGNALS}
    with common.GracefulInterrupt() as g:
        _require_handler(signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert g.requested and g.signame == "SIGUSR1"
        with pytest.raises(common.Aborted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert "SIGUSR1: finishing this iteration" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in common.STOP_SIGNALS} == before


def test_a_second_signal_aborts(tmp_path, monkeypatch, capsys):
    def run_then_signal_twice(self, *args, **kwargs):
        _require_handler(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the second signal's handler raises here at the latest
        raise AssertionError("the second SIGTERM did not abort")

    monkeypatch.setattr(Evaluator, "run", run_then_signal_twice)
    assert nft.main(["--run-dir", str(tmp_path / "run"), *TINY, "--max-iters", "3"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "aborted by a second SIGTERM: no checkpoint has been written yet" in err


# --- 7. options validated before any work -------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--train.grad-clip", "-1"], "--train.grad-clip: expected a value > 0, got -1.0"),
        (["--threads", "100000"], "--threads: expected at most "),
        (["--eval.num-prompts", "-1"], "--eval.num-prompts: expected an integer >= 0 (0: all), got -1"),
        (["--sample.images-per-prompt", "1"], "--sample.images-per-prompt: expected an integer >= 2"),
        (["--max-minutes", "-5"], "--max-minutes: expected a value > 0 (or none: no limit), got -5.0"),
        (["--max-iters", "0"], "--max-iters: expected an integer >= 1 (or none: no limit), got 0"),
        (["--max-iters", "-1"], "--max-iters: expected an integer >= 1 (or none: no limit), got -1"),
        (["--train.beta", "nan"], "--train.beta: expected a finite number, got nan"),
        (["--eval.images-per-prompt", "0"], "--eval.images-per-prompt: expected an integer >= 1, got 0"),
        (["--train.lr", "-1"], "--train.lr: expected a value >= 0 (0: a control run), got -1.0"),
        (["--reward-weights", "inf"], "--reward-weights: expected a finite number, got inf"),
        (["--sample.solver", "flow-sde", "--sample.noise-level", "-1"],
         "--sample.noise-level: expected a value >= 0, got -1.0"),
        (["--sample.guidance-scale", "-1"],
         "--sample.guidance-scale: expected a value >= 0 (1: none), got -1.0"),
        (["--models.resolution", "0"], "--models.resolution: expected an integer >= 1, got 0"),
        (["--reward-clip-path", "/m/clip"],
         "--reward-clip-path: the CLIP of the clip_score reward; expected it with clip_score in --reward or "
         "--eval.rewards, got it with "),
        (["--eval-prompts", "test.txt"], "--eval-prompts: a --model run's prompt file; the embedded default "
         "uses GenEval-mini's own prompts (--tasks picks task types), expected none, got 'test.txt'"),
        (["--reward-vlm-model", "m"], "--reward-vlm-model: the model of the vlm_judge reward; expected it"),
        (["--reward-paths", "aesthetic_head=/m/head.pth"],
         "--reward-paths: expected entries for the rewards this run uses ("),
        (["--models.attention", "bogus"],
         "--models.attention: expected 'auto', 'sdpa', 'flash', 'xformers' or a diffusers "
         "AttentionBackendName value, got 'bogus'"),
        (["--models.lora-init", "pissa"], "--models.lora-init: expected gaussian (A ~ N(0, 1/r), B = 0, the "
         "references' init) or true (peft's default: A Kaiming-uniform, B = 0), got 'pissa'"),
        (["--models.resolution", "64"],
         "--models.resolution: sets a --model run's image size; the embedded default samples at its "
         "checkpoint's own size (32x32 for the shipped ones), expected it unset, got 64"),
        (["--train.old-flat", "-1"], "--train.old-flat: expected an integer >= 0, got -1"),
        (["--train.old-uprate", "-0.1"], "--train.old-uprate: expected a value >= 0, got -0.1"),
        (["--train.old-uphold", "2"], "--train.old-uphold: expected a value in [0, 1], got 2.0"),
    ],
)
def test_bad_option_is_refused_before_any_work(tmp_path, capsys, argv, needle):
    run = tmp_path / "r"
    assert nft.main(["--run-dir", str(run), *TINY, "--max-iters", "1", *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not run.exists()  # not even the run directory was created


def test_no_grid_with_grid_images_0(tmp_path, capsys):
    """``--eval.grid-images 0`` writes the evaluation records and no grid (it crashed stacking no images)."""
    run = tmp_path / "r"
    assert nft.main(["--run-dir", str(run), *TINY, "--max-iters", "1", "--eval.grid-images", "0"]) == 0
    samples = run / "samples"
    written = sorted(p.name for p in samples.iterdir())
    assert written == ["base_cfg.json", "iter_000000.json", "iter_000001.json"]
    assert f"samples: {samples}\n" in capsys.readouterr().out


@pytest.mark.parametrize(
    "module, argv, needle",
    [
        ("grpo", ["--sample.eta", "-1"], "--sample.eta: expected a value >= 0, got -1.0"),
        ("ddpo", ["--sample.guidance-scale", "-2"],
         "--sample.guidance-scale: expected a value >= 0 (1: none)"),
        ("d3po", ["--sample.eta", "-0.5"], "--sample.eta: expected a value >= 0, got -0.5"),
        ("dpo", ["--sample.noise-level", "-1"], "--sample.noise-level: expected a value >= 0, got -1.0"),
        ("nabla_gfn", ["--sample.noise-level", "-1"],
         "--sample.noise-level: expected a value >= 0, got -1.0"),
        ("nabla_gfn", ["--train.timestep-fraction", "inf"],
         "--train.timestep-fraction: expected a finite number, got inf"),
        ("alignprop", ["--models.resolution", "-1"],
         "--models.resolution: expected an integer >= 1, got -1"),
    ],
)
def test_negative_sampler_values_are_refused_before_any_work(tmp_path, capsys, module, argv, needle):
    """Each of these once passed validation and failed after the base evaluation (the solver's own check, an
    OverflowError) or not at all (a resolution the embedded default ignores)."""
    import importlib

    run = tmp_path / "r"
    main = importlib.import_module(f"train.{module}").main
    assert main(["--run-dir", str(run), "--max-iters", "1", *argv]) == 2
    assert needle in capsys.readouterr().err and not run.exists()


def test_every_loop_validates_the_shared_options(tmp_path, capsys):
    run = ["--run-dir", str(tmp_path / "r"), "--max-iters", "1"]
    assert grpo.main([*run, "--sample.images-per-prompt", "1"]) == 2
    assert "--sample.images-per-prompt: expected an integer >= 2" in capsys.readouterr().err
    assert ddpo.main([*run, "--train.grad-clip", "0"]) == 2
    assert "--train.grad-clip: expected a value > 0, got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_stop_before_the_first_checkpoint_names_none(tmp_path, monkeypatch, capsys):
    loss = kernels.nft_loss
    monkeypatch.setattr(kernels, "nft_loss", lambda *a, **k: loss(*a, **k) * float("nan"))
    run = tmp_path / "r"
    assert nft.main(["--run-dir", str(run), *TINY, "--max-iters", "2"]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "no checkpoint has been written yet" in err and "intact" not in err


# --- 8. temporary files of killed writes --------------------------------------------------------------------
def test_stale_temporary_files_are_removed_at_start(reference, tmp_path, capsys):
    run = _copy(reference, tmp_path / "run")
    ckdir = run / "checkpoints"
    stale = [
        ckdir / ".iter_000004.pt.k2j3x9.tmp",
        ckdir / ".latest.8f0a1b.tmp",
        ckdir / "iter_000004.pt.sha256",  # the checksum of a checkpoint that never appeared
        run / ".metrics.jsonl.q1w2e3.tmp",
    ]
    for p in stale:
        p.write_bytes(b"x" * 100)
    (ckdir / ".iter_000004.dcp.tmp").mkdir()
    (ckdir / ".iter_000004.dcp.tmp" / "__0_0.distcp").write_bytes(b"x")
    assert nft.main(["--resume", str(run), "--max-iters", "3"]) == 0
    assert "removed 5 temporary file(s) of an interrupted write" in capsys.readouterr().err
    assert not any(p.exists() for p in stale) and not (ckdir / ".iter_000004.dcp.tmp").exists()
    assert sorted(p.name for p in ckdir.iterdir()) == [
        "iter_000002.pt",
        "iter_000002.pt.sha256",
        "iter_000003.pt",
        "iter_000003.pt.sha256",
        "latest",
    ]


@pytest.mark.parametrize("init", ["gaussian", "true"])
def test_lora_inits_start_at_the_base_model(init):
    """Both ``--models.lora-init`` values leave B = 0 in every adapter (each starts as the base model); A is
    N(0, 1/r) for gaussian and Kaiming-uniform (bounded by 1/sqrt(fan_in)) for true."""
    from train.policy import ModelConfig, build_policy

    policy = build_policy(ModelConfig(lora_init=init), preset="tiny", model_path=None,
                          device=torch.device("cpu"), seed=0)  # fmt: skip
    named = dict(policy.transformer.named_parameters())
    a = [p for n, p in named.items() if "lora_A" in n]
    b = [p for n, p in named.items() if "lora_B" in n]
    assert a and b and all(not p.any() for p in b)
    bound = max(float(p.detach().abs().max() * p.shape[1] ** 0.5) for p in a)
    if init == "true":
        assert bound <= 1.0 + 1e-6  # kaiming_uniform_(a=sqrt(5)): |A| <= 1/sqrt(fan_in)
    else:
        assert bound > 1.0


def test_a_run_that_fails_to_build_leaves_its_directory_reusable(tmp_path, capsys):
    """``--models.lora-targets`` naming no layer of the model fails when the adapters are added (the names
    depend on the model), by name; the new run directory is left without a run in it, so the corrected
    command runs there without ``--overwrite``."""
    run = tmp_path / "r"
    assert nft.main(["--run-dir", str(run), *TINY, "--max-iters", "1", "--models.lora-targets", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "--models.lora-targets: expected linear layers of the SD3Transformer2DModel, such as attn." in err
    assert "got bogus" in err
    left = [n for n in ("config.json", "checkpoints", "samples", "metrics.jsonl") if (run / n).exists()]
    assert not left
    assert nft.main(["--run-dir", str(run), *TINY, "--max-iters", "1"]) == 0


def test_a_run_started_with_an_option_now_refused_as_ignored_still_resumes(tmp_path, monkeypatch, capsys):
    """Runs started before the ignored-option checks (a --reward-clip-path without clip_score, a prompt
    file on the embedded default) keep their config on --resume: a new run with the same options is refused,
    the old one continues."""
    import train.loop as loop

    run = tmp_path / "r"
    ignored = ["--reward-clip-path", "/m/clip", "--eval-prompts", "test.txt"]
    with monkeypatch.context() as m:  # the run as the code before the checks started it
        m.setattr(loop, "check_reward_options_used", lambda cfg, used: None)
        m.setattr(loop, "check_no_prompt_files", lambda cfg: None)
        assert nft.main(["--run-dir", str(run), *TINY, "--max-iters", "1", *ignored]) == 0
    assert nft.main(["--run-dir", str(tmp_path / "new"), *TINY, "--max-iters", "1", *ignored]) == 2
    assert "--eval-prompts: a --model run's prompt file" in capsys.readouterr().err
    assert nft.main(["--resume", str(run), "--max-iters", "2"]) == 0
    rows = [r for r in common.read_metrics(run) if "train/loss" in r]
    assert [r["iteration"] for r in rows] == [1, 2]


@pytest.mark.parametrize(
    "module, argv, needle",
    [
        (nft, ["--sample.noise-level", "0.9"],
         "--sample.noise-level: acts on the flow-sde and cps rollouts; with --sample.solver dpm2 it changes "
         "nothing, expected it unset, got 0.9"),
        (grpo, ["--sample.solver", "flow-sde", "--sample.cps-log-prob", "gaussian"],
         "--sample.cps-log-prob: acts on the cps rollouts; with --sample.solver flow-sde it changes nothing"),
        (ddpo, ["--sample.solver", "flow-sde", "--sample.eta", "0.3"],
         "--sample.eta: acts on the ddim rollouts; with --sample.solver flow-sde it changes nothing"),
    ],
    ids=["nft-noise-level", "grpo-cps-log-prob", "ddpo-eta"],
)
def test_a_sampler_option_the_sampler_ignores_is_refused(tmp_path, capsys, monkeypatch, module, argv, needle):
    """A ``--sample`` option that the chosen rollout sampler does not read is refused by name before any
    work; with a sampler that reads it, the same value is taken."""
    import train.loop as loop

    run = tmp_path / "r"
    assert module.main(["--run-dir", str(run), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not run.exists()

    class Reached(BaseException):
        pass

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(loop, "_run", reached)
    fitting = {"--sample.noise-level": "flow-sde", "--sample.cps-log-prob": "cps", "--sample.eta": "ddim"}
    option = next(a for a in argv if a in fitting)
    if fitting[option] != "ddim":  # ddim needs a UNet (--model): the embedded default is a flow model
        with pytest.raises(Reached):
            module.main(["--run-dir", str(run), *argv, "--sample.solver", fitting[option]])
