"""Scale-out on CPU with gloo: the group-aware sampler, 1-vs-2-process equivalence under torchrun (DDP and
FSDP2), resume on another world size, and a killed rank ending the job instead of hanging it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import common
from train.config import ConfigError
from train.distributed import Dist, IterationPlan

from .._shared import shared

ROOT = Path(__file__).resolve().parents[2]

# 4 prompts x 4 images = 16 per iteration, 4 sampler steps, 8 held-out prompts: a few seconds an iteration
SMALL = [
    "--reward",
    "jpeg_compressibility",
    "--sample.prompts-per-iter",
    "4",
    "--sample.images-per-prompt",
    "4",
    "--sample.num-steps",
    "4",
    "--sample.rollout-batch",
    "8",
    "--eval.num-prompts",
    "8",
    "--eval.num-steps",
    "4",
    "--eval.every",
    "2",
    "--eval.grid-images",
    "4",
    "--log.checkpoint-every",
    "1",
    "--log.progress",
    "false",
]


# ---------------------------------------------------------------------------------------------- the sampler
def _plan(world, rank, n_prompts=6, k=4, per_rank_step=2, seed=0):
    prompts = [f"p{i}" for i in range(n_prompts) for _ in range(k)]
    group_ids = torch.arange(n_prompts).repeat_interleave(k)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    return IterationPlan.build(
        prompts,
        group_ids,
        list(range(len(prompts))),
        order=order,
        per_rank_step=per_rank_step,
        rank=rank,
        world=world,
    )


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 8, 12])
def test_sampler_partitions_the_batch_and_keeps_groups_whole(world):
    """Every image lands on exactly one rank, in equal shares; all-gathering the ranks' rewards rebuilds the
    global batch, so every prompt group is whole when advantages are computed."""
    plans = [_plan(world, r) for r in range(world)]
    owned = torch.cat([p.local for p in plans])
    assert sorted(owned.tolist()) == list(range(24))
    assert {len(p.local) for p in plans} == {24 // world}
    rewards = torch.arange(24, dtype=torch.float32) * 10  # reward of global image i is 10 i
    gathered = torch.stack([rewards[p.local] for p in plans])  # what Dist.all_gather returns
    assert torch.equal(plans[0].to_global(gathered), rewards)
    for p in plans:  # every rank sees the same prompts, groups, seeds and order
        assert p.prompts == plans[0].prompts and torch.equal(p.group_ids, plans[0].group_ids)
        assert p.seeds == plans[0].seeds and torch.equal(p.order, plans[0].order)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_step_sets_do_not_depend_on_the_world_size(world, masked):
    """Optimizer step k trains the same samples with the same total weight whether one process accumulates
    ``world`` times more micro-batches or ``world`` processes split them; ranks get equal micro-batch
    counts."""
    trainable = torch.rand(24, generator=torch.Generator().manual_seed(1)) > 0.4 if masked else None
    single = _plan(1, 0, per_rank_step=2 * world).steps(2, trainable=trainable)
    multi = [_plan(world, r).steps(2, trainable=trainable) for r in range(world)]
    assert all(len(m) == len(single) for m in multi)
    for k, step in enumerate(single):
        want = sorted(torch.cat([mb.gidx for mb in step]).tolist())
        got = [mb for m in multi for mb in m[k] if not mb.dummy]
        assert sorted(torch.cat([mb.gidx for mb in got]).tolist()) == want
        assert len({len(m[k]) for m in multi}) == 1  # same micro-batch count on every rank
        # DDP averages over ranks: sum(weights) / world == the single process's total weight (1 per step)
        assert sum(mb.weight for m in multi for mb in m[k]) / world == pytest.approx(1.0)
        assert sum(mb.weight for mb in step) == pytest.approx(1.0)
        for rank, m in enumerate(multi):
            for mb in m[k]:
                if mb.dummy:
                    assert mb.weight == 0.0
                else:  # local rows point at the right global samples
                    assert torch.equal(_plan(world, rank).local[mb.rows], mb.gidx)


def test_world_size_must_divide_the_batch():
    with pytest.raises(ConfigError, match=r"expected a divisor of the global batch .* 24 images\), got 5"):
        _plan(5, 0)


def test_single_process_collectives_are_identities():
    d = Dist()
    t = torch.arange(3.0)
    assert torch.equal(d.all_gather(t), t[None]) and d.all_gather_object("x") == ["x"]
    assert d.any(True) and not d.any(False)
    vals = {"a": 1.0}
    assert d.reduce_metrics(vals) is vals


def test_cli_rejects_a_world_size_that_does_not_divide_the_batch(tmp_path, monkeypatch, capsys):
    from train import nft

    monkeypatch.setenv("WORLD_SIZE", "3")
    assert nft.main([*SMALL, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE: expected a divisor of the global batch" in err and "16 images), got 3" in err


def test_fsdp_is_refused_by_the_policy_gradient_loops(capsys):
    from train import grpo

    assert grpo.main(["--dist.strategy", "fsdp"]) == 2
    assert "--dist.strategy: fsdp is supported by train.nft" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- torchrun
def _env(threads=1):
    """The child processes run the PyTorch reference kernels, as a CPU user's run does (and as this package's
    in-process runs do, tests/train/conftest.py): the Triton interpreter made these runs about 3.7x slower,
    and the kernels are tested in it, batch invariance included, under tests/kernels."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(module, nproc, argv, timeout=300):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        module,
        *argv,
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def _single(module, argv, timeout=300):
    out = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=ROOT,
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def _lora_checkpoints(run_dir) -> dict[int, list[torch.Tensor]]:
    """The trained LoRA weights of every checkpoint still in ``run_dir`` (the newest two), by iteration."""
    out = {}
    for p in sorted((Path(run_dir) / "checkpoints").glob("iter_*.pt")):
        out[int(p.stem.split("_")[1])] = torch.load(p, weights_only=False)["policy"]["default"]
    return out


def _train_lines(run_dir):
    return {m["iteration"]: m for m in common.read_metrics(run_dir) if "train/loss" in m}


# SMALL's reward is -JPEG size in kB: a byte (1e-3) is its quantum.  The two runs sample with other batch
# splits, so an image may differ in its last bits and its JPEG by a byte.  With up to 2 of the n = 16 images
# one byte apart, the mean moves by at most 2q/n and the (population) std, 1-Lipschitz in ||r||/sqrt(n), by
# at most sqrt(2) q/sqrt(n): those are the absolute tolerances of the reward statistics, on top of rtol.
_Q, _N = 1e-3, 16
_REWARD_ATOL = {"train/reward_mean": 2 * _Q / _N, "train/reward_std": 2**0.5 * _Q / _N**0.5}


def _assert_same_run(a, b, *, keys, rtol):
    ma, mb = _train_lines(a), _train_lines(b)
    assert sorted(ma) == sorted(mb) and ma
    for it in ma:
        for k in keys:
            atol = _REWARD_ATOL.get(k, 1e-7)
            assert ma[it][k] == pytest.approx(mb[it][k], rel=rtol, abs=atol), (it, k, ma[it][k], mb[it][k])
    # LoRA B starts at zero, so |B| is how far training moved it.  After the first update only the reduction
    # order differs; Adam divides by sqrt(v), so elements with near-zero gradients amplify it: compare the
    # largest difference with the movement.  Later iterations also see the rewards of slightly different
    # samples (JPEG sizes are discrete, so a last-bit change can move a reward by a byte): there the whole
    # update must agree to 1% (relative Frobenius norm).
    ca, cb = _lora_checkpoints(a), _lora_checkpoints(b)
    iters = sorted(set(ca) & set(cb))
    assert iters and iters[-1] == max(ma), (iters, sorted(ma))
    for n, it in enumerate(iters):
        la, lb = ca[it], cb[it]
        moved = max(float(t.abs().max()) for t in lb[1::2])
        if n == 0 and it == min(ma):
            diff = max(float((x - y).abs().max()) for x, y in zip(la, lb, strict=True))
            assert moved > 1e-4 and diff < 0.02 * moved, (it, diff, moved)
        else:
            diff = torch.cat([(x - y).flatten() for x, y in zip(la, lb, strict=True)]).norm()
            scale = torch.cat([t.flatten() for t in lb[1::2]]).norm()
            assert moved > 1e-4 and diff < 0.01 * scale, (it, diff, scale)


@pytest.fixture(scope="module")
def nft_runs(tmp_path_factory):
    """train.nft for 2 iterations, 2 optimizer steps of 8 samples each: 2 processes (DDP, micro-batch 4, one
    per step and process) and one process accumulating 2 micro-batches per step.  Run once per session
    (the tests only read them)."""

    def build(base):
        common_args = [*SMALL, "--max-iters", "2", "--train.batch-size", "4", "--train.steps-per-iter", "2"]
        _torchrun("train.nft", 2, [*common_args, "--run-dir", str(base / "ddp")])
        _single("train.nft", [*common_args, "--run-dir", str(base / "one")])
        return base

    return shared(tmp_path_factory, "distributed-nft-runs", build)


def test_nft_two_processes_match_one(nft_runs):
    keys = ["train/reward_mean", "train/reward_std", "train/r_mean", "train/loss", "train/kl"]
    _assert_same_run(nft_runs / "ddp", nft_runs / "one", keys=keys, rtol=1e-4)
    evals = [
        [m["eval/score"] for m in common.read_metrics(nft_runs / d) if "eval/score" in m]
        for d in ("ddp", "one")
    ]
    assert evals[0] == evals[1] and len(evals[0]) == 2  # iteration 0 and 2, held-out set sharded over ranks
    lines = [ln for ln in (nft_runs / "ddp" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert len(lines) == len({ln for ln in lines})  # written once (rank 0), not once per rank


def test_nft_resume_on_another_world_size(nft_runs, tmp_path):
    """Iteration 1 on two processes, iteration 2 resumed on one: the same as two iterations on one (the
    steps per iteration do not depend on the world size: nothing to rescale)."""
    run = tmp_path / "resume"
    args = [*SMALL, "--train.batch-size", "4", "--train.steps-per-iter", "2"]
    _torchrun("train.nft", 2, [*args, "--max-iters", "1", "--run-dir", str(run)])
    out = _single("train.nft", ["--resume", str(run), "--max-iters", "2"])
    assert "resumed" in out.stdout and "2 optimizer step(s) per iteration, as before" in out.stdout
    assert json.loads((run / "config.json").read_text())["train"]["steps_per_iter"] == 2
    keys = ["train/reward_mean", "train/loss"]
    _assert_same_run(run, nft_runs / "one", keys=keys, rtol=1e-3)


def test_grpo_two_processes_match_one_with_exact_ratio(tmp_path):
    args = [*SMALL, "--max-iters", "1", "--train.batch-size", "4", "--sample.forward-chunk", "4"]
    _torchrun("train.grpo", 2, [*args, "--train.grad-accum", "1", "--run-dir", str(tmp_path / "ddp")])
    _single("train.grpo", [*args, "--train.grad-accum", "2", "--run-dir", str(tmp_path / "one")])
    keys = ["train/reward_mean", "train/adv_abs_mean", "train/masked_frac"]
    _assert_same_run(tmp_path / "ddp", tmp_path / "one", keys=keys, rtol=1e-5)
    for d in ("ddp", "one"):
        lines = _train_lines(tmp_path / d)
        assert all(m["ratio/first_abs_dev"] == 0.0 for m in lines.values())


def test_fsdp2_on_cpu_matches_ddp_and_resumes(nft_runs, tmp_path):
    """FSDP2 (fully_shard over gloo): sharded LoRA and optimizer state, DCP checkpoints; the run equals the
    DDP one, and a resume from the sharded checkpoint continues it."""
    run = tmp_path / "fsdp"
    args = [*SMALL, "--train.batch-size", "4", "--train.steps-per-iter", "2", "--dist.strategy", "fsdp"]
    _torchrun("train.nft", 2, [*args, "--max-iters", "1", "--run-dir", str(run)])
    ck = common.latest_checkpoint(run)
    assert ck.name == "iter_000001.dcp" and (ck / "meta.pt").exists() and ck.is_dir()
    _torchrun("train.nft", 2, ["--resume", str(run), "--max-iters", "2"])
    ma, mb = _train_lines(run), _train_lines(nft_runs / "ddp")
    for it in (1, 2):
        for k in ("train/reward_mean", "train/loss"):
            assert ma[it][k] == pytest.approx(mb[it][k], rel=1e-4, abs=1e-7), (it, k)
    # the sharded adapter is gathered and exported whole, named as the DDP run's, and the same update up to
    # reduction order (1% of the relative Frobenius norm, as _assert_same_run)
    from safetensors.torch import load_file

    for sub in ("lora", "lora_ema"):
        a = load_file(run / sub / "pytorch_lora_weights.safetensors")
        b = load_file(nft_runs / "ddp" / sub / "pytorch_lora_weights.safetensors")
        assert a.keys() == b.keys() and a
        diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
        assert diff < 0.01 * torch.cat([b[k].flatten() for k in b]).norm(), sub


def test_a_killed_rank_ends_the_job(tmp_path):
    """No hang: rank 1 is killed mid-run; rank 0 fails its next collective and exits with a message well
    within the configured timeout.  (Launched by hand: torchrun itself would also tear the job down.)"""
    port = _free_port()
    argv = [*SMALL, "--max-iters", "50", "--dist.timeout-s", "60", "--run-dir", str(tmp_path / "r")]
    procs, logs = [], [open(tmp_path / f"rank{r}.err", "w") for r in range(2)]
    for rank in range(2):
        env = _env()
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "train.nft", *argv],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=logs[rank],
                text=True,
            )
        )
    try:
        deadline = time.time() + 240
        seen = ""
        while "iter    1" not in seen:  # wait for one full iteration
            assert time.time() < deadline and procs[0].poll() is None, seen
            seen += procs[0].stdout.readline()
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        code = procs[0].wait(timeout=120)
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    err = (tmp_path / "rank0.err").read_text()
    assert code == 1 and waited < 90, (code, waited, err[-2000:])
    assert "another rank probably died" in err


def test_draft_unit_sample_grads_two_processes_match_one(tmp_path):
    """``--train.unit-sample-grads`` sets the gradients itself after the backward (math.md §5, per-sample unit
    gradients), so DDP's averaging is not what reaches the step: its own all-reduce must make 2 processes
    with one micro-batch each step as one process accumulating both."""
    args = [
        "--reward", "saturation", "--sample.prompts-per-iter", "4", "--sample.num-steps", "3",
        "--train.k", "2", "--train.batch-size", "2", "--train.unit-sample-grads", "--max-iters", "2",
        "--eval.num-prompts", "2", "--eval.num-steps", "2", "--eval.every", "100", "--log.checkpoint-every",
        "1", "--log.progress", "false",
    ]  # fmt: skip
    _torchrun("train.draft", 2, [*args, "--train.grad-accum", "1", "--run-dir", str(tmp_path / "ddp")])
    _single("train.draft", [*args, "--train.grad-accum", "2", "--run-dir", str(tmp_path / "one")])
    _assert_same_run(tmp_path / "ddp", tmp_path / "one", keys=["train/reward_mean", "train/loss"], rtol=1e-5)
    for d in ("ddp", "one"):
        assert all(m["train/sample_grad_norm"] > 0 for m in _train_lines(tmp_path / d).values())
